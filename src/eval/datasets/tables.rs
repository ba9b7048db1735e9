//! The tables of the paper's protocol: per dataset, its layout under the data root, its class list, how it
//! treats background and its official test pipeline, each value with the line of the upstream config it comes
//! from; and the paper's column order and TCL's published numbers. Data, not logic (`datasets` reads these),
//! kept in their own file so the citations can be checked line by line against upstream.

use super::{Background, DatasetSpec, Layout, TestPipeline};

const IMAGENET_MEAN: [f32; 3] = [123.675, 116.28, 103.53];
const IMAGENET_STD: [f32; 3] = [58.395, 57.12, 57.375];

const VOC: &str = include_str!("../classes/voc.txt");
const CONTEXT: &str = include_str!("../classes/context.txt");
const COCO_STUFF: &str = include_str!("../classes/coco_stuff.txt");
const CITYSCAPES: &str = include_str!("../classes/cityscapes.txt");
const ADE20K: &str = include_str!("../classes/ade20k.txt");

const VOC_LAYOUT: Layout = Layout {
    images: "VOCdevkit/VOC2012/JPEGImages",
    labels: "VOCdevkit/VOC2012/SegmentationClass",
    split: Some("VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"),
    image_suffix: ".jpg",
    label_suffix: ".png",
};
const CONTEXT_LAYOUT: Layout = Layout {
    images: "VOCdevkit/VOC2010/JPEGImages",
    labels: "VOCdevkit/VOC2010/SegmentationClassContext",
    split: Some("VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt"),
    image_suffix: ".jpg",
    label_suffix: ".png",
};

/// The paper's column order.
pub const PAPER_SUITE: [&str; 8] = [
    "voc",
    "context",
    "coco_object",
    "voc20",
    "context59",
    "coco_stuff",
    "cityscapes",
    "ade20k",
];

/// The paper's numbers for TCL with PAMR (tcl.md §6.1), in `PAPER_SUITE` order, then the average.
pub const PAPER_TCL_PAMR: [f64; 9] = [55.0, 30.4, 31.6, 83.2, 33.9, 22.4, 24.0, 17.1, 37.2];

pub const DATASETS: [DatasetSpec; 8] = [
    DatasetSpec {
        key: "voc",
        title: "VOC",
        layout: VOC_LAYOUT,
        classes: VOC,
        prefix: None,
        add_background: false,
        drop_first: false,
        // mmseg 0.27.0 datasets/voc.py l. 16: CLASSES starts with 'background', so TCL's builder.py l. 60 sets
        // with_bg: class 0 is the constant bg_thresh channel (tcl_seg.py l. 66-70).
        background: Background::Threshold,
        // voc.py l. 29 passes no reduce_zero_label: CustomDataset's default False (custom.py l. 90).
        reduce_zero_label: false,
        pipeline: TestPipeline {
            config: "pascal_voc12.py",
            long_side_max: 2048, // pascal_voc12.py l. 17: img_scale=(2048, 448)
            short_side: 448,     // pascal_voc12.py l. 17
            keep_ratio: true,    // pascal_voc12.py l. 21: dict(type="Resize", keep_ratio=True)
            flip: false,         // pascal_voc12.py l. 19: flip=False
            mean: IMAGENET_MEAN, // pascal_voc12.py l. 12: img_norm_cfg mean=[123.675, 116.28, 103.53]
            std: IMAGENET_STD,   // pascal_voc12.py l. 12: std=[58.395, 57.12, 57.375]
            to_rgb: true,        // pascal_voc12.py l. 12: to_rgb=True
            crop_size: 448,      // pascal_voc12.py l. 40: test_cfg crop_size=(448, 448)
            crop_stride: 224,    // pascal_voc12.py l. 40: stride=(224, 224)
        },
    },
    DatasetSpec {
        key: "context",
        title: "Context",
        layout: CONTEXT_LAYOUT,
        classes: CONTEXT,
        prefix: None,
        add_background: false,
        drop_first: false,
        // mmseg 0.27.0 datasets/pascal_context.py l. 20: CLASSES starts with 'background' → with_bg.
        background: Background::Threshold,
        // pascal_context.py l. 52: reduce_zero_label=False.
        reduce_zero_label: false,
        pipeline: TestPipeline {
            config: "pascal_context.py",
            long_side_max: 2048, // pascal_context.py l. 17: img_scale=(2048, 448)
            short_side: 448,     // pascal_context.py l. 17
            keep_ratio: true,    // pascal_context.py l. 21: dict(type="Resize", keep_ratio=True)
            flip: false,         // pascal_context.py l. 19: flip=False
            mean: IMAGENET_MEAN, // pascal_context.py l. 12: img_norm_cfg mean=[123.675, 116.28, 103.53]
            std: IMAGENET_STD,   // pascal_context.py l. 12: std=[58.395, 57.12, 57.375]
            to_rgb: true,        // pascal_context.py l. 12: to_rgb=True
            crop_size: 448,      // pascal_context.py l. 40: test_cfg crop_size=(448, 448)
            crop_stride: 224,    // pascal_context.py l. 40: stride=(224, 224)
        },
    },
    DatasetSpec {
        key: "coco_object",
        title: "Object",
        layout: Layout {
            images: "coco_stuff164k/images/val2017",
            labels: "coco_stuff164k/annotations/val2017",
            split: None,
            image_suffix: ".jpg",
            label_suffix: "_instanceTrainIds.png",
        },
        classes: COCO_STUFF,
        prefix: Some(80),
        add_background: true,
        drop_first: false,
        // TCL segmentation/datasets/coco_object.py l. 18: CLASSES starts with 'background' → with_bg.
        background: Background::Threshold,
        // coco_object.py l. 42 passes no reduce_zero_label: CustomDataset's default False (custom.py l. 90).
        reduce_zero_label: false,
        pipeline: TestPipeline {
            config: "coco.py",
            long_side_max: 2048, // coco.py l. 17: img_scale=(2048, 448)
            short_side: 448,     // coco.py l. 17
            keep_ratio: true,    // coco.py l. 21: dict(type="Resize", keep_ratio=True)
            flip: false,         // coco.py l. 19: flip=False
            mean: IMAGENET_MEAN, // coco.py l. 12: img_norm_cfg mean=[123.675, 116.28, 103.53]
            std: IMAGENET_STD,   // coco.py l. 12: std=[58.395, 57.12, 57.375]
            to_rgb: true,        // coco.py l. 12: to_rgb=True
            crop_size: 448,      // coco.py l. 39: test_cfg crop_size=(448, 448)
            crop_stride: 224,    // coco.py l. 39: stride=(224, 224)
        },
    },
    DatasetSpec {
        key: "voc20",
        title: "VOC20",
        layout: VOC_LAYOUT,
        classes: VOC,
        prefix: None,
        add_background: false,
        drop_first: true,
        // TCL segmentation/datasets/pascal_voc.py l. 24: CLASSES has no 'background' → no background class.
        background: Background::None,
        // pascal_voc.py l. 40: reduce_zero_label=True (VOC's background 0 becomes ignored).
        reduce_zero_label: true,
        pipeline: TestPipeline {
            config: "pascal_voc12_20.py",
            long_side_max: 2048, // pascal_voc12_20.py l. 17: img_scale=(2048, 448)
            short_side: 448,     // pascal_voc12_20.py l. 17
            keep_ratio: true,    // pascal_voc12_20.py l. 21: dict(type="Resize", keep_ratio=True)
            flip: false,         // pascal_voc12_20.py l. 19: flip=False
            mean: IMAGENET_MEAN, // pascal_voc12_20.py l. 12: img_norm_cfg mean=[123.675, 116.28, 103.53]
            std: IMAGENET_STD,   // pascal_voc12_20.py l. 12: std=[58.395, 57.12, 57.375]
            to_rgb: true,        // pascal_voc12_20.py l. 12: to_rgb=True
            crop_size: 448,      // pascal_voc12_20.py l. 40: test_cfg crop_size=(448, 448)
            crop_stride: 224,    // pascal_voc12_20.py l. 40: stride=(224, 224)
        },
    },
    DatasetSpec {
        key: "context59",
        title: "Context59",
        layout: CONTEXT_LAYOUT,
        classes: CONTEXT,
        prefix: None,
        add_background: false,
        drop_first: true,
        // mmseg 0.27.0 datasets/pascal_context.py l. 70: PascalContextDataset59's CLASSES has no 'background'.
        background: Background::None,
        // pascal_context.py l. 101: reduce_zero_label=True.
        reduce_zero_label: true,
        pipeline: TestPipeline {
            config: "pascal_context59.py",
            long_side_max: 2048, // pascal_context59.py l. 17: img_scale=(2048, 448)
            short_side: 448,     // pascal_context59.py l. 17
            keep_ratio: true,    // pascal_context59.py l. 21: dict(type="Resize", keep_ratio=True)
            flip: false,         // pascal_context59.py l. 19: flip=False
            mean: IMAGENET_MEAN, // pascal_context59.py l. 12: img_norm_cfg mean=[123.675, 116.28, 103.53]
            std: IMAGENET_STD,   // pascal_context59.py l. 12: std=[58.395, 57.12, 57.375]
            to_rgb: true,        // pascal_context59.py l. 12: to_rgb=True
            crop_size: 448,      // pascal_context59.py l. 40: test_cfg crop_size=(448, 448)
            crop_stride: 224,    // pascal_context59.py l. 40: stride=(224, 224)
        },
    },
    DatasetSpec {
        key: "coco_stuff",
        title: "Stuff",
        layout: Layout {
            images: "coco_stuff164k/images/val2017",
            labels: "coco_stuff164k/annotations/val2017",
            split: None,
            image_suffix: ".jpg",
            label_suffix: "_labelTrainIds.png",
        },
        classes: COCO_STUFF,
        prefix: None,
        add_background: false,
        drop_first: false,
        // mmseg 0.27.0 datasets/coco_stuff.py l. 17: no 'background' class.
        background: Background::None,
        // coco_stuff.py l. 94 passes no reduce_zero_label: default False (custom.py l. 90), the 164k labels.
        reduce_zero_label: false,
        pipeline: TestPipeline {
            config: "stuff.py",
            long_side_max: 2048, // stuff.py l. 17: img_scale=(2048, 448)
            short_side: 448,     // stuff.py l. 17
            keep_ratio: true,    // stuff.py l. 21: dict(type="Resize", keep_ratio=True)
            flip: false,         // stuff.py l. 19: flip=False
            mean: IMAGENET_MEAN, // stuff.py l. 12: img_norm_cfg mean=[123.675, 116.28, 103.53]
            std: IMAGENET_STD,   // stuff.py l. 12: std=[58.395, 57.12, 57.375]
            to_rgb: true,        // stuff.py l. 12: to_rgb=True
            crop_size: 448,      // stuff.py l. 39: test_cfg crop_size=(448, 448)
            crop_stride: 224,    // stuff.py l. 39: stride=(224, 224)
        },
    },
    DatasetSpec {
        key: "cityscapes",
        title: "City",
        layout: Layout {
            images: "cityscapes/leftImg8bit/val",
            labels: "cityscapes/gtFine/val",
            split: None,
            image_suffix: "_leftImg8bit.png",
            label_suffix: "_gtFine_labelTrainIds.png",
        },
        classes: CITYSCAPES,
        prefix: None,
        add_background: false,
        drop_first: false,
        // mmseg 0.27.0 datasets/cityscapes.py l. 21: no 'background' class.
        background: Background::None,
        // cityscapes.py l. 37 passes no reduce_zero_label: default False (custom.py l. 90).
        reduce_zero_label: false,
        pipeline: TestPipeline {
            config: "cityscapes.py",
            long_side_max: 2048, // cityscapes.py l. 17: img_scale=(2048, 448)
            short_side: 448,     // cityscapes.py l. 17
            keep_ratio: true,    // cityscapes.py l. 21: dict(type="Resize", keep_ratio=True)
            flip: false,         // cityscapes.py l. 19: flip=False
            mean: IMAGENET_MEAN, // cityscapes.py l. 12: img_norm_cfg mean=[123.675, 116.28, 103.53]
            std: IMAGENET_STD,   // cityscapes.py l. 12: std=[58.395, 57.12, 57.375]
            to_rgb: true,        // cityscapes.py l. 12: to_rgb=True
            crop_size: 448,      // cityscapes.py l. 39: test_cfg crop_size=(448, 448)
            crop_stride: 224,    // cityscapes.py l. 39: stride=(224, 224)
        },
    },
    DatasetSpec {
        key: "ade20k",
        title: "ADE",
        layout: Layout {
            images: "ade/ADEChallengeData2016/images/validation",
            labels: "ade/ADEChallengeData2016/annotations/validation",
            split: None,
            image_suffix: ".jpg",
            label_suffix: ".png",
        },
        classes: ADE20K,
        prefix: None,
        add_background: false,
        drop_first: false,
        // mmseg 0.27.0 datasets/ade.py l. 21: no 'background' class.
        background: Background::None,
        // ade.py l. 90: reduce_zero_label=True.
        reduce_zero_label: true,
        pipeline: TestPipeline {
            config: "ade20k.py",
            long_side_max: 2048, // ade20k.py l. 17: img_scale=(2048, 448)
            short_side: 448,     // ade20k.py l. 17
            keep_ratio: true,    // ade20k.py l. 21: dict(type="Resize", keep_ratio=True)
            flip: false,         // ade20k.py l. 19: flip=False
            mean: IMAGENET_MEAN, // ade20k.py l. 12: img_norm_cfg mean=[123.675, 116.28, 103.53]
            std: IMAGENET_STD,   // ade20k.py l. 12: std=[58.395, 57.12, 57.375]
            to_rgb: true,        // ade20k.py l. 12: to_rgb=True
            crop_size: 448,      // ade20k.py l. 39: test_cfg crop_size=(448, 448)
            crop_stride: 224,    // ade20k.py l. 39: stride=(224, 224)
        },
    },
];
