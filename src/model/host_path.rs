//! The host path: images → labels with pre- and postprocessing in native Rust, the model graphs in ONNX Runtime.
//!
//! Per image: resize (short side 448) and normalize, cut the sliding windows, run the crops in batches through
//! trunk → TCL head → mask head, refine with native PAMR, blend the kp masks, upsample each crop's masks to the
//! crop, average the overlapping crops, resize to the original size, prepend the background, argmax. This is
//! what the CPU runs (and the GPU with `--processing host`); `device_path.rs` does the same as graphs.
//!
//! Several groups of images (each its own queries, settings and head) share the trunk runs: their crops are
//! batched together, and each head then runs on its own rows of the trunk's tokens (`Engine::segment_groups`).
//!
//! A training-free head (`[heads.<name>] kind = "dense"`) replaces TCL head → mask head: its graph gives
//! L2-normalized features per patch, and the crop's class probabilities are softmax over the queries of
//! logit_scale · cos(feature, text), computed here on the bilinearly upsampled (stride-4) logits; PAMR, the crop
//! averaging and the background threshold then run as for TCL, on those probabilities. Under a training-free
//! method's own protocol (`Fusion::Logits`, `tclseg segment --protocol`), the head's cosine logits are instead
//! upsampled to the window, averaged over windows, resized to the image and only then put through the softmax at
//! the logit scale, as the methods' `forward_slide` and `postprocess_result` do.

use std::sync::Mutex;

use anyhow::{anyhow, Result};
use ort::value::Tensor;

use super::bundle::{Fusion, HeadId, HeadKind, Manifest};
use super::pamr;
use super::preprocess::{self, Prepared};
use super::resample::{self, resize_planes, AxisWeights, Coordinates};
use super::runtime::output;
use super::types::{lock, ModelGraphs, SegmentSettings, Segmentation, TextEmbeddings};

/// The head a batch is scored with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostHead {
    pub id: HeadId,
    pub kind: HeadKind,
    pub logit_scale: f32,
    pub fusion: Fusion,
}

impl HostHead {
    /// The logit scale of the softmax after fusion (None: the scores are probabilities already).
    fn fused_logit_scale(&self) -> Option<f32> {
        (self.kind == HeadKind::Dense && self.fusion == Fusion::Logits).then_some(self.logit_scale)
    }
}

/// Images segmented with one query set, settings and head: one part of a shared run.
#[derive(Clone, Copy)]
pub(crate) struct HostGroup<'a> {
    pub images: &'a [&'a image::RgbImage],
    pub text: &'a TextEmbeddings,
    pub settings: &'a SegmentSettings,
    pub head: HostHead,
}

/// Segments the images of several groups, the crops of all of them through the trunk together `crop_batch` at
/// a time (in group order, so one run may hold the last crops of one group and the first of the next); each
/// group's head then runs on its rows of the trunk's tokens. Returns each group's segmentations and the number
/// of trunk runs. The model's sessions are locked per graph run only, not during PAMR and the averaging, so
/// other threads' crops run meanwhile.
pub(crate) fn segment(
    model: &Mutex<ModelGraphs>,
    manifest: &Manifest,
    crop_batch: usize,
    groups: &[HostGroup],
) -> Result<(Vec<Vec<Segmentation>>, u64)> {
    let input = &manifest.input;
    let crop = input.crop_size;
    let prepared: Vec<Vec<Prepared>> = groups
        .iter()
        .map(|g| {
            g.images
                .iter()
                .map(|img| preprocess::prepare(img, input))
                .collect()
        })
        .collect();
    let mut accumulators: Vec<Vec<Accumulator>> = groups
        .iter()
        .zip(&prepared)
        .map(|(g, images)| {
            images
                .iter()
                .map(|p| Accumulator::new(g.text.rows, p.height, p.width))
                .collect()
        })
        .collect();
    // (group, image, window) of every crop, group by group.
    let crops: Vec<(usize, usize, preprocess::CropBox)> = prepared
        .iter()
        .enumerate()
        .flat_map(|(g, images)| {
            images.iter().enumerate().flat_map(move |(i, p)| {
                preprocess::crop_boxes(p.height, p.width, input.crop_size, input.crop_stride)
                    .into_iter()
                    .map(move |b| (g, i, b))
            })
        })
        .collect();
    let mut trunk_runs = 0;
    for chunk in crops.chunks(crop_batch.max(1)) {
        let pixels: Vec<f32> = chunk
            .iter()
            .flat_map(|(g, i, b)| preprocess::cut_crop(&prepared[*g][*i], b, crop))
            .collect();
        let tokens = trunk_tokens(model, manifest, &pixels, chunk.len())?;
        trunk_runs += 1;
        let (plane, row) = (3 * crop * crop, tokens.len() / chunk.len());
        // The chunk's crops of one group after another: each head on its own rows.
        let mut at = 0;
        for part in chunk.chunk_by(|a, b| a.0 == b.0) {
            let (n, group) = (part.len(), &groups[part[0].0]);
            let classes = group.text.rows;
            let (masks, side) = crop_masks(
                model,
                manifest,
                &tokens[at * row..(at + n) * row],
                &pixels[at * plane..(at + n) * plane],
                n,
                group,
            )?;
            at += n;
            for (k, (g, i, b)) in part.iter().enumerate() {
                let m = &masks[k * classes * side * side..(k + 1) * classes * side * side];
                let up = resize_planes(
                    m,
                    classes,
                    (side, side),
                    (crop, crop),
                    Coordinates::HalfPixel,
                );
                accumulators[*g][*i].add(&up, crop, b);
            }
        }
    }
    let segs = groups
        .iter()
        .zip(accumulators)
        .map(|(g, accs)| {
            g.images
                .iter()
                .zip(accs)
                .map(|(img, acc)| {
                    acc.finish(
                        img.height() as usize,
                        img.width() as usize,
                        g.settings,
                        g.head.fused_logit_scale(),
                    )
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((segs, trunk_runs))
}

/// The trunk's tokens of a batch of crops, [B, 1 + G², width].
fn trunk_tokens(
    model: &Mutex<ModelGraphs>,
    m: &Manifest,
    pixels: &[f32],
    crops: usize,
) -> Result<Vec<f32>> {
    let (crop, grid, width) = (
        m.input.crop_size,
        m.crop_grid(),
        m.architecture.vision_width,
    );
    let t0 = std::time::Instant::now();
    let input = Tensor::from_array((vec![crops, 3, crop, crop], pixels.to_vec()))
        .map_err(|e| anyhow!("{e}"))?;
    let mut sessions = lock(model)?;
    let out = sessions
        .trunk
        .run(ort::inputs!["pixels" => input])
        .map_err(|e| anyhow!("image trunk: {e}"))?;
    let tokens = output(&out, "tokens", &[crops, 1 + grid * grid, width])?.to_vec();
    tracing::trace!(
        crops,
        "crop timings (ms): trunk {:.1}",
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(tokens)
}

/// Final stride-4 masks of a batch of crops from the trunk's tokens, [B, N, side, side], and `side`: the group's
/// head (TCL: head, mask head, PAMR, kp blend; a training-free head: its graph, class probabilities, PAMR). Under
/// logit fusion: the cosine logits at the patch grid, [B, N, G, G], and G.
fn crop_masks(
    model: &Mutex<ModelGraphs>,
    m: &Manifest,
    tokens: &[f32],
    pixels: &[f32],
    crops: usize,
    group: &HostGroup,
) -> Result<(Vec<f32>, usize)> {
    let (crop, grid, side) = (m.input.crop_size, m.crop_grid(), m.mask_side());
    let (width, dim) = (m.architecture.vision_width, m.architecture.embed_dim);
    let (text, settings, head) = (group.text, group.settings, group.head);
    let n = text.rows;
    let t1 = std::time::Instant::now();
    let input = Tensor::from_array((vec![crops, 1 + grid * grid, width], tokens.to_vec()))
        .map_err(|e| anyhow!("{e}"))?;
    let mut sessions = lock(model)?;
    if head.kind == HeadKind::Dense {
        let session = sessions
            .dense
            .get_mut(&head.id)
            .ok_or_else(|| anyhow!("head {} was not opened", head.id.0))?;
        let out = session
            .run(ort::inputs!["tokens" => input])
            .map_err(|e| anyhow!("head graph: {e}"))?;
        let dense = output(&out, "dense", &[crops, dim, grid, grid])?.to_vec();
        drop(out);
        drop(sessions);
        let t2 = std::time::Instant::now();
        if head.fused_logit_scale().is_some() {
            return Ok((cosine_logits(&dense, crops, text, grid, 1.0), grid));
        }
        let mut probs = class_probabilities(&dense, crops, text, grid, side, head.logit_scale);
        if settings.pamr {
            refine_crops(pixels, crop, &mut probs, n, side, m);
        }
        tracing::trace!(
            crops,
            "crop timings (ms): head {:.1}, scores + PAMR {:.1}",
            (t2 - t1).as_secs_f64() * 1e3,
            t2.elapsed().as_secs_f64() * 1e3
        );
        return Ok((probs, side));
    }
    let tcl = sessions
        .tcl
        .as_mut()
        .ok_or_else(|| anyhow!("this bundle has no TCL head"))?;
    let out = tcl
        .head
        .run(ort::inputs!["tokens" => input])
        .map_err(|e| anyhow!("TCL head: {e}"))?;
    let dense = output(&out, "dense", &[crops, dim, side, side])?.to_vec();
    let kp_feat = output(&out, "kp_feat", &[crops, dim, grid, grid])?.to_vec();
    drop(out);
    let t2 = std::time::Instant::now();

    let out = tcl
        .mask_head
        .run(ort::inputs![
            "dense" => Tensor::from_array((vec![crops, dim, side, side], dense)).map_err(|e| anyhow!("{e}"))?,
            "kp_feat" => Tensor::from_array((vec![crops, dim, grid, grid], kp_feat)).map_err(|e| anyhow!("{e}"))?,
            "text" => Tensor::from_array((vec![n, dim], text.data.clone())).map_err(|e| anyhow!("{e}"))?,
        ])
        .map_err(|e| anyhow!("mask head: {e}"))?;
    let mut masks = output(&out, "masks", &[crops, n, side, side])?.to_vec();
    let kp_masks = output(&out, "kp_masks", &[crops, n, side, side])?.to_vec();
    drop(out);
    let t3 = std::time::Instant::now();

    drop(sessions);
    if settings.pamr {
        refine_crops(pixels, crop, &mut masks, n, side, m);
    }
    let t4 = std::time::Instant::now();
    tracing::trace!(
        crops,
        "crop timings (ms): head {:.1}, mask head {:.1}, PAMR {:.1}",
        (t2 - t1).as_secs_f64() * 1e3,
        (t3 - t2).as_secs_f64() * 1e3,
        (t4 - t3).as_secs_f64() * 1e3
    );
    let kp = settings.kp_weight;
    if kp != 0.0 {
        for (m, k) in masks.iter_mut().zip(&kp_masks) {
            *m = kp * k + (1.0 - kp) * *m;
        }
    }
    Ok((masks, side))
}

/// Native PAMR over each crop's [N, side, side] scores.
fn refine_crops(
    pixels: &[f32],
    crop: usize,
    scores: &mut [f32],
    n: usize,
    side: usize,
    m: &Manifest,
) {
    let plane = 3 * crop * crop;
    for (c, crop_scores) in scores.chunks_exact_mut(n * side * side).enumerate() {
        pamr::refine(
            &pixels[c * plane..(c + 1) * plane],
            crop,
            crop_scores,
            n,
            side,
            &m.mask.pamr_dilations,
            m.mask.pamr_iterations,
        );
    }
}

/// A training-free head's class probabilities [B, N, side, side] from its normalized features [B, E, G, G]:
/// logit_scale · cos with each (normalized) query, bilinearly upsampled (half-pixel) from the patch grid to the
/// stride-4 side, then softmax over the queries per pixel.
fn class_probabilities(
    dense: &[f32],
    crops: usize,
    text: &TextEmbeddings,
    grid: usize,
    side: usize,
    logit_scale: f32,
) -> Vec<f32> {
    let n = text.rows;
    let cells = grid * grid;
    let all = cosine_logits(dense, crops, text, grid, logit_scale);
    let mut out = Vec::with_capacity(crops * n * side * side);
    for logits in all.chunks_exact(n * cells) {
        let mut up = resize_planes(
            logits,
            n,
            (grid, grid),
            (side, side),
            Coordinates::HalfPixel,
        );
        softmax_over_planes(&mut up, n, side * side);
        out.extend(up);
    }
    out
}

/// logit_scale · cos of each crop's features [B, E, G, G] with each (normalized) query: [B, N, G, G].
fn cosine_logits(
    dense: &[f32],
    crops: usize,
    text: &TextEmbeddings,
    grid: usize,
    logit_scale: f32,
) -> Vec<f32> {
    let (n, dim, cells) = (text.rows, text.dim, grid * grid);
    let mut out = vec![0f32; crops * n * cells];
    for (b, logits) in out.chunks_exact_mut(n * cells).enumerate() {
        let feats = &dense[b * dim * cells..(b + 1) * dim * cells];
        for (q, row) in logits.chunks_exact_mut(cells).enumerate() {
            let t = &text.data[q * dim..(q + 1) * dim];
            for (e, &te) in t.iter().enumerate() {
                let w = te * logit_scale;
                for (l, f) in row.iter_mut().zip(&feats[e * cells..(e + 1) * cells]) {
                    *l += w * f;
                }
            }
        }
    }
    out
}

/// Softmax over `n` planes of `px` values each, per position, in place.
fn softmax_over_planes(planes: &mut [f32], n: usize, px: usize) {
    let mut max = vec![f32::NEG_INFINITY; px];
    for plane in planes.chunks_exact(px).take(n) {
        for (m, v) in max.iter_mut().zip(plane) {
            *m = m.max(*v);
        }
    }
    let mut sum = vec![0f32; px];
    for plane in planes.chunks_exact_mut(px).take(n) {
        for ((v, m), s) in plane.iter_mut().zip(&max).zip(sum.iter_mut()) {
            *v = (*v - m).exp();
            *s += *v;
        }
    }
    for plane in planes.chunks_exact_mut(px).take(n) {
        for (v, s) in plane.iter_mut().zip(&sum) {
            *v /= s;
        }
    }
}

/// Sum and count of crop scores over one prepared image, [N, h, w].
struct Accumulator {
    classes: usize,
    height: usize,
    width: usize,
    total: Vec<f32>,
    count: Vec<f32>,
}

impl Accumulator {
    fn new(classes: usize, height: usize, width: usize) -> Accumulator {
        Accumulator {
            classes,
            height,
            width,
            total: vec![0.0; classes * height * width],
            count: vec![0.0; height * width],
        }
    }

    /// Adds one crop's upsampled masks [N, crop, crop]; a box smaller than the crop sits centred in it.
    fn add(&mut self, masks: &[f32], crop: usize, b: &preprocess::CropBox) {
        let (bh, bw) = (b.y2 - b.y1, b.x2 - b.x1);
        let (top, left) = ((crop - bh) / 2, (crop - bw) / 2);
        for c in 0..self.classes {
            let plane = &masks[c * crop * crop..(c + 1) * crop * crop];
            for y in 0..bh {
                let src = &plane[(top + y) * crop + left..(top + y) * crop + left + bw];
                let row = (c * self.height + b.y1 + y) * self.width + b.x1;
                for (t, s) in self.total[row..row + bw].iter_mut().zip(src) {
                    *t += s;
                }
            }
        }
        for y in b.y1..b.y2 {
            for v in &mut self.count[y * self.width + b.x1..y * self.width + b.x2] {
                *v += 1.0;
            }
        }
    }

    /// Averages, resizes to the original size row by row, prepends the background and takes the argmax. With
    /// `logit_scale` the averages are logits: each row's classes go through softmax(logit_scale · logits) first.
    fn finish(
        self,
        out_h: usize,
        out_w: usize,
        settings: &SegmentSettings,
        logit_scale: Option<f32>,
    ) -> Result<Segmentation> {
        let (h, w, n) = (self.height, self.width, self.classes);
        let mut mean = self.total;
        for c in 0..n {
            for (v, k) in mean[c * h * w..(c + 1) * h * w].iter_mut().zip(&self.count) {
                *v /= *k;
            }
        }
        let bg = settings.background;
        let offset = usize::from(bg.is_some());
        let classes = n + offset;
        let ys = AxisWeights::new(h, out_h, Coordinates::HalfPixel);
        let xs = AxisWeights::new(w, out_w, Coordinates::HalfPixel);
        let mut labels = vec![0u16; out_h * out_w];
        let mut scores = settings
            .keep_scores
            .then(|| vec![0f32; classes * out_h * out_w]);
        let mut best_all = vec![0f32; out_h * out_w];
        let mut row = vec![0f32; out_w];
        let mut fused = vec![0f32; if logit_scale.is_some() { n * out_w } else { 0 }];
        for oy in 0..out_h {
            let best = &mut best_all[oy * out_w..(oy + 1) * out_w];
            best.fill(bg.unwrap_or(f32::NEG_INFINITY));
            let labels_row = &mut labels[oy * out_w..(oy + 1) * out_w];
            labels_row.fill(0);
            if let (Some(s), Some(v)) = (scores.as_mut(), bg) {
                s[oy * out_w..(oy + 1) * out_w].fill(v);
            }
            let (r0, r1) = (ys.lo[oy] * w, ys.hi[oy] * w);
            // Class c's averaged plane, resized, on output row oy.
            let resized_row = |c: usize, out: &mut [f32]| {
                let plane = &mean[c * h * w..(c + 1) * h * w];
                resample::interpolate_row(
                    &plane[r0..r0 + w],
                    &plane[r1..r1 + w],
                    ys.frac[oy],
                    &xs,
                    out,
                );
            };
            if let Some(scale) = logit_scale {
                for (c, out) in fused.chunks_exact_mut(out_w).enumerate() {
                    resized_row(c, out);
                    out.iter_mut().for_each(|v| *v *= scale);
                }
                softmax_over_planes(&mut fused, n, out_w);
            }
            for c in 0..n {
                if logit_scale.is_some() {
                    row.copy_from_slice(&fused[c * out_w..(c + 1) * out_w]);
                } else {
                    resized_row(c, &mut row);
                }
                let label = (c + offset) as u16;
                for ((b, l), v) in best.iter_mut().zip(labels_row.iter_mut()).zip(&row) {
                    // Strictly greater: the first class wins ties, as torch.argmax does.
                    if *v > *b || (c == 0 && bg.is_none()) {
                        *b = *v;
                        *l = label;
                    }
                }
                if let Some(s) = scores.as_mut() {
                    let at = ((c + offset) * out_h + oy) * out_w;
                    s[at..at + out_w].copy_from_slice(&row);
                }
            }
        }
        Ok(Segmentation {
            width: out_w,
            height: out_h,
            classes,
            labels,
            best: best_all,
            scores,
            query_thresholds: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_probabilities_are_a_softmax_of_scaled_cosines() {
        // Two classes, E = 2, one crop on a 1x1 grid: cos = (0.6, -0.8) against text rows e0 and e1.
        let text = TextEmbeddings {
            rows: 2,
            dim: 2,
            data: vec![1.0, 0.0, 0.0, 1.0],
            thresholds: vec![None, None],
        };
        let dense = vec![0.6, -0.8];
        let p = class_probabilities(&dense, 1, &text, 1, 2, 10.0);
        assert_eq!(p.len(), 2 * 4);
        let want0 = 1.0 / (1.0 + (-8.0f32 - 6.0).exp());
        for px in 0..4 {
            assert!((p[px] - want0).abs() < 1e-6, "{}", p[px]);
            assert!((p[px] + p[4 + px] - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn softmax_keeps_order_and_sums_to_one() {
        let mut planes = vec![1.0, 5.0, 3.0, 0.0];
        softmax_over_planes(&mut planes, 2, 2);
        assert!(planes[2] > planes[0] && planes[1] > planes[3]);
        assert!((planes[0] + planes[2] - 1.0).abs() < 1e-6);
        assert!((planes[1] + planes[3] - 1.0).abs() < 1e-6);
    }
}
