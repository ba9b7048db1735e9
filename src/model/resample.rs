//! Bilinear resampling. Two kinds live here:
//!
//! * `resize_u8_bilinear`: the image resize of the official test pipeline, bit for bit. mmseg's `Resize` calls
//!   `mmcv.imrescale`, i.e. `cv2.resize(img, (w, h), interpolation=INTER_LINEAR)` on the decoded **uint8** image,
//!   whose uint8 path is fixed-point: whole grey levels come out, not floats.
//! * `resize_planes`: planar f32 with PyTorch's `F.interpolate(mode="bilinear", antialias=False)` coordinate
//!   rules, for everything the model itself resizes (mask upsampling, the final resize, PAMR's image), where the
//!   official code uses PyTorch: `HalfPixel` (align_corners=False) and `AlignCorners` (align_corners=True).

/// How output pixel centres map onto the input grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coordinates {
    /// `src = (dst + 0.5) * in / out - 0.5`, clamped at 0 (PyTorch align_corners=False).
    HalfPixel,
    /// `src = dst * (in - 1) / (out - 1)` (PyTorch align_corners=True).
    AlignCorners,
}

/// For each output index along one axis: the two input indices and the weight of the second.
#[derive(Debug, Clone)]
pub struct AxisWeights {
    pub lo: Vec<usize>,
    pub hi: Vec<usize>,
    pub frac: Vec<f32>,
}

impl AxisWeights {
    pub fn new(input: usize, output: usize, coords: Coordinates) -> AxisWeights {
        let mut lo = Vec::with_capacity(output);
        let mut hi = Vec::with_capacity(output);
        let mut frac = Vec::with_capacity(output);
        for dst in 0..output {
            let src = match coords {
                Coordinates::HalfPixel => {
                    let scale = input as f32 / output as f32;
                    ((dst as f32 + 0.5) * scale - 0.5).max(0.0)
                }
                Coordinates::AlignCorners if output > 1 => {
                    dst as f32 * ((input as f32 - 1.0) / (output as f32 - 1.0))
                }
                Coordinates::AlignCorners => 0.0,
            };
            let i0 = (src as usize).min(input.saturating_sub(1));
            let i1 = if i0 + 1 < input { i0 + 1 } else { i0 };
            lo.push(i0);
            hi.push(i1);
            frac.push(src - i0 as f32);
        }
        AxisWeights { lo, hi, frac }
    }
}

/// Resizes `planes` planar images of `h`×`w` (row-major, plane after plane) to `oh`×`ow`.
pub fn resize_planes(
    src: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    coords: Coordinates,
) -> Vec<f32> {
    debug_assert_eq!(src.len(), planes * h * w);
    let mut out = vec![0f32; planes * oh * ow];
    if h == oh && w == ow {
        out.copy_from_slice(src);
        return out;
    }
    let ys = AxisWeights::new(h, oh, coords);
    let xs = AxisWeights::new(w, ow, coords);
    for p in 0..planes {
        let plane = &src[p * h * w..(p + 1) * h * w];
        let dst = &mut out[p * oh * ow..(p + 1) * oh * ow];
        for (oy, row) in dst.chunks_exact_mut(ow).enumerate() {
            let (r0, r1, fy) = (ys.lo[oy] * w, ys.hi[oy] * w, ys.frac[oy]);
            interpolate_row(&plane[r0..r0 + w], &plane[r1..r1 + w], fy, &xs, row);
        }
    }
    out
}

/// One output row from two input rows: PyTorch's weighting, `(1-fy)·((1-fx)·a + fx·b) + fy·(...)`.
#[inline]
pub fn interpolate_row(top: &[f32], bottom: &[f32], fy: f32, xs: &AxisWeights, out: &mut [f32]) {
    let gy = 1.0 - fy;
    for (ox, o) in out.iter_mut().enumerate() {
        let (x0, x1, fx) = (xs.lo[ox], xs.hi[ox], xs.frac[ox]);
        let gx = 1.0 - fx;
        *o = gy * (gx * top[x0] + fx * top[x1]) + fy * (gx * bottom[x0] + fx * bottom[x1]);
    }
}

/// OpenCV's `INTER_RESIZE_COEF_BITS`: its uint8 bilinear weights are integers in units of 1/2048.
const COEF_ONE: f32 = 2048.0;

/// One axis of OpenCV's uint8 INTER_LINEAR resize: per output index, the two source indices and their
/// 11-bit integer weights.
///
/// The arithmetic is OpenCV's, step by step, because the last bit matters: the scale is `1 / (out / in)` in
/// f64, the source position `(dst + 0.5) * scale - 0.5` is rounded to f32 before `floor`, the fraction is taken
/// in f32, and each weight is `round_half_even(w * 2048)` of the f32 weight (`saturate_cast<short>`).
#[derive(Debug, Clone)]
pub struct FixedTaps {
    pub lo: Vec<usize>,
    pub hi: Vec<usize>,
    pub w_lo: Vec<i32>,
    pub w_hi: Vec<i32>,
}

impl FixedTaps {
    /// `clamp_weights`: OpenCV's horizontal pass moves a tap that falls outside the image onto the edge pixel
    /// with weights (1, 0); its vertical pass keeps the unclamped weights and only clamps the row indices.
    /// The two differ in the last bit once the vertical pass's truncating shifts are applied.
    fn new(input: usize, output: usize, clamp_weights: bool) -> FixedTaps {
        let scale = 1.0 / (output as f64 / input as f64);
        let last = input as i64 - 1;
        let mut taps = FixedTaps {
            lo: Vec::with_capacity(output),
            hi: Vec::with_capacity(output),
            w_lo: Vec::with_capacity(output),
            w_hi: Vec::with_capacity(output),
        };
        for dst in 0..output {
            let position = ((dst as f64 + 0.5) * scale - 0.5) as f32;
            let mut index = position.floor() as i64;
            let mut frac = position - index as f32;
            if clamp_weights {
                if index < 0 {
                    (index, frac) = (0, 0.0);
                }
                if index >= last {
                    (index, frac) = (last, 0.0);
                }
            }
            taps.lo.push(index.clamp(0, last) as usize);
            taps.hi.push((index + 1).clamp(0, last) as usize);
            taps.w_lo
                .push(((1.0 - frac) * COEF_ONE).round_ties_even() as i32);
            taps.w_hi.push((frac * COEF_ONE).round_ties_even() as i32);
        }
        taps
    }
}

/// `cv2.resize(src, (ow, oh), interpolation=cv2.INTER_LINEAR)` for interleaved uint8 pixels (`channels` per
/// pixel, row-major), reproduced exactly: the official TCL test pipeline resizes the decoded image this way
/// before normalizing, so the model sees whole grey levels rounded OpenCV's way.
///
/// Horizontal pass: `Σ pixel·weight` in i32 (exact). Vertical pass: OpenCV's SIMD kernel, which it uses for
/// every column of the 8-bit path: each row sum is shifted right by 4, multiplied by the 16-bit weight keeping
/// the high half (`>> 16`), the two products added, then `(v + 2) >> 2` saturated to 0..255. That is not the
/// same as rounding `Σ/2²²` once; measured against opencv-python-headless 4.14 and 5.1 (see
/// `trainer/tests/test_reference.py` and `tests/opencv_resize.rs`). Exact 2× reductions, which OpenCV hands
/// to its area filter, give identical results through this formula, so they need no code path of their own.
pub fn resize_u8_bilinear(
    src: &[u8],
    channels: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Vec<u8> {
    debug_assert_eq!(src.len(), h * w * channels);
    if (h, w) == (oh, ow) {
        return src.to_vec();
    }
    let xs = FixedTaps::new(w, ow, true);
    let ys = FixedTaps::new(h, oh, false);
    let row_len = ow * channels;
    let horizontal = |row: usize, out: &mut [i32]| {
        let line = &src[row * w * channels..(row + 1) * w * channels];
        let taps = xs.lo.iter().zip(&xs.hi).zip(xs.w_lo.iter().zip(&xs.w_hi));
        for (pixel, ((&lo, &hi), (&wa, &wb))) in out.chunks_exact_mut(channels).zip(taps) {
            let (a, b) = (
                &line[lo * channels..][..channels],
                &line[hi * channels..][..channels],
            );
            for ((o, &pa), &pb) in pixel.iter_mut().zip(a).zip(b) {
                *o = i32::from(pa) * wa + i32::from(pb) * wb;
            }
        }
    };
    // The two source rows of the current output row after the horizontal pass, reused while they last.
    let mut rows = [
        (usize::MAX, vec![0i32; row_len]),
        (usize::MAX, vec![0i32; row_len]),
    ];
    let mut out = vec![0u8; oh * row_len];
    for (oy, dst) in out.chunks_exact_mut(row_len).enumerate() {
        let (lo, hi) = (ys.lo[oy], ys.hi[oy]);
        if rows[0].0 != lo {
            if rows[1].0 == lo {
                rows.swap(0, 1);
            } else {
                horizontal(lo, &mut rows[0].1);
                rows[0].0 = lo;
            }
        }
        if rows[1].0 != hi {
            if hi == lo {
                let [first, second] = &mut rows;
                second.1.copy_from_slice(&first.1);
            } else {
                horizontal(hi, &mut rows[1].1);
            }
            rows[1].0 = hi;
        }
        let (b0, b1) = (ys.w_lo[oy], ys.w_hi[oy]);
        for ((d, &s0), &s1) in dst.iter_mut().zip(&rows[0].1).zip(&rows[1].1) {
            let v = (((s0 >> 4) * b0) >> 16) + (((s1 >> 4) * b1) >> 16);
            *d = ((v + 2) >> 2).clamp(0, 255) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by `cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR)` (opencv-python-headless 4.14);
    /// tests/opencv_resize.rs covers many more sizes.
    #[test]
    fn uint8_resize_gives_opencvs_grey_levels() {
        // 1x2 → 1x3, three channels: the middle pixel of 0 and 255 is 128, OpenCV's rounding.
        let a = [0, 10, 255, 255, 101, 0];
        assert_eq!(
            resize_u8_bilinear(&a, 3, (1, 2), (1, 3)),
            vec![0, 10, 255, 128, 56, 128, 255, 101, 0]
        );
        // 2x2 → 3x3, one channel.
        let b = [7, 200, 13, 99];
        assert_eq!(
            resize_u8_bilinear(&b, 1, (2, 2), (3, 3)),
            vec![7, 103, 200, 10, 80, 150, 13, 56, 99]
        );
        assert_eq!(resize_u8_bilinear(&b, 1, (2, 2), (2, 2)), b.to_vec());
    }

    #[test]
    fn identity_when_sizes_match() {
        let src: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(
            resize_planes(&src, 1, (3, 4), (3, 4), Coordinates::HalfPixel),
            src
        );
    }

    #[test]
    fn half_pixel_upsample_matches_pytorch_values() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0., 1.]]]]), size=(1, 4), mode="bilinear")
        // -> [0.0, 0.25, 0.75, 1.0]
        let out = resize_planes(&[0.0, 1.0], 1, (1, 2), (1, 4), Coordinates::HalfPixel);
        assert_eq!(out, vec![0.0, 0.25, 0.75, 1.0]);
    }

    #[test]
    fn align_corners_keeps_the_corners() {
        // align_corners=True, size 2 -> 3: [0, 0.5, 1]
        let out = resize_planes(&[0.0, 1.0], 1, (1, 2), (1, 3), Coordinates::AlignCorners);
        assert_eq!(out, vec![0.0, 0.5, 1.0]);
    }

    #[test]
    fn downsample_by_two_averages_neighbours() {
        // half-pixel 4 -> 2 samples at 0.5 and 2.5: the mean of each pair, no antialias.
        let out = resize_planes(
            &[0.0, 2.0, 4.0, 6.0],
            1,
            (1, 4),
            (1, 2),
            Coordinates::HalfPixel,
        );
        assert_eq!(out, vec![1.0, 5.0]);
    }
}
