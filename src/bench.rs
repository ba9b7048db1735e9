//! The `models bench` measurement: the engine's latency and throughput on one fixed batch of images.
//!
//! It lives in the library, beside `segment` and `eval`, so the command only parses flags, decodes and prints; the
//! timing rule (untimed warm-up calls, then timed ones on the same batch) and the statistics are here, once, and
//! testable without the binary. Percentiles follow numpy's default so the Python harness
//! (`trainer/tclseg_trainer/tools/bench_gpu.py`) reads the same figures.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use image::RgbImage;

use crate::model::bundle::InputSpec;
use crate::model::preprocess;
use crate::model::{Engine, SegmentSettings, TextEmbeddings};
use crate::queries::QuerySet;
use crate::sink::encode::{ImagePaths, OutputKinds, SegmentedImage, SidecarInfo};
use crate::sink::files::OutputWriter;
use crate::source::inputs::InputImage;

/// One batch size's figures: what a bench line reports about the calls themselves.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchTiming {
    pub images_per_call: usize,
    pub crops_per_call: usize,
    pub calls: usize,
    pub latency_ms: LatencyStats,
    pub images_per_s: f64,
    pub crops_per_s: f64,
}

/// Runs `warmup` untimed and `iterations` timed calls of `Engine::segment_batch` on `batch` for each of `runs`
/// (query embeddings and settings: a head each), call by call in turn: a change of the machine's load during
/// the measurement falls on every run alike, so their ratio holds where the absolute figures drift. Returns one
/// timing per run, in order.
pub fn time_batch(
    engine: &Engine,
    batch: &[&RgbImage],
    runs: &[(&TextEmbeddings, &SegmentSettings)],
    warmup: usize,
    iterations: usize,
) -> Result<Vec<BatchTiming>> {
    let b = batch.len();
    if iterations == 0 {
        bail!("--iterations 0: time at least one call");
    }
    let input = &engine.bundle().manifest().input;
    let crops: usize = batch.iter().map(|img| crop_count(img, input)).sum();
    tracing::info!(
        "batch {b}: {crops} crops per call, {warmup} warm-up and {iterations} timed calls of each of {} runs",
        runs.len()
    );
    for _ in 0..warmup {
        for (text, settings) in runs {
            engine
                .segment_batch(batch, text, settings)
                .with_context(|| format!("batch {b}, warm-up call"))?;
        }
    }
    let mut latencies_ms = vec![Vec::with_capacity(iterations); runs.len()];
    for i in 0..iterations {
        for ((text, settings), latencies) in runs.iter().zip(&mut latencies_ms) {
            let start = Instant::now();
            let out = engine
                .segment_batch(batch, text, settings)
                .with_context(|| format!("batch {b}, timed call {}", i + 1))?;
            latencies.push(start.elapsed().as_secs_f64() * 1e3);
            if out.len() != b {
                bail!("batch {b}: the engine returned {} results", out.len());
            }
        }
    }
    Ok(latencies_ms
        .iter()
        .map(|latencies| {
            let seconds = latencies.iter().sum::<f64>() / 1e3;
            let calls = iterations as f64;
            BatchTiming {
                images_per_call: b,
                crops_per_call: crops,
                calls: iterations,
                latency_ms: LatencyStats::of(latencies),
                images_per_s: calls * b as f64 / seconds,
                crops_per_s: calls * crops as f64 / seconds,
            }
        })
        .collect())
}

/// `--batch 1,8,32` → [1, 8, 32]; every entry a whole number of at least 1.
pub fn parse_batches(list: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim) {
        let n: usize = part.parse().map_err(|_| {
            anyhow::anyhow!(
                "--batch {list}: '{part}' is not a whole number (give images per call, comma-separated, e.g. 1,8,32)"
            )
        })?;
        if n == 0 {
            bail!("--batch {list}: a batch size must be at least 1");
        }
        out.push(n);
    }
    Ok(out)
}

/// Sliding-window crops of one image after the engine's rescale.
pub fn crop_count(image: &RgbImage, input: &InputSpec) -> usize {
    preprocess::windows(image.height() as usize, image.width() as usize, input)
        .1
        .len()
}

/// Segments every image once, in calls of `batch` images, and writes each label map as `segment` does
/// (`<dir>/<relative path>.png`), so two runs' labels can be compared file by file.
pub fn save_labels(
    engine: &Engine,
    images: &[(InputImage, RgbImage)],
    batch: usize,
    text: &TextEmbeddings,
    settings: &SegmentSettings,
    queries: &QuerySet,
    dir: &Path,
) -> Result<()> {
    let files = OutputWriter::new(None);
    let kinds = OutputKinds {
        labels: true,
        ..OutputKinds::default()
    };
    for chunk in images.chunks(batch) {
        let refs: Vec<&RgbImage> = chunk.iter().map(|(_, img)| img).collect();
        let segs = engine.segment_batch(&refs, text, settings)?;
        for ((input, image), seg) in chunk.iter().zip(&segs) {
            let paths = ImagePaths {
                base: dir.join(&input.relative),
                labels_suffix: "png",
            };
            let segmented = SegmentedImage {
                image,
                segmentation: seg,
                queries,
                settings,
            };
            let owner = input.path.display().to_string();
            let info = SidecarInfo {
                image: owner.clone(),
                frame: None,
                captured: None,
                model: engine.model_info(settings),
                decode_ms: 0.0,
                inference_ms: 0.0,
            };
            files
                .write_image(&owner, &paths, &segmented, &kinds, info)
                .with_context(|| format!("--save-labels: {}", input.path.display()))?;
        }
    }
    tracing::info!(
        "label maps of {} images written to {}",
        images.len(),
        dir.display()
    );
    Ok(())
}

/// Latency summary of the timed calls, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyStats {
    pub p50: f64,
    pub p95: f64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

impl LatencyStats {
    /// Percentiles interpolate linearly between the sorted samples (numpy's default), so the Python harness's
    /// figures are computed the same way. `samples` must not be empty (`time_batch` refuses zero iterations).
    pub fn of(samples: &[f64]) -> LatencyStats {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let percentile = |p: f64| {
            let rank = p / 100.0 * (sorted.len() - 1) as f64;
            let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        };
        LatencyStats {
            p50: percentile(50.0),
            p95: percentile(95.0),
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_lists_parse_and_bad_ones_name_the_flag() {
        assert_eq!(parse_batches("1,8,32").expect("parse"), [1, 8, 32]);
        assert_eq!(parse_batches(" 4 , 2").expect("parse"), [4, 2]);
        for bad in ["0", "1,0", "x", "", "1,,2", "-1", "2.5"] {
            let err = parse_batches(bad).expect_err(bad).to_string();
            assert!(err.starts_with("--batch"), "{bad}: {err}");
        }
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        // numpy.percentile([4, 1, 3, 2, 10], [50, 95]) == [3.0, 8.8]
        let s = LatencyStats::of(&[4.0, 1.0, 3.0, 2.0, 10.0]);
        assert_eq!(s.p50, 3.0);
        assert!((s.p95 - 8.8).abs() < 1e-12, "{}", s.p95);
        assert_eq!((s.min, s.max, s.mean), (1.0, 10.0, 4.0));
        let one = LatencyStats::of(&[7.5]);
        assert_eq!((one.p50, one.p95), (7.5, 7.5));
    }

    #[test]
    fn crops_are_counted_after_the_rescale() {
        let input = InputSpec::official();
        // 1920x1080 → 448x796: columns at 0, 224 and the last one pushed back to 348.
        assert_eq!(crop_count(&RgbImage::new(1920, 1080), &input), 3);
        assert_eq!(crop_count(&RgbImage::new(64, 64), &input), 1);
        // 61x45 → 448x607: two columns.
        assert_eq!(crop_count(&RgbImage::new(61, 45), &input), 2);
    }
}
