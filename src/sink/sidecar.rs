//! The JSON sidecar written next to each label map: what was asked, what was found, by which model, how fast.

use std::collections::BTreeMap;

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
    /// The bundle's per-word thresholds that applied, by query name (absent when none did).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub query_thresholds: BTreeMap<String, f32>,
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

/// What one output label covers in a frame: the statistics both the sidecar and the events layer report. Events
/// need only these, so they are computed apart from the COCO RLE (a second pass per label that only the sidecar
/// wants); [`class_results`] adds prompts and RLE on top of exactly these values.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassStats {
    pub label: u16,
    /// The query's name (`background` for label 0).
    pub name: String,
    pub pixel_fraction: f64,
    /// Mean winning score over the pixels with this label (None when it has none).
    pub mean_score: Option<f64>,
    /// [x, y, width, height] of the labelled pixels (None when none).
    pub bbox: Option<[usize; 4]>,
}

/// Per output label of `queries`: name, pixel fraction, mean winning score and bounding box, in one pass over
/// the label map (`labels` and `best` row-major, `width` pixels a row).
pub fn class_statistics(
    queries: &QuerySet,
    labels: &[u16],
    best: &[f32],
    width: usize,
) -> Vec<ClassStats> {
    struct Acc {
        pixels: usize,
        scored: usize,
        score_sum: f64,
        min: [usize; 2],
        max: [usize; 2],
    }
    let label_count = queries.label_count();
    let mut acc: Vec<Acc> = (0..label_count)
        .map(|_| Acc {
            pixels: 0,
            scored: 0,
            score_sum: 0.0,
            min: [usize::MAX; 2],
            max: [0; 2],
        })
        .collect();
    let width = width.max(1);
    for (i, &l) in labels.iter().enumerate() {
        let Some(a) = acc.get_mut(usize::from(l)) else {
            continue;
        };
        let (x, y) = (i % width, i / width);
        a.pixels += 1;
        a.min = [a.min[0].min(x), a.min[1].min(y)];
        a.max = [a.max[0].max(x), a.max[1].max(y)];
        if let Some(&s) = best.get(i) {
            a.score_sum += f64::from(s);
            a.scored += 1;
        }
    }
    acc.iter()
        .enumerate()
        .map(|(label, a)| {
            let label = label as u16;
            ClassStats {
                label,
                name: class_name(queries, label),
                pixel_fraction: if labels.is_empty() {
                    0.0
                } else {
                    a.pixels as f64 / labels.len() as f64
                },
                mean_score: (a.scored > 0).then(|| a.score_sum / a.scored as f64),
                bbox: (a.pixels > 0).then(|| {
                    [
                        a.min[0],
                        a.min[1],
                        a.max[0] - a.min[0] + 1,
                        a.max[1] - a.min[1] + 1,
                    ]
                }),
            }
        })
        .collect()
}

/// The queries that map to `label` (several prompts of one name share it).
fn specs_of(queries: &QuerySet, label: u16) -> impl Iterator<Item = &QuerySpec> {
    queries
        .specs
        .iter()
        .zip(&queries.labels)
        .filter(move |(_, &l)| l == label)
        .map(|(s, _)| s)
}

fn class_name(queries: &QuerySet, label: u16) -> String {
    match (label, specs_of(queries, label).next()) {
        (0, _) => "background".to_string(),
        (_, Some(s)) => s.name.trim().to_string(),
        _ => String::new(),
    }
}

/// COCO RLE of the pixels labelled `label`.
pub fn class_rle(labels: &[u16], width: usize, height: usize, label: u16) -> Rle {
    let counts = rle::counts(|i| labels[i] == label, width, height);
    Rle {
        size: [height, width],
        counts: rle::compress(&counts),
    }
}

/// Per output label of `queries`: [`class_statistics`], plus the prompts and the COCO RLE.
pub fn class_results(
    queries: &QuerySet,
    labels: &[u16],
    best: &[f32],
    width: usize,
    height: usize,
) -> Vec<ClassResult> {
    class_statistics(queries, labels, best, width)
        .into_iter()
        .map(|s| ClassResult {
            label: s.label,
            prompts: specs_of(queries, s.label)
                .flat_map(|q| q.prompts.clone())
                .collect(),
            rle: class_rle(labels, width, height, s.label),
            name: s.name,
            pixel_fraction: s.pixel_fraction,
            mean_score: s.mean_score,
            bbox: s.bbox,
        })
        .collect()
}

impl ClassResult {
    /// The statistics part, as [`class_statistics`] computes it.
    pub fn stats(&self) -> ClassStats {
        ClassStats {
            label: self.label,
            name: self.name.clone(),
            pixel_fraction: self.pixel_fraction,
            mean_score: self.mean_score,
            bbox: self.bbox,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queries() -> QuerySet {
        QuerySet::from_names(&["a".to_string(), "b".to_string()]).expect("queries")
    }

    #[test]
    fn stats_of_a_small_map() {
        let labels = [0u16, 1, 1, 0, 1, 0];
        let best = [0.5f32, 0.25, 0.75, 0.5, 1.0, 0.5];
        let stats = class_statistics(&queries(), &labels, &best, 3);
        assert_eq!(stats.len(), 3);
        let a = &stats[1];
        assert_eq!(a.name, "a");
        assert!((a.pixel_fraction - 0.5).abs() < 1e-12);
        assert_eq!(a.bbox, Some([1, 0, 2, 2]));
        assert_eq!(a.mean_score, Some(2.0 / 3.0));
        assert_eq!(class_rle(&labels, 3, 2, 1).counts, "231");
        let b = &stats[2];
        assert_eq!((b.pixel_fraction, b.bbox, b.mean_score), (0.0, None, None));
        assert_eq!(stats[0].name, "background");
    }

    /// Events take `class_statistics` where no sidecar is written; the sidecar's class results must report the
    /// very same values, and both must match a plain per-label count.
    #[test]
    fn sidecar_and_events_statistics_are_identical() {
        let (w, h) = (13usize, 7usize);
        let mut state = 12345u32;
        let mut next = || {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            state >> 16
        };
        // Label 2 only in a corner block, so its box is not the whole image.
        let labels: Vec<u16> = (0..w * h)
            .map(|i| {
                let (x, y) = (i % w, i / w);
                if x >= 9 && y >= 4 {
                    2
                } else {
                    (next() % 2) as u16
                }
            })
            .collect();
        let best: Vec<f32> = (0..w * h)
            .map(|_| (next() % 1000) as f32 / 1000.0)
            .collect();
        let q = queries();
        let without_rle = class_statistics(&q, &labels, &best, w);
        let from_sidecar: Vec<ClassStats> = class_results(&q, &labels, &best, w, h)
            .iter()
            .map(ClassResult::stats)
            .collect();
        assert_eq!(without_rle, from_sidecar);
        for s in &without_rle {
            let mine: Vec<usize> = (0..w * h).filter(|&i| labels[i] == s.label).collect();
            assert!((s.pixel_fraction - mine.len() as f64 / (w * h) as f64).abs() < 1e-12);
            let xs = mine.iter().map(|i| i % w);
            let ys = mine.iter().map(|i| i / w);
            let (x0, x1) = (xs.clone().min(), xs.max());
            let (y0, y1) = (ys.clone().min(), ys.max());
            let bbox = match (x0, x1, y0, y1) {
                (Some(x0), Some(x1), Some(y0), Some(y1)) => {
                    Some([x0, y0, x1 - x0 + 1, y1 - y0 + 1])
                }
                _ => None,
            };
            assert_eq!(s.bbox, bbox, "label {}", s.label);
            let sum: f64 = mine.iter().map(|&i| f64::from(best[i])).sum();
            let mean = (!mine.is_empty()).then(|| sum / mine.len() as f64);
            match (s.mean_score, mean) {
                (Some(a), Some(b)) => assert!((a - b).abs() < 1e-9, "label {}", s.label),
                (a, b) => assert_eq!(a, b, "label {}", s.label),
            }
        }
        assert_eq!(without_rle[2].bbox, Some([9, 4, 4, 3]));
    }
}
