//! Image → normalized planar tensor at the evaluation scale, and the sliding windows over it.
//!
//! Mirrors `reference.prepare` and `reference.crop_boxes`: mmcv's keep-ratio rescale (short side 448, long side at
//! most 2048, sizes rounded half up), float bilinear resize without antialiasing, ImageNet normalization on 0..255
//! values, and mmseg's `slide_inference` windows.

use super::bundle::InputSpec;
use super::resample::{resize_planes, Coordinates};

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
pub fn rescale_size(h: usize, w: usize, short_side: usize, long_side_max: usize) -> (usize, usize) {
    let scale = (long_side_max as f64 / h.max(w) as f64).min(short_side as f64 / h.min(w) as f64);
    (
        ((h as f64 * scale + 0.5) as usize).max(1),
        ((w as f64 * scale + 0.5) as usize).max(1),
    )
}

pub fn prepare(image: &image::RgbImage, input: &InputSpec) -> Prepared {
    let (h, w) = (image.height() as usize, image.width() as usize);
    let mut planar = vec![0f32; 3 * h * w];
    for (i, px) in image.pixels().enumerate() {
        for c in 0..3 {
            planar[c * h * w + i] = f32::from(px[c]);
        }
    }
    let (nh, nw) = rescale_size(h, w, input.short_side, input.long_side_max);
    let mut data = resize_planes(&planar, 3, (h, w), (nh, nw), Coordinates::HalfPixel);
    for c in 0..3 {
        let mean = input.mean[c] * 255.0;
        let std = input.std[c] * 255.0;
        for v in &mut data[c * nh * nw..(c + 1) * nh * nw] {
            *v = (*v - mean) / std;
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
