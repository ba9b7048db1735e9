//! The eight datasets of the paper's unified protocol (tcl.md §5), each read in the layout mmsegmentation
//! documents under one data root, plus `folder` for users' own data. Class names are mmseg's, verbatim
//! (`classes/*.txt`, one per line; ADE's 'bed ' keeps its trailing space).
//!
//! The per-dataset values with their upstream citations are tables, in `datasets/tables.rs`; this file holds
//! what they mean and the code that opens a dataset from them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::model::bundle::InputSpec;
use crate::model::preprocess::pixel_statistics;

mod tables;

pub use tables::{DATASETS, PAPER_SUITE, PAPER_TCL_PAMR};

/// How a dataset treats background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Background {
    /// Class 0 is "background", predicted where no query beats the threshold (VOC, Context, COCO-Object).
    Threshold,
    /// No background class (label 255 pixels are ignored).
    None,
}

/// Where images and labels live under the data root.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub images: &'static str,
    pub labels: &'static str,
    /// A split file listing image stems; None: every image under `images` (recursively).
    pub split: Option<&'static str>,
    pub image_suffix: &'static str,
    pub label_suffix: &'static str,
}

/// A dataset's official test pipeline: kakaobrain/tcl at bc2b551, `segmentation/configs/_base_/datasets/<config>`
/// (the file `configs/eval.yml` l. 23-30 names for the dataset), run by mmseg 0.27.0 / mmcv 1.6.2.
///
/// Every config reads `LoadImageFromFile` (cv2, BGR) → `MultiScaleFlipAug(img_scale, flip=False)` →
/// `Resize(keep_ratio=True)` (`mmcv.imrescale`: OpenCV bilinear on the uint8 image) → `RandomFlip` (a no-op
/// without flip) → `Normalize(**img_norm_cfg)` → slide inference with `test_cfg`. The engine implements exactly
/// this (`model::preprocess`); `eval` warns when a bundle's input settings differ from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TestPipeline {
    /// The config file, under `segmentation/configs/_base_/datasets/`.
    pub config: &'static str,
    /// `img_scale=(long, short)`: with keep_ratio, the image is scaled as large as fits both (mmcv `rescale_size`).
    pub long_side_max: usize,
    pub short_side: usize,
    pub keep_ratio: bool,
    pub flip: bool,
    /// `img_norm_cfg`: mean and std on 0..255 pixels, after BGR → RGB (`to_rgb=True`).
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub to_rgb: bool,
    /// `test_cfg = dict(mode="slide", stride=(s, s), crop_size=(c, c))`.
    pub crop_size: usize,
    pub crop_stride: usize,
}

impl TestPipeline {
    /// Where a bundle's input settings differ from this pipeline, one line per setting (empty: the official
    /// protocol). The engine always resizes with keep_ratio and without flipping, as every config does.
    pub fn differences(&self, input: &InputSpec) -> Vec<String> {
        let (mean, std) = pixel_statistics(input);
        let mut out = Vec::new();
        let mut check = |what: &str, ours: String, official: String| {
            if ours != official {
                out.push(format!(
                    "{what} {ours} (the official {} has {official})",
                    self.config
                ));
            }
        };
        check(
            "img_scale",
            format!("({}, {})", input.long_side_max, input.short_side),
            format!("({}, {})", self.long_side_max, self.short_side),
        );
        check("mean", format!("{mean:?}"), format!("{:?}", self.mean));
        check("std", format!("{std:?}"), format!("{:?}", self.std));
        check(
            "crop_size",
            input.crop_size.to_string(),
            self.crop_size.to_string(),
        );
        check(
            "stride",
            input.crop_stride.to_string(),
            self.crop_stride.to_string(),
        );
        out
    }
}

/// One dataset of the protocol: its row in `DATASETS`.
#[derive(Debug, Clone, Copy)]
pub struct DatasetSpec {
    pub key: &'static str,
    /// Column title in the paper's table.
    pub title: &'static str,
    pub layout: Layout,
    classes: &'static str,
    /// Keep only the first n classes of the list (COCO-Object: background + the 80 things).
    prefix: Option<usize>,
    /// Prepend "background" to the list (COCO-Object).
    add_background: bool,
    /// Drop the list's first class, "background" (VOC20, Context59).
    drop_first: bool,
    pub background: Background,
    /// mmseg's reduce_zero_label: 0 → ignore, k → k−1.
    pub reduce_zero_label: bool,
    pub pipeline: TestPipeline,
}

/// One class: its name and the prompts to embed (empty: the bundle's templates around the name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassDef {
    pub name: String,
    pub prompts: Vec<String>,
}

/// A dataset ready to read: classes, background handling, and the (image, label) pairs in order.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub key: String,
    pub classes: Vec<ClassDef>,
    pub background: Background,
    pub reduce_zero_label: bool,
    /// The official test pipeline; None for a user's folder.
    pub pipeline: Option<TestPipeline>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Identifies the sample in reports and prediction files: the path relative to the image folder, without the
    /// image suffix.
    pub id: String,
    pub image: PathBuf,
    pub label: PathBuf,
}

pub fn spec(key: &str) -> Option<&'static DatasetSpec> {
    DATASETS.iter().find(|d| d.key == key)
}

impl DatasetSpec {
    pub fn class_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .classes
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect();
        if let Some(n) = self.prefix {
            names.truncate(n);
        }
        if self.add_background {
            names.insert(0, "background".into());
        }
        if self.drop_first {
            names.remove(0);
        }
        names
    }

    /// Finds the samples under `root` (the mmseg data root).
    pub fn open(&self, root: &Path) -> Result<Dataset> {
        let expected = || {
            format!(
                "expected the mmsegmentation layout under {}: {}/ (images *{}) and {}/ (labels *{}){}",
                root.display(),
                self.layout.images,
                self.layout.image_suffix,
                self.layout.labels,
                self.layout.label_suffix,
                self.layout
                    .split
                    .map(|s| format!(" and the split file {s}"))
                    .unwrap_or_default()
            )
        };
        let images = root.join(self.layout.images);
        let labels = root.join(self.layout.labels);
        for dir in [&images, &labels] {
            if !dir.is_dir() {
                bail!(
                    "dataset '{}': {} is not a folder; {}",
                    self.key,
                    dir.display(),
                    expected()
                );
            }
        }
        let ids = match self.layout.split {
            Some(split) => read_split(&root.join(split)).with_context(expected)?,
            None => list_ids(&images, self.layout.image_suffix)?,
        };
        if ids.is_empty() {
            bail!("dataset '{}': no images found; {}", self.key, expected());
        }
        let samples = ids
            .into_iter()
            .map(|id| Sample {
                image: images.join(format!("{id}{}", self.layout.image_suffix)),
                label: labels.join(format!("{id}{}", self.layout.label_suffix)),
                id,
            })
            .collect();
        Ok(Dataset {
            key: self.key.to_string(),
            classes: self
                .class_names()
                .into_iter()
                .map(|name| ClassDef {
                    name,
                    prompts: Vec::new(),
                })
                .collect(),
            background: self.background,
            reduce_zero_label: self.reduce_zero_label,
            pipeline: Some(self.pipeline),
            samples,
        })
    }
}

/// A split file: one image stem per line.
fn read_split(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the split file {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// Every file under `dir` ending in `suffix`, as its relative path without the suffix, sorted.
fn list_ids(dir: &Path, suffix: &str) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(rel) = path
                .strip_prefix(dir)
                .ok()
                .and_then(|r| r.to_str())
                .and_then(|r| r.strip_suffix(suffix))
            {
                ids.push(rel.to_string());
            }
        }
    }
    ids.sort();
    Ok(ids)
}

/// `--dataset folder`: `<root>/images/*.{jpg,png,...}`, `<root>/labels/<stem>.png` and `<root>/classes.txt`.
///
/// `classes.txt` has one class per line, in label order: `name`, or `name: prompt one; prompt two`. A first
/// class named `background` (without prompts) makes it a with-background dataset (threshold); `#` starts a
/// comment line.
pub fn open_folder(root: &Path) -> Result<Dataset> {
    let class_file = root.join("classes.txt");
    let text = std::fs::read_to_string(&class_file).with_context(|| {
        format!(
            "cannot read {} (one class per line, `name` or `name: prompt; prompt`)",
            class_file.display()
        )
    })?;
    let mut classes = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, prompts) = match line.split_once(':') {
            Some((name, prompts)) => (
                name.trim(),
                prompts
                    .split(';')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(String::from)
                    .collect(),
            ),
            None => (line, Vec::new()),
        };
        if name.is_empty() {
            bail!(
                "{} line {}: a class needs a name",
                class_file.display(),
                n + 1
            );
        }
        classes.push(ClassDef {
            name: name.to_string(),
            prompts,
        });
    }
    if classes.is_empty() || classes.len() > 255 {
        bail!(
            "{}: {} classes; give 1 to 255 (label values 0..254; 255 means ignore)",
            class_file.display(),
            classes.len()
        );
    }
    let background = if classes[0].name == "background" && classes[0].prompts.is_empty() {
        Background::Threshold
    } else {
        Background::None
    };
    let images = root.join("images");
    let labels = root.join("labels");
    for dir in [&images, &labels] {
        if !dir.is_dir() {
            bail!(
                "dataset folder {}: {} is missing; expected images/, labels/ (a <stem>.png per image) and classes.txt",
                root.display(),
                dir.display()
            );
        }
    }
    let mut samples = Vec::new();
    for input in crate::source::inputs::expand(&[images.display().to_string()])? {
        // The file name less its last extension only: `img.2026.png` is labelled by `labels/img.2026.png`.
        let id = input.name.with_extension("").display().to_string();
        samples.push(Sample {
            label: labels.join(format!("{id}.png")),
            image: input.path,
            id,
        });
    }
    if samples.is_empty() {
        bail!(
            "dataset folder {}: no images in {}",
            root.display(),
            images.display()
        );
    }
    Ok(Dataset {
        key: "folder".into(),
        classes,
        background,
        reduce_zero_label: false,
        pipeline: None,
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each dataset against its official config, setting by setting (kakaobrain/tcl bc2b551
    /// segmentation/configs/_base_/datasets/, mmseg 0.27.0 datasets/, TCL segmentation/datasets/).
    #[test]
    fn every_dataset_follows_its_official_test_pipeline() {
        // (key, config, background class, reduce_zero_label)
        let official = [
            ("voc", "pascal_voc12.py", Background::Threshold, false),
            ("context", "pascal_context.py", Background::Threshold, false),
            ("coco_object", "coco.py", Background::Threshold, false),
            ("voc20", "pascal_voc12_20.py", Background::None, true),
            ("context59", "pascal_context59.py", Background::None, true),
            ("coco_stuff", "stuff.py", Background::None, false),
            ("cityscapes", "cityscapes.py", Background::None, false),
            ("ade20k", "ade20k.py", Background::None, true),
        ];
        assert_eq!(official.map(|o| o.0), PAPER_SUITE);
        for (key, config, background, reduce_zero_label) in official {
            let ds = spec(key).expect(key);
            assert_eq!(
                ds.pipeline,
                TestPipeline {
                    config,
                    long_side_max: 2048,
                    short_side: 448,
                    keep_ratio: true,
                    flip: false,
                    mean: [123.675, 116.28, 103.53],
                    std: [58.395, 57.12, 57.375],
                    to_rgb: true,
                    crop_size: 448,
                    crop_stride: 224,
                },
                "{key}"
            );
            assert_eq!(ds.background, background, "{key}");
            assert_eq!(ds.reduce_zero_label, reduce_zero_label, "{key}");
            // mmseg's with_bg is "the class list starts with background" (TCL builder.py l. 60).
            let names = ds.class_names();
            assert_eq!(
                names[0] == "background",
                background == Background::Threshold,
                "{key}"
            );
        }
    }

    #[test]
    fn a_bundle_off_the_official_pipeline_is_named() {
        let pipeline = spec("voc").expect("voc").pipeline;
        let mut input = InputSpec::official();
        assert_eq!(pipeline.differences(&input), Vec::<String>::new());
        input.short_side = 336;
        input.crop_stride = 112;
        let found = pipeline.differences(&input);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("img_scale (2048, 336)") && found[0].contains("pascal_voc12.py"),
            "{found:?}"
        );
    }

    #[test]
    fn a_folder_dataset_keeps_dots_in_image_names() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path();
        std::fs::create_dir_all(root.join("images/sub")).expect("mkdir");
        std::fs::create_dir_all(root.join("labels/sub")).expect("mkdir");
        std::fs::write(root.join("classes.txt"), "background\nred\n").expect("write");
        for name in ["shot.2026.01.png", "shot.2026.02.png", "sub/x.png"] {
            std::fs::write(root.join("images").join(name), b"png").expect("write");
        }
        let d = open_folder(root).expect("open");
        let mut pairs: Vec<(String, PathBuf)> = d
            .samples
            .iter()
            .map(|s| {
                (
                    s.id.clone(),
                    s.label
                        .strip_prefix(root)
                        .expect("under root")
                        .to_path_buf(),
                )
            })
            .collect();
        pairs.sort();
        assert_eq!(
            pairs,
            [
                (
                    "shot.2026.01".to_string(),
                    PathBuf::from("labels/shot.2026.01.png")
                ),
                (
                    "shot.2026.02".to_string(),
                    PathBuf::from("labels/shot.2026.02.png")
                ),
                ("sub/x".to_string(), PathBuf::from("labels/sub/x.png")),
            ]
        );
    }

    #[test]
    fn class_lists_match_the_protocol() {
        let count = |k: &str| spec(k).expect(k).class_names().len();
        assert_eq!(PAPER_SUITE.map(count), [21, 60, 81, 20, 59, 171, 19, 150]);
        let ade = spec("ade20k").expect("ade").class_names();
        assert_eq!(
            ade[7], "bed ",
            "ADE's trailing space is part of the protocol"
        );
        let object = spec("coco_object").expect("obj").class_names();
        assert_eq!(
            (object[0].as_str(), object[80].as_str()),
            ("background", "toothbrush")
        );
        // mmseg's Pascal Context list is alphabetical after background, as its converted labels are.
        let context59 = spec("context59").expect("ctx59").class_names();
        assert_eq!(&context59[..4], ["aeroplane", "bag", "bed", "bedclothes"]);
        assert_eq!(context59[58], "wood");
        let voc20 = spec("voc20").expect("voc20").class_names();
        assert_eq!(
            (voc20[0].as_str(), voc20[19].as_str()),
            ("aeroplane", "tvmonitor")
        );
    }
}
