//! The device path's per-frame-size matrices, built on the host once per size: the windowing, the upsampling of
//! each window's masks, the averaging of overlapping windows and the resize to the frame are all linear and
//! separable, so each axis is one matrix the `crops` and `labels` graphs multiply by. Pure functions of the sizes;
//! `trainer/tclseg_trainer/device_graphs.py` builds the same matrices in numpy and explains the maths.

use crate::model::resample::{AxisWeights, Coordinates};

/// The distinct spans along one axis, in window order.
pub(super) fn distinct(spans: impl Iterator<Item = (usize, usize)>) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for span in spans {
        if !out.contains(&span) {
            out.push(span);
        }
    }
    out
}

/// Dense [out, in] matrix of one axis' bilinear half-pixel resampling.
fn resample_matrix(input: usize, output: usize) -> Vec<f32> {
    let axis = AxisWeights::new(input, output, Coordinates::HalfPixel);
    let mut m = vec![0f32; output * input];
    for o in 0..output {
        m[o * input + axis.lo[o]] += 1.0 - axis.frac[o];
        m[o * input + axis.hi[o]] += axis.frac[o];
    }
    m
}

/// [windows, crop, resized] of 0/1: take the window's span of the resized frame, centre it in the crop (the
/// graph zeroes the rows left empty, padding a short window with the normalized mean colour). Selecting whole
/// grey levels is exact in any float arithmetic, TF32 included. Mirrors `device_graphs.crop_matrices`.
pub(super) fn crop_matrices(
    resized: usize,
    spans: &[(usize, usize)],
    crop: usize,
) -> (Vec<usize>, Vec<f32>) {
    let mut out = vec![0f32; spans.len() * crop * resized];
    for (k, &(a, b)) in spans.iter().enumerate() {
        let top = (crop - (b - a)) / 2;
        for y in a..b {
            out[(k * crop + top + y - a) * resized + y] = 1.0;
        }
    }
    (vec![spans.len(), crop, resized], out)
}

/// [windows, size, side]: upsample side→crop, place the window, divide by the number of windows covering each
/// row, resize resized→size. Mirrors `device_graphs.label_matrices`.
pub(super) fn label_matrices(
    size: usize,
    resized: usize,
    spans: &[(usize, usize)],
    crop: usize,
    side: usize,
) -> (Vec<usize>, Vec<f32>) {
    let up = resample_matrix(side, crop);
    let final_axis = AxisWeights::new(resized, size, Coordinates::HalfPixel);
    let mut count = vec![0f32; resized];
    for &(a, b) in spans {
        count[a..b].iter_mut().for_each(|c| *c += 1.0);
    }
    let mut out = vec![0f32; spans.len() * size * side];
    for (k, &(a, b)) in spans.iter().enumerate() {
        let top = (crop - (b - a)) / 2;
        for o in 0..size {
            let taps = [
                (final_axis.lo[o], 1.0 - final_axis.frac[o]),
                (final_axis.hi[o], final_axis.frac[o]),
            ];
            let row = &mut out[(k * size + o) * side..(k * size + o + 1) * side];
            for (y, weight) in taps {
                if y < a || y >= b || weight == 0.0 {
                    continue;
                }
                let w = weight / count[y];
                let i = y - a + top;
                for (r, u) in row.iter_mut().zip(&up[i * side..(i + 1) * side]) {
                    *r += w * u;
                }
            }
        }
    }
    (vec![spans.len(), size, side], out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_rows_select_and_centre_the_window() {
        // 4 resized rows, one window of 2 rows (2..4) centred in a crop of 4: rows 1..3.
        let (shape, m) = crop_matrices(4, &[(2, 4)], 4);
        assert_eq!(shape, vec![1, 4, 4]);
        let row = |r: usize| &m[r * 4..(r + 1) * 4];
        assert_eq!(row(0), &[0.0; 4]);
        assert_eq!(row(1), &[0.0, 0.0, 1.0, 0.0]);
        assert_eq!(row(2), &[0.0, 0.0, 0.0, 1.0]);
        assert_eq!(row(3), &[0.0; 4]);
    }

    #[test]
    fn label_rows_average_overlapping_windows() {
        // Two windows of 4 over 6 rows overlapping on rows 2..4, no resizing anywhere (side = crop = 4).
        let (shape, m) = label_matrices(6, 6, &[(0, 4), (2, 6)], 4, 4);
        assert_eq!(shape, vec![2, 6, 4]);
        let at = |k: usize, o: usize, j: usize| m[(k * 6 + o) * 4 + j];
        assert_eq!(at(0, 0, 0), 1.0);
        assert_eq!(at(0, 2, 2), 0.5);
        assert_eq!(at(1, 2, 0), 0.5);
        assert_eq!(at(1, 5, 3), 1.0);
        assert_eq!(at(0, 5, 3), 0.0);
        // Every output row's weights sum to 1 over both windows.
        for o in 0..6 {
            let total: f32 = (0..2)
                .flat_map(|k| (0..4).map(move |j| (k, j)))
                .map(|(k, j)| at(k, o, j))
                .sum();
            assert!((total - 1.0).abs() < 1e-6, "row {o}: {total}");
        }
    }
}
