//! `tclseg models bench`: the engine's throughput and latency at several batch sizes on the same images.
//!
//! The images are decoded and the queries embedded once; per batch size b, one fixed batch (the images taken in
//! turn, cycling when there are fewer than b) goes through `warmup` untimed calls of `Engine::segment_batch`,
//! then `iterations` timed ones. Each batch size prints one JSON object on stdout; progress goes to the log.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use image::RgbImage;
use serde_json::json;

use tclseg::model::bundle::InputSpec;
use tclseg::model::preprocess;
use tclseg::model::{Engine, SegmentSettings, TextEmbeddings};
use tclseg::queries::QuerySet;
use tclseg::sink::files::{ImagePaths, OutputKinds, OutputWriter, SegmentedImage, SidecarInfo};
use tclseg::source::decode::decode;
use tclseg::source::inputs::{self, InputImage};

use super::segment::{log_model, open_engine, segment_settings};
use crate::cli::BenchArgs;

/// Queries when none are given.
const DEFAULT_QUERIES: [&str; 3] = ["red square", "blue circle", "green triangle"];

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    let batches = parse_batches(&args.batch)?;
    if args.iterations == 0 {
        bail!("--iterations 0: time at least one call");
    }
    let queries = match (&args.queries, args.query.is_empty()) {
        (Some(file), _) => QuerySet::from_file(file)?,
        (None, false) => QuerySet::from_names(&args.query)?,
        (None, true) => QuerySet::from_names(&DEFAULT_QUERIES.map(String::from))?,
    };
    let found = inputs::expand(&args.images)?;
    if found.is_empty() {
        bail!(
            "--images {}: no images found ({})",
            args.images.join(" "),
            inputs::IMAGE_EXTENSIONS.join(", ")
        );
    }
    let mut images: Vec<(InputImage, RgbImage)> = Vec::with_capacity(found.len());
    for input in found {
        let decoded = decode(&input.path, args.max_pixels)?;
        images.push((input, decoded));
    }
    tracing::info!("{} images decoded", images.len());

    let engine = open_engine(args.model.clone(), &args.engine)?;
    let settings = segment_settings(&engine, &queries, &args.refine, None, false)?;
    log_model(&engine, &settings);
    let text = engine.embed_queries(&queries.engine_queries())?;
    let input = engine.bundle().manifest().input.clone();
    let device = engine.device().name();

    for &b in &batches {
        let batch: Vec<&RgbImage> = (0..b).map(|k| &images[k % images.len()].1).collect();
        let crops: usize = batch.iter().map(|img| crop_count(img, &input)).sum();
        if let Some(dir) = &args.save_labels {
            save_labels(
                &engine,
                &images,
                b,
                &text,
                &settings,
                &queries,
                &dir.join(format!("b{b}")),
            )?;
        }
        tracing::info!(
            "batch {b}: {crops} crops per call, {} warm-up and {} timed calls",
            args.warmup,
            args.iterations
        );
        for _ in 0..args.warmup {
            engine
                .segment_batch(&batch, &text, &settings)
                .with_context(|| format!("batch {b}, warm-up call"))?;
        }
        let mut latencies_ms = Vec::with_capacity(args.iterations);
        for i in 0..args.iterations {
            let start = Instant::now();
            let out = engine
                .segment_batch(&batch, &text, &settings)
                .with_context(|| format!("batch {b}, timed call {}", i + 1))?;
            latencies_ms.push(start.elapsed().as_secs_f64() * 1e3);
            if out.len() != b {
                bail!("batch {b}: the engine returned {} results", out.len());
            }
        }
        let stats = LatencyStats::of(&latencies_ms);
        let seconds = latencies_ms.iter().sum::<f64>() / 1e3;
        let calls = args.iterations as f64;
        let line = json!({
            "batch": b,
            "images_per_call": b,
            "crops_per_call": crops,
            "calls": args.iterations,
            "warmup": args.warmup,
            "latency_ms": {
                "p50": stats.p50,
                "p95": stats.p95,
                "mean": stats.mean,
                "min": stats.min,
                "max": stats.max,
            },
            "images_per_s": calls * b as f64 / seconds,
            "crops_per_s": calls * crops as f64 / seconds,
            "device": device,
            "processing": engine.processing(),
            "precision": engine.precision().key(),
            "pamr": settings.pamr,
            "queries": text.rows,
            "model": engine.bundle().manifest().name,
            "model_sha256": engine.manifest_sha256(),
            "image_size": image_size(&batch),
        });
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `--batch 1,8,32` → [1, 8, 32]; every entry a whole number of at least 1.
fn parse_batches(list: &str) -> Result<Vec<usize>> {
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
fn crop_count(image: &RgbImage, input: &InputSpec) -> usize {
    preprocess::windows(image.height() as usize, image.width() as usize, input)
        .1
        .len()
}

/// [w, h] when every image of the batch has that size, else "mixed".
fn image_size(batch: &[&RgbImage]) -> serde_json::Value {
    let first = batch[0].dimensions();
    if batch.iter().all(|img| img.dimensions() == first) {
        json!([first.0, first.1])
    } else {
        json!("mixed")
    }
}

/// Segments every image once, in calls of `batch` images, and writes each label map as `segment` does.
fn save_labels(
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
                model: engine.model_info(),
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

#[derive(Debug, Clone, Copy, PartialEq)]
struct LatencyStats {
    p50: f64,
    p95: f64,
    mean: f64,
    min: f64,
    max: f64,
}

impl LatencyStats {
    /// Percentiles interpolate linearly between the sorted samples (numpy's default), so the Python harness's
    /// figures are computed the same way.
    fn of(samples: &[f64]) -> LatencyStats {
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
