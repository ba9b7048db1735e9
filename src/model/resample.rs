//! Bilinear resampling of planar f32 images, with PyTorch's `F.interpolate(mode="bilinear", antialias=False)`
//! coordinate rules, so that resized pixels and upsampled masks match the PyTorch reference.
//!
//! Both modes the model uses are here: `HalfPixel` (align_corners=False: image resize, mask upsampling, final
//! resize) and `AlignCorners` (align_corners=True: the image PAMR compares against).

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

#[cfg(test)]
mod tests {
    use super::*;

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
