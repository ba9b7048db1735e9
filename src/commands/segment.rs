//! `tclseg segment`: the batch runner with a progress bar (or log lines when stderr is not a terminal).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};

use tclseg::model::{resolve_bundle_dir, Engine, SegmentSettings, SettingsOverrides};
use tclseg::queries::QuerySet;
use tclseg::segment::{self, Outcome, OutputKinds, Progress, SegmentJob};
use tclseg::sink::overlay::OverlayFormat;

use crate::cli::{EngineArgs, RefineArgs, SegmentArgs};

pub fn run(args: SegmentArgs) -> Result<ExitCode> {
    let queries = match &args.queries {
        Some(file) => QuerySet::from_file(file)?,
        None => QuerySet::from_names(&args.query)?,
    };
    let outputs = parse_outputs(&args.format, args.overlay_format)?;
    let engine = open_engine(args.model.clone(), &args.engine)?;
    let settings = segment_settings(
        &engine,
        &queries,
        &args.refine,
        args.kp_weight,
        outputs.scores,
    )?;
    log_model(&engine, &settings);
    let job = SegmentJob {
        inputs: args.inputs,
        out_dir: args.out,
        queries,
        outputs,
        settings,
        batch: args.batch.max(1),
        jobs: args.jobs.max(1),
        force: args.force,
        max_failures: args.max_failures,
        max_pixels: args.max_pixels,
    };
    let display = Display::new();
    let summary = segment::run(&engine, &job, &display)?;
    display.finish();
    println!(
        "done {}, skipped {} (up to date), failed {}{}, {:.2} images/s in {:.1} s",
        summary.done,
        summary.skipped,
        summary.failed,
        if summary.not_attempted > 0 {
            format!(", not attempted {}", summary.not_attempted)
        } else {
            String::new()
        },
        summary.images_per_second,
        summary.seconds
    );
    if let Some(report) = &summary.report {
        println!("report: {}", report.display());
    }
    Ok(if summary.failed > 0 || summary.not_attempted > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Opens the bundle (`--model`, else the default: `model::resolve_bundle_dir`) and starts the engine on the
/// device and precision asked for.
pub(super) fn open_engine(model: Option<PathBuf>, args: &EngineArgs) -> Result<Engine> {
    Engine::open(&resolve_bundle_dir(model)?, args.options())
}

/// PAMR, background and kp weight from the command line, else the bundle's defaults (`SegmentSettings::resolve`).
pub(super) fn segment_settings(
    engine: &Engine,
    queries: &QuerySet,
    refine: &RefineArgs,
    kp_weight: Option<f32>,
    keep_scores: bool,
) -> Result<SegmentSettings> {
    let background_prompts = queries.has_background_prompts();
    if background_prompts && refine.bg_thresh.is_some() {
        bail!("--bg-thresh and background prompts exclude each other: choose one way to find background");
    }
    if let Some(k) = kp_weight.filter(|k| !(0.0..=1.0).contains(k)) {
        bail!("--kp-weight {k} is outside 0..1");
    }
    let overrides = SettingsOverrides {
        pamr: refine.pamr_override(),
        bg_thresh: refine.bg_thresh,
        kp_weight,
    };
    let resolved = SegmentSettings::resolve_head(
        engine.bundle().manifest(),
        refine.head.as_deref(),
        overrides,
        background_prompts,
    )
    .map_err(|e| anyhow::anyhow!("--head: {e}"))?;
    Ok(SegmentSettings {
        keep_scores,
        ..resolved
    })
}

/// One log line: model, device, precision, PAMR and background.
pub(super) fn log_model(engine: &Engine, settings: &SegmentSettings) {
    tracing::info!(
        "model {} v{} on {} ({}, {} processing), PAMR {}, background {}",
        engine.bundle().manifest().name,
        engine.bundle().manifest().version,
        engine.device().name(),
        engine.precision().key(),
        engine.processing(),
        if settings.pamr { "on" } else { "off" },
        settings
            .background
            .map_or("from prompts".to_string(), |t| format!("below {t}")),
    );
    let m = engine.bundle().manifest();
    let head = settings
        .head
        .or_else(|| m.find_head(None).ok())
        .and_then(|id| m.head(id));
    if let Some((name, _)) = head {
        tracing::info!("head {name} (the bundle has {})", m.head_names().join(", "));
    }
}

fn parse_outputs(format: &str, overlay: OverlayFormat) -> Result<OutputKinds> {
    let mut kinds = OutputKinds {
        labels: false,
        overlay: None,
        json: false,
        scores: false,
    };
    for part in format.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "labels" => kinds.labels = true,
            "overlay" => kinds.overlay = Some(overlay),
            "json" => kinds.json = true,
            "scores" => kinds.scores = true,
            other => {
                bail!("--format: unknown output '{other}' (known: labels, overlay, json, scores)")
            }
        }
    }
    if !(kinds.labels || kinds.overlay.is_some() || kinds.json || kinds.scores) {
        bail!("--format names no output");
    }
    Ok(kinds)
}

/// Progress: an indicatif bar on a terminal, else a log line at most every 10 s.
struct Display {
    bar: std::sync::OnceLock<ProgressBar>,
    state: Mutex<(usize, usize, Instant)>,
}

impl Display {
    fn new() -> Display {
        Display {
            bar: std::sync::OnceLock::new(),
            state: Mutex::new((0, 0, Instant::now())),
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.get() {
            bar.finish_and_clear();
        }
    }
}

impl Progress for Display {
    fn start(&self, total: usize, skipped: usize) {
        if skipped > 0 {
            tracing::info!("{skipped} images are up to date and skipped (--force redoes them)");
        }
        if let Ok(mut s) = self.state.lock() {
            *s = (0, total, Instant::now());
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(250));
            let _ = self.bar.set(bar);
        } else {
            tracing::info!("segmenting {total} images");
        }
    }

    fn image_done(&self, outcome: &Outcome) {
        if let Some(bar) = self.bar.get() {
            bar.inc(1);
            return;
        }
        let Ok(mut s) = self.state.lock() else { return };
        s.0 += 1;
        let (done, total, last) = *s;
        if last.elapsed() >= Duration::from_secs(10) || done == total {
            tracing::info!(
                "{done}/{total} images ({})",
                if outcome.ok { "ok" } else { "failed" }
            );
            s.2 = Instant::now();
        }
    }
}
