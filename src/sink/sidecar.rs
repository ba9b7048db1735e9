//! The JSON sidecar written next to each label map: what was asked, what was found, by which model, how fast.

use serde::Serialize;

use super::rle;
pub use crate::model::info::ModelInfo;
use crate::queries::{QuerySet, QuerySpec};

#[derive(Debug, Serialize)]
pub struct Sidecar {
    pub image: String,
    /// Daemon outputs: which pipeline and frame this is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame: Option<FrameInfo>,
    pub width: usize,
    pub height: usize,
    pub model: ModelInfo,
    pub settings: SettingsInfo,
    /// Class 0 is the background when `settings.background` is set.
    pub classes: Vec<ClassResult>,
    pub timings_ms: Timings,
}

#[derive(Debug, Clone, Serialize)]
pub struct FrameInfo {
    pub pipeline: String,
    /// The source URI, credentials redacted.
    pub source: String,
    pub sequence: u64,
    /// Stream time (GStreamer PTS) in ns, when the source has one.
    pub pts_ns: Option<u64>,
    /// Wall time the frame was received, ms since the Unix epoch.
    pub wall_ms: u64,
    /// Capture → written, ms (the sidecar itself is the last file written).
    pub latency_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct SettingsInfo {
    pub pamr: bool,
    pub kp_weight: f32,
    pub background: Option<f32>,
}

#[derive(Debug, Serialize)]
pub struct ClassResult {
    pub label: u16,
    pub name: String,
    pub prompts: Vec<String>,
    pub pixel_fraction: f64,
    /// Mean soft score over the pixels with this label (null when it has none).
    pub mean_score: Option<f64>,
    /// [x, y, width, height] of the labelled pixels (null when none).
    pub bbox: Option<[usize; 4]>,
    pub rle: Rle,
}

#[derive(Debug, Serialize)]
pub struct Rle {
    /// [height, width], as COCO writes it.
    pub size: [usize; 2],
    pub counts: String,
}

#[derive(Debug, Serialize)]
pub struct Timings {
    pub decode: f64,
    pub inference: f64,
    pub write: f64,
}

/// Pixel statistics of one label: fraction, bounding box and COCO RLE.
pub fn class_stats(
    labels: &[u16],
    width: usize,
    height: usize,
    label: u16,
) -> (f64, Option<[usize; 4]>, Rle) {
    let (mut n, mut x0, mut y0, mut x1, mut y1) = (0usize, usize::MAX, usize::MAX, 0usize, 0usize);
    for (i, _) in labels.iter().enumerate().filter(|(_, &l)| l == label) {
        let (y, x) = (i / width, i % width);
        n += 1;
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    let bbox = (n > 0).then(|| [x0, y0, x1 - x0 + 1, y1 - y0 + 1]);
    let counts = rle::counts(|i| labels[i] == label, width, height);
    let fraction = if labels.is_empty() {
        0.0
    } else {
        n as f64 / labels.len() as f64
    };
    (
        fraction,
        bbox,
        Rle {
            size: [height, width],
            counts: rle::compress(&counts),
        },
    )
}

/// Per output label of `queries`: name, prompts, pixel fraction, mean winning score, bounding box and COCO RLE.
pub fn class_results(
    queries: &QuerySet,
    labels: &[u16],
    best: &[f32],
    width: usize,
    height: usize,
) -> Vec<ClassResult> {
    let label_count = queries.label_count();
    let mut sums = vec![(0f64, 0usize); label_count];
    for (&l, &s) in labels.iter().zip(best) {
        if let Some(e) = sums.get_mut(l as usize) {
            e.0 += f64::from(s);
            e.1 += 1;
        }
    }
    (0..label_count as u16)
        .map(|label| {
            let (fraction, bbox, rle) = class_stats(labels, width, height, label);
            let specs: Vec<&QuerySpec> = queries
                .specs
                .iter()
                .zip(&queries.labels)
                .filter(|(_, &l)| l == label)
                .map(|(s, _)| s)
                .collect();
            let name = match (label, specs.first()) {
                (0, _) => "background".to_string(),
                (_, Some(s)) => s.name.trim().to_string(),
                _ => String::new(),
            };
            let (sum, count) = sums[label as usize];
            ClassResult {
                label,
                name,
                prompts: specs.iter().flat_map(|s| s.prompts.clone()).collect(),
                pixel_fraction: fraction,
                mean_score: (count > 0).then(|| sum / count as f64),
                bbox,
                rle,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_a_small_map() {
        let labels = [0u16, 1, 1, 0, 1, 0];
        let (fraction, bbox, rle) = class_stats(&labels, 3, 2, 1);
        assert!((fraction - 0.5).abs() < 1e-12);
        assert_eq!(bbox, Some([1, 0, 2, 2]));
        assert_eq!(rle.counts, "231");
        let (fraction, bbox, _) = class_stats(&labels, 3, 2, 7);
        assert_eq!((fraction, bbox), (0.0, None));
    }
}
