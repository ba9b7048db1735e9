//! `tclseg models bench`: the engine's throughput and latency at several batch sizes on the same images.
//!
//! The images are decoded and the queries embedded once; per batch size b, one fixed batch (the images taken in
//! turn, cycling when there are fewer than b) is timed by `tclseg::bench::time_batch` (untimed warm-up calls,
//! then timed ones; with `--against HEAD`, that head's calls in turn with --head's, and their crops/s ratio).
//! Each batch size prints one JSON object on stdout; progress goes to the log.

use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use image::RgbImage;
use serde_json::json;

use tclseg::bench::{parse_batches, save_labels, time_batch};
use tclseg::model::{SegmentSettings, SettingsOverrides};
use tclseg::queries::QuerySet;
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

    let engine = open_engine(args.model.clone(), &args.engine, &args.refine, None)?;
    let settings = segment_settings(&engine, &queries, &args.refine, None, false)?;
    log_model(&engine, &settings);
    // The reference head takes its own threshold, and PAMR as --pamr/--no-pamr say (else its own default), so
    // `--pamr` or `--no-pamr` compares like for like.
    let reference = args
        .against
        .as_deref()
        .map(|head| {
            SegmentSettings::resolve_head(
                engine.bundle().manifest(),
                Some(head),
                SettingsOverrides {
                    pamr: args.refine.pamr_override(),
                    ..SettingsOverrides::default()
                },
                queries.has_background_prompts(),
            )
            .map_err(|e| anyhow!("--against: {e}"))
        })
        .transpose()?;
    let text = engine.embed_queries(&queries.engine_queries())?;
    let device = engine.device().name();

    for &b in &batches {
        let batch: Vec<&RgbImage> = (0..b).map(|k| &images[k % images.len()].1).collect();
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
        let mut runs = vec![(&*text, &settings)];
        runs.extend(reference.as_ref().map(|r| (&*text, r)));
        let timings = time_batch(&engine, &batch, &runs, args.warmup, args.iterations)?;
        let timing = &timings[0];
        let stats = timing.latency_ms;
        let mut line = json!({
            "batch": b,
            "images_per_call": timing.images_per_call,
            "crops_per_call": timing.crops_per_call,
            "calls": timing.calls,
            "warmup": args.warmup,
            "latency_ms": {
                "p50": stats.p50,
                "p95": stats.p95,
                "mean": stats.mean,
                "min": stats.min,
                "max": stats.max,
            },
            "images_per_s": timing.images_per_s,
            "crops_per_s": timing.crops_per_s,
            "device": device,
            "processing": engine.processing(),
            "precision": engine.precision().key(),
            "precision_reason": engine.precision_reason(),
            "kernels": engine.kernels(),
            "cpu_flags": engine.cpu_features().names(),
            "pamr": settings.pamr,
            "queries": text.rows,
            "model": engine.bundle().manifest().name,
            "model_sha256": engine.manifest_sha256(),
            "head": engine.head_name(&settings),
            "image_size": image_size(&batch),
        });
        if let (Some(r), Some(t)) = (&reference, timings.get(1)) {
            line["against"] = json!({
                "head": engine.head_name(r),
                "pamr": r.pamr,
                "crops_per_s": t.crops_per_s,
                "latency_ms": { "p50": t.latency_ms.p50, "mean": t.latency_ms.mean },
            });
            line["crops_per_s_ratio"] = json!(timing.crops_per_s / t.crops_per_s);
        }
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
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
