//! `tclseg models bench`: the engine's throughput and latency at several batch sizes on the same images.
//!
//! The images are decoded and the queries embedded once; per batch size b, one fixed batch (the images taken in
//! turn, cycling when there are fewer than b) is timed by `tclseg::bench::time_batch` (untimed warm-up calls,
//! then timed ones). Each batch size prints one JSON object on stdout; progress goes to the log.

use std::process::ExitCode;

use anyhow::{bail, Result};
use image::RgbImage;
use serde_json::json;

use tclseg::bench::{parse_batches, save_labels, time_batch};
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
        let timing = time_batch(
            &engine,
            &batch,
            &text,
            &settings,
            args.warmup,
            args.iterations,
        )?;
        let stats = timing.latency_ms;
        let line = json!({
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
            "image_size": image_size(&batch),
        });
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
