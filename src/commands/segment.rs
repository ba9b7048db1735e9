//! `tclseg segment`: the batch runner with a progress bar (or log lines when stderr is not a terminal).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};

use tclseg::model::bundle::{Bundle, TCL_PROTOCOL};
use tclseg::model::{resolve_bundle_dir, Engine, SegmentSettings, SettingsOverrides};
use tclseg::queries::QuerySet;
use tclseg::segment::{self, Outcome, OutputKinds, Progress, SegmentJob};
use tclseg::shard::{self, Shard};
use tclseg::sink::overlay::OverlayFormat;

use crate::cli::{BatchShardArgs, EngineArgs, RefineArgs, SegmentArgs};

pub fn run(args: SegmentArgs) -> Result<ExitCode> {
    // Before the model loads: a shard the environment does not name is an error at once.
    let shard = batch_shard(&args.shard)?;
    let queries = match &args.queries {
        Some(file) => QuerySet::from_file(file)?,
        None => QuerySet::from_names(&args.query)?,
    };
    let outputs = parse_outputs(&args.format, args.overlay_format)?;
    let engine = open_engine(args.model.clone(), &args.engine, &args.refine, None)?;
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
        shard,
    };
    let display = Display::new();
    let summary = segment::run(&engine, &job, &display)?;
    display.finish();
    println!(
        "{}done {}, skipped {} (up to date), failed {}{}, {:.2} images/s in {:.1} s",
        shard.map_or(String::new(), |s| format!(
            "shard {s} ({} of {} images): ",
            summary.images, summary.all_images
        )),
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

/// The shard a batch command takes (`--shard`, `--shards`), None without `--shard`.
pub(super) fn batch_shard(args: &BatchShardArgs) -> Result<Option<Shard>> {
    args.shard
        .as_deref()
        .map(|arg| shard::batch_shard(arg, args.shards, &|name| std::env::var(name).ok()))
        .transpose()
}

/// `tclseg merge-reports DIR`: the totals of a sharded run and what is left to do; exit status 1 unless every
/// shard finished with nothing failed.
pub(super) fn merge_reports(dir: &std::path::Path, shards: Option<u32>) -> Result<ExitCode> {
    let m = segment::merge_reports(dir, shards)?;
    let n = m.count;
    println!(
        "{} of {n} shards finished: done {}, skipped {} (up to date), failed {}, not attempted {} of {} images",
        m.finished.len(),
        m.done,
        m.skipped,
        m.failed,
        m.not_attempted,
        m.images
    );
    if m.all_images.len() > 1 {
        println!(
            "note: the shards saw input sets of different sizes ({} images): files were added or removed while \
             they ran; run every shard again to take the new ones (what is done is skipped)",
            m.all_images
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for i in &m.missing {
        println!(
            "shard {i}/{n}: missing (no {}): run it with --shard {i}/{n}",
            segment::report_name(Some(&Shard {
                index: *i,
                count: n
            }))
        );
    }
    for i in &m.unfinished {
        println!(
            "shard {i}/{n}: started but did not finish (killed, or still running): run it again with --shard \
             {i}/{n}; it resumes where it stopped"
        );
    }
    for (i, failed, not_attempted) in &m.incomplete {
        println!(
            "shard {i}/{n}: {failed} images failed, {not_attempted} not attempted: see its report; a rerun \
             with --shard {i}/{n} tries them again"
        );
    }
    for (i, why) in &m.unreadable {
        println!("shard {i}/{n}: its report cannot be used: {why}");
    }
    for failure in m.failures.iter().take(20) {
        println!(
            "failed: {}",
            failure.error.as_deref().unwrap_or(&failure.image)
        );
    }
    if m.failures.len() > 20 {
        println!(
            "... and {} more failures (see the shards' reports)",
            m.failures.len() - 20
        );
    }
    Ok(if m.complete() {
        println!("complete: every shard finished and nothing failed");
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Opens the bundle (`--model`, else the default: `model::resolve_bundle_dir`) as `--protocol` runs it (for
/// `dataset`, eval's dataset name, where the protocol has settings per dataset) and starts the engine on the
/// device and precision asked for.
pub(super) fn open_engine(
    model: Option<PathBuf>,
    args: &EngineArgs,
    refine: &RefineArgs,
    dataset: Option<&str>,
) -> Result<Engine> {
    let bundle = Bundle::open(&resolve_bundle_dir(model)?)?;
    let bundle = apply_protocol(bundle, refine, dataset)?;
    Engine::new(bundle, args.options())
}

/// The bundle under `--protocol` (default "tcl": unchanged). A method's protocol runs its own head: a different
/// `--head` is refused, and so is `--pamr` (the methods refine their whole-image logits; see
/// `Manifest::with_protocol`).
pub(super) fn apply_protocol(
    bundle: Bundle,
    refine: &RefineArgs,
    dataset: Option<&str>,
) -> Result<Bundle> {
    let name = refine.protocol.as_deref().unwrap_or(TCL_PROTOCOL);
    if name == TCL_PROTOCOL {
        return Ok(bundle);
    }
    if let Some(spec) = bundle.manifest().protocols.get(name) {
        if let Some(head) = refine.head.as_deref().filter(|h| *h != spec.head) {
            bail!(
                "--protocol {name} runs head '{}', not --head {head}",
                spec.head
            );
        }
    }
    if refine.pamr {
        bail!(
            "--pamr under --protocol {name}: the method's PAMR refines its whole-image logits, which the bundle \
             does not do; leave --pamr out"
        );
    }
    bundle
        .with_protocol(name, dataset)
        .map_err(|e| anyhow::anyhow!("--protocol: {e}"))
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
        "model {} v{} on {} ({}: {}; {}; {} processing), PAMR {}, background {}",
        engine.bundle().manifest().name,
        engine.bundle().manifest().version,
        engine.device().name(),
        engine.precision().key(),
        engine.precision_reason(),
        engine.kernels(),
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
    // Say where the bundle's per-word thresholds hold, so a word labelled background under its own line is no
    // surprise (and where they do not, why).
    let calibrated = &m.mask.query_thresholds;
    if !calibrated.is_empty() {
        let words: Vec<String> = calibrated.iter().map(|(w, t)| format!("{w} {t}")).collect();
        if settings.query_thresholds {
            tracing::info!(
                "per-word thresholds of the bundle, for queries prompted with its templates: {}",
                words.join(", ")
            );
        } else {
            tracing::info!(
                "the bundle's per-word thresholds ({}) are off: they hold with PAMR on, the bundle's own \
                 background threshold and no background prompts",
                words.join(", ")
            );
        }
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
