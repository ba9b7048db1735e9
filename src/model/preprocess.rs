//! Image → normalized planar tensor at the evaluation scale, and the sliding windows over it.
//!
//! Mirrors `reference.prepare` and `reference.crop_boxes`, which reproduce the official TCL test pipeline
//! (`segmentation/configs/_base_/datasets/*.py` → mmseg 0.27 `Resize(keep_ratio=True)` + `Normalize`): mmcv's
//! keep-ratio rescale (short side 448, long side at most 2048, sizes rounded half up), OpenCV's uint8 bilinear
//! resize (whole grey levels, bit for bit), ImageNet normalization on 0..255 values, and mmseg's
//! `slide_inference` windows.

use super::bundle::InputSpec;
use super::resample::resize_u8_bilinear;

/// A prepared image: [3, height, width], normalized.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

/// One window, rows y1..y2 and columns x1..x2 of the prepared image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub y1: usize,
    pub y2: usize,
    pub x1: usize,
    pub x2: usize,
}

/// mmcv keep-ratio rescale: the largest scale that fits both limits; sizes rounded half up.
///
/// mmcv 1.6.2 `mmcv/image/geometric.py`: `rescale_size` (l. 218-244) takes
/// `min(max_long_edge / max(h, w), max_short_edge / min(h, w))` in f64 and `_scale_size` (l. 34) gives
/// `int(w * scale + 0.5), int(h * scale + 0.5)`; `imrescale` (l. 257) then calls `cv2.resize` (l. 117).
pub fn rescale_size(h: usize, w: usize, short_side: usize, long_side_max: usize) -> (usize, usize) {
    let scale = (long_side_max as f64 / h.max(w) as f64).min(short_side as f64 / h.min(w) as f64);
    (
        ((h as f64 * scale + 0.5) as usize).max(1),
        ((w as f64 * scale + 0.5) as usize).max(1),
    )
}

/// The image at the evaluation scale, still uint8 RGB: OpenCV's bilinear resize, exactly as the official
/// pipeline's `mmcv.imrescale` does it (per channel, so the official BGR order makes no difference).
pub fn rescale(image: &image::RgbImage, input: &InputSpec) -> image::RgbImage {
    let (h, w) = (image.height() as usize, image.width() as usize);
    let (nh, nw) = rescale_size(h, w, input.short_side, input.long_side_max);
    if (nh, nw) == (h, w) {
        return image.clone();
    }
    let pixels = resize_u8_bilinear(image.as_raw(), 3, (h, w), (nh, nw));
    image::RgbImage::from_raw(nw as u32, nh as u32, pixels)
        .expect("the resize fills nh x nw pixels")
}

/// The normalization's mean and std in 0..255 units, as f32 the way the official config holds them.
///
/// mmseg's `Normalize` takes `mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375]` (each dataset config,
/// l. 12) as float32. The bundle stores 0..1 statistics; `0.224f32 * 255` is one ulp off `57.12f32`, so the
/// scaling goes through the manifest's decimal value in f64 (f32's shortest round-trip text, what the manifest
/// file holds) and rounds once.
pub fn pixel_statistics(input: &InputSpec) -> ([f32; 3], [f32; 3]) {
    let scaled = |v: f32| {
        let decimal: f64 = v.to_string().parse().unwrap_or(f64::from(v));
        (decimal * 255.0) as f32
    };
    (input.mean.map(scaled), input.std.map(scaled))
}

pub fn prepare(image: &image::RgbImage, input: &InputSpec) -> Prepared {
    let resized = rescale(image, input);
    let (nh, nw) = (resized.height() as usize, resized.width() as usize);
    let (mean, std) = pixel_statistics(input);
    let plane = nh * nw;
    let mut data = vec![0f32; 3 * plane];
    // (x - mean) / std in f32 equals mmcv's `imnormalize_` (cv2.subtract, then cv2.multiply by 1/std in f64)
    // for every grey level of the ImageNet statistics; `tests/opencv_resize.rs` checks all 3 x 256 of them.
    for (i, px) in resized.pixels().enumerate() {
        for c in 0..3 {
            data[c * plane + i] = (f32::from(px[c]) - mean[c]) / std[c];
        }
    }
    Prepared {
        height: nh,
        width: nw,
        data,
    }
}

/// The evaluation-scale size of an image `height`×`width` and mmseg's windows over it: what the engine cuts,
/// for whoever needs the windows without the pixels (the device path's matrices, crop counts).
pub fn windows(height: usize, width: usize, input: &InputSpec) -> ((usize, usize), Vec<CropBox>) {
    let (h, w) = rescale_size(height, width, input.short_side, input.long_side_max);
    ((h, w), crop_boxes(h, w, input.crop_size, input.crop_stride))
}

/// mmseg's slide windows, row by row: clamped to the image and shifted back inside when they overhang.
pub fn crop_boxes(h: usize, w: usize, crop: usize, stride: usize) -> Vec<CropBox> {
    let rows = (h + stride).saturating_sub(crop + 1) / stride + 1;
    let cols = (w + stride).saturating_sub(crop + 1) / stride + 1;
    let mut boxes = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let y2 = (r * stride + crop).min(h);
            let x2 = (c * stride + crop).min(w);
            boxes.push(CropBox {
                y1: y2.saturating_sub(crop),
                y2,
                x1: x2.saturating_sub(crop),
                x2,
            });
        }
    }
    boxes
}

/// The crop's pixels as [3, crop, crop]. A window smaller than the crop (an image side under `crop` after the
/// rescale, i.e. aspect ratio above long_side_max/short_side) is centred on zeros, the mean colour: the fixed-size
/// graphs need it, where the PyTorch reference pads only to a multiple of 16 (the one known difference).
pub fn cut_crop(image: &Prepared, b: &CropBox, crop: usize) -> Vec<f32> {
    let (bh, bw) = (b.y2 - b.y1, b.x2 - b.x1);
    let (top, left) = ((crop - bh) / 2, (crop - bw) / 2);
    let mut out = vec![0f32; 3 * crop * crop];
    for c in 0..3 {
        for y in 0..bh {
            let src = (c * image.height + b.y1 + y) * image.width + b.x1;
            let dst = (c * crop + top + y) * crop + left;
            out[dst..dst + bw].copy_from_slice(&image.data[src..src + bw]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rescale_matches_mmcv() {
        assert_eq!(rescale_size(480, 640, 448, 2048), (448, 597));
        assert_eq!(rescale_size(37, 53, 448, 2048), (448, 642));
        assert_eq!(rescale_size(100, 1000, 448, 2048), (205, 2048));
    }

    /// The configs' float32 constants, exactly: `0.224f32 * 255.0` would be one ulp above `57.12f32`.
    #[test]
    fn statistics_are_the_official_configs_float32_values() {
        let input = InputSpec::official();
        let (mean, std) = pixel_statistics(&input);
        assert_eq!(mean, [123.675f32, 116.28, 103.53]);
        assert_eq!(std, [58.395f32, 57.12, 57.375]);
        assert_ne!(0.224f32 * 255.0, 57.12f32);
    }

    #[test]
    fn windows_cover_the_image_like_mmseg() {
        assert_eq!(
            crop_boxes(448, 448, 448, 224),
            vec![CropBox {
                y1: 0,
                y2: 448,
                x1: 0,
                x2: 448
            }]
        );
        let boxes = crop_boxes(448, 1000, 448, 224);
        let xs: Vec<(usize, usize)> = boxes.iter().map(|b| (b.x1, b.x2)).collect();
        assert_eq!(xs, vec![(0, 448), (224, 672), (448, 896), (552, 1000)]);
        let small = crop_boxes(205, 2048, 448, 224);
        assert!(small.iter().all(|b| b.y1 == 0 && b.y2 == 205));
    }
}
