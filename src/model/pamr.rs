//! PAMR (Pixel-Adaptive Mask Refinement), computed natively: the same arithmetic as `trainer/tclseg_trainer/
//! pamr.py` (and the bundle's `pamr` graph), about 20× faster than running that graph through ONNX Runtime,
//! whose hundreds of tiny gather ops dominate a small model's run time.
//!
//! For each pixel p, the neighbours are the 8 positions of a 3×3 window dilated by d, for each d of the
//! bundle's dilations (replicate padding: coordinates clamp at the border). Per colour channel the local
//! std is the unbiased std of the 9·|d| window samples (centre included once per dilation); the affinity of a
//! neighbour is −|I(p) − I(q)| / (1e-8 + 0.1·std), averaged over the channels and soft-maxed over the
//! neighbours. Each iteration replaces every mask value by the affinity-weighted sum of its neighbours'.

use super::resample::{AxisWeights, Coordinates};

/// The (dy, dx) of a 3×3 window in raster order.
const WINDOW: [(isize, isize); 9] = [
    (-1, -1),
    (-1, 0),
    (-1, 1),
    (0, -1),
    (0, 0),
    (0, 1),
    (1, -1),
    (1, 0),
    (1, 1),
];

/// Refines `masks` ([n, side, side]) of one crop in place; `pixels` is the normalized crop [3, crop, crop].
pub fn refine(
    pixels: &[f32],
    crop: usize,
    masks: &mut [f32],
    n: usize,
    side: usize,
    dilations: &[usize],
    iterations: usize,
) {
    let hw = side * side;
    let image = downsample(pixels, crop, side);
    // Offsets (dy·d, dx·d) in (dilation, raster position) order: the window (centre included once per
    // dilation) and the neighbours (without it).
    let window: Vec<(isize, isize)> = dilations
        .iter()
        .flat_map(|&d| {
            WINDOW
                .iter()
                .map(move |&(dy, dx)| (dy * d as isize, dx * d as isize))
        })
        .collect();
    let neighbours: Vec<(isize, isize)> = window.iter().copied().filter(|&o| o != (0, 0)).collect();
    let k = neighbours.len();
    let samples = window.len() as f32;

    // Local std per channel and pixel (two passes, window order), then the affinity [K][hw] summed over channels.
    let mut affinity = vec![0f32; k * hw];
    let mut mean = vec![0f32; hw];
    let mut var = vec![0f32; hw];
    let mut shifted = vec![0f32; side];
    for c in 0..3 {
        let plane = &image[c * hw..(c + 1) * hw];
        mean.fill(0.0);
        var.fill(0.0);
        for y in 0..side {
            let row = y * side..(y + 1) * side;
            for &offset in &window {
                shift_row(plane, side, y, offset, &mut shifted);
                for (m, v) in mean[row.clone()].iter_mut().zip(&shifted) {
                    *m += v;
                }
            }
            for m in &mut mean[row.clone()] {
                *m /= samples;
            }
            for &offset in &window {
                shift_row(plane, side, y, offset, &mut shifted);
                for ((q, v), m) in var[row.clone()]
                    .iter_mut()
                    .zip(&shifted)
                    .zip(&mean[row.clone()])
                {
                    let d = v - m;
                    *q += d * d;
                }
            }
            for q in &mut var[row.clone()] {
                *q = 1e-8 + 0.1 * (*q / (samples - 1.0)).sqrt();
            }
            for (j, &offset) in neighbours.iter().enumerate() {
                shift_row(plane, side, y, offset, &mut shifted);
                let aff = &mut affinity[j * hw + y * side..j * hw + (y + 1) * side];
                for (((a, v), centre), scale) in aff
                    .iter_mut()
                    .zip(&shifted)
                    .zip(&plane[row.clone()])
                    .zip(&var[row.clone()])
                {
                    *a += -(centre - v).abs() / scale;
                }
            }
        }
    }
    // Mean over the channels, softmax over the neighbours.
    let mut max = vec![f32::NEG_INFINITY; hw];
    for aff in affinity.chunks_exact_mut(hw) {
        for (a, m) in aff.iter_mut().zip(&mut max) {
            *a /= 3.0;
            *m = m.max(*a);
        }
    }
    let mut sum = vec![0f32; hw];
    for aff in affinity.chunks_exact_mut(hw) {
        for ((a, m), s) in aff.iter_mut().zip(&max).zip(&mut sum) {
            *a = (*a - m).exp();
            *s += *a;
        }
    }
    for aff in affinity.chunks_exact_mut(hw) {
        for (a, s) in aff.iter_mut().zip(&sum) {
            *a /= s;
        }
    }

    let mut next = vec![0f32; hw];
    for plane in masks.chunks_exact_mut(hw).take(n) {
        for _ in 0..iterations {
            for y in 0..side {
                let out = &mut next[y * side..(y + 1) * side];
                out.fill(0.0);
                for (j, &offset) in neighbours.iter().enumerate() {
                    shift_row(plane, side, y, offset, &mut shifted);
                    let aff = &affinity[j * hw + y * side..j * hw + (y + 1) * side];
                    for ((o, a), v) in out.iter_mut().zip(aff).zip(&shifted) {
                        *o += a * v;
                    }
                }
            }
            plane.copy_from_slice(&next);
        }
    }
}

/// Row `y` of `plane` shifted by `(dy, dx)` with replicate padding: `out[x] = plane[clamp(y+dy)][clamp(x+dx)]`.
fn shift_row(plane: &[f32], side: usize, y: usize, (dy, dx): (isize, isize), out: &mut [f32]) {
    let last = side as isize - 1;
    let sy = (y as isize + dy).clamp(0, last) as usize;
    let src = &plane[sy * side..(sy + 1) * side];
    let lo = (-dx).clamp(0, side as isize) as usize;
    let hi = (side as isize - dx).clamp(0, side as isize) as usize;
    if lo >= hi {
        out.fill(if dx < 0 { src[0] } else { src[side - 1] });
        return;
    }
    out[..lo].fill(src[0]);
    let start = (lo as isize + dx) as usize;
    out[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
    out[hi..].fill(src[side - 1]);
}

/// The crop resized to the mask side, bilinear with align_corners=True, rounded exactly as the reference graph
/// rounds it: two matrix products (columns, then rows) whose two non-zero terms per output accumulate with a
/// fused multiply-add. PAMR divides colour differences by a tenth of a local std, so in flat regions a last-bit
/// difference here would become a visible one in the masks.
fn downsample(pixels: &[f32], crop: usize, side: usize) -> Vec<f32> {
    let axis = AxisWeights::new(crop, side, Coordinates::AlignCorners);
    let weights: Vec<(usize, usize, f32, f32)> = (0..side)
        .map(|i| (axis.lo[i], axis.hi[i], 1.0 - axis.frac[i], axis.frac[i]))
        .collect();
    let mix = |x0: f32, x1: f32, (lo, hi, w0, w1): (usize, usize, f32, f32)| {
        if lo == hi {
            x0 * (w0 + w1)
        } else {
            x1.mul_add(w1, x0 * w0)
        }
    };
    let mut out = vec![0f32; 3 * side * side];
    let mut cols = vec![0f32; crop * side];
    for c in 0..3 {
        let plane = &pixels[c * crop * crop..(c + 1) * crop * crop];
        for a in 0..crop {
            let row = &plane[a * crop..(a + 1) * crop];
            for (j, &w) in weights.iter().enumerate() {
                cols[a * side + j] = mix(row[w.0], row[w.1], w);
            }
        }
        let dst = &mut out[c * side * side..(c + 1) * side * side];
        for (i, &w) in weights.iter().enumerate() {
            for j in 0..side {
                dst[i * side + j] = mix(cols[w.0 * side + j], cols[w.1 * side + j], w);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flat_image_averages_masks_and_keeps_constants() {
        // Flat image: every affinity is equal, so each step is the plain mean of the 8·|d| neighbours.
        let crop = 8;
        let pixels = vec![0.5f32; 3 * crop * crop];
        let side = 4;
        let mut constant = vec![0.7f32; side * side];
        refine(&pixels, crop, &mut constant, 1, side, &[1, 2], 3);
        assert!(constant.iter().all(|v| (v - 0.7).abs() < 1e-6));

        let mut spike = vec![0f32; side * side];
        spike[5] = 16.0; // (1, 1)
        refine(&pixels, crop, &mut spike, 1, side, &[1], 1);
        // (0, 0)'s clamped 3×3 neighbours: (0,0)×3 [clamped copies], (0,1), (1,0)×... (1,1) once → 16/8.
        assert!((spike[0] - 2.0).abs() < 1e-6, "{spike:?}");
        let total: f32 = spike.iter().sum();
        assert!(total > 0.0);
    }

    #[test]
    fn an_edge_stops_the_spread() {
        // Left half dark, right half bright: mass placed left stays left.
        let crop = 16;
        let mut pixels = vec![0f32; 3 * crop * crop];
        for c in 0..3 {
            for y in 0..crop {
                for x in crop / 2..crop {
                    pixels[c * crop * crop + y * crop + x] = 2.0;
                }
            }
        }
        let side = 8;
        let mut mask = vec![0f32; side * side];
        for y in 0..side {
            for x in 0..side / 2 {
                mask[y * side + x] = 1.0;
            }
        }
        refine(&pixels, crop, &mut mask, 1, side, &[1, 2], 10);
        let right: f32 = (0..side).map(|y| mask[y * side + side - 1]).sum();
        let left: f32 = (0..side).map(|y| mask[y * side]).sum();
        assert!(left > 7.0 && right < 1.0, "left {left}, right {right}");
    }
}
