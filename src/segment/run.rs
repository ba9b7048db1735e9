//! The runner behind `tclseg segment`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context, Result};
use crossbeam::channel::{bounded, Receiver, Sender};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::model::{Engine, SegmentSettings, Segmentation};
use crate::queries::QuerySet;
use crate::shard::{path_key, Shard};
use crate::sink::atomic::temp_file_in;
pub use crate::sink::encode::OutputKinds;
use crate::sink::encode::{ImagePaths, SegmentedImage, SidecarInfo};
use crate::sink::files::OutputWriter;
use crate::sink::paths::{self, Overlap};
use crate::sink::write_atomic;
use crate::source::decode::decode;
use crate::source::inputs::{self, InputImage};

pub struct SegmentJob {
    pub inputs: Vec<String>,
    pub out_dir: PathBuf,
    pub queries: QuerySet,
    pub outputs: OutputKinds,
    pub settings: SegmentSettings,
    /// Images per engine call.
    pub batch: usize,
    /// Decoder threads.
    pub jobs: usize,
    pub force: bool,
    /// Stop after this many failed images (None: never stop).
    pub max_failures: Option<usize>,
    pub max_pixels: u64,
    /// Only this shard's share of the inputs (by the hash of each image's path under its root:
    /// `shard::Shard::owns`); the report is then `segment-report.<I>-of-<N>.json`.
    pub shard: Option<Shard>,
}

/// Callbacks for a progress display; the library itself prints nothing.
pub trait Progress: Send + Sync {
    fn start(&self, total: usize, skipped: usize);
    fn image_done(&self, outcome: &Outcome);
}

/// What happened to one image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub image: String,
    pub ok: bool,
    pub error: Option<String>,
}

/// Totals of a run; also written to `<out>/segment-report.json` (a shard's: `segment-report.<I>-of-<N>.json`,
/// which `merge_reports` reads back).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// The shard this run took (None: all the inputs).
    #[serde(default)]
    pub shard: Option<Shard>,
    /// False in the report a shard writes when it starts, so a shard killed on the way is told from one that
    /// never ran; true once the run has ended.
    #[serde(default = "finished_default")]
    pub finished: bool,
    /// The images of the whole input set, before the split into shards.
    #[serde(default)]
    pub all_images: usize,
    /// The images this run had to do (its shard's share): done + skipped + failed + not attempted.
    #[serde(default)]
    pub images: usize,
    pub done: usize,
    pub skipped: usize,
    pub failed: usize,
    pub not_attempted: usize,
    pub seconds: f64,
    pub images_per_second: f64,
    pub failures: Vec<Outcome>,
    pub report: Option<PathBuf>,
}

fn finished_default() -> bool {
    true
}

/// The report's file name: `segment-report.json`, or a shard's `segment-report.<I>-of-<N>.json`.
pub fn report_name(shard: Option<&Shard>) -> String {
    match shard {
        Some(s) => format!("segment-report.{}.json", s.file_tag()),
        None => "segment-report.json".into(),
    }
}

struct Decoded {
    input: InputImage,
    image: Result<RgbImage, String>,
    decode_ms: f64,
}

struct ToWrite {
    input: InputImage,
    image: RgbImage,
    segmentation: Segmentation,
    decode_ms: f64,
    inference_ms: f64,
}

/// Runs a segmentation job. Errors are returned only for problems with the job itself (no inputs, output folder
/// unusable, bad queries); per-image problems are counted in the summary.
pub fn run(engine: &Engine, job: &SegmentJob, progress: &dyn Progress) -> Result<Summary> {
    let start = Instant::now();
    let all = inputs::expand(&job.inputs)?;
    if all.is_empty() {
        bail!("no images found in {}", job.inputs.join(", "));
    }
    refuse_output_inside_input(&job.out_dir, &all)?;
    paths::ensure_output_dir(&job.out_dir, "--out")?;
    probe_writable(&job.out_dir)?;
    let report = job.out_dir.join(report_name(job.shard.as_ref()));
    let files = OutputWriter::new(None);
    files.claim("the run's report", &report)?;
    let all_images = all.len();
    let all = share(all, job.shard.as_ref());
    let (todo, skipped): (Vec<InputImage>, Vec<InputImage>) = all
        .into_iter()
        .partition(|input| job.force || !outputs_fresh(job, input));
    let images = todo.len() + skipped.len();
    let mut summary = Summary {
        shard: job.shard,
        finished: false,
        all_images,
        images,
        done: 0,
        skipped: skipped.len(),
        failed: 0,
        not_attempted: todo.len(),
        seconds: 0.0,
        images_per_second: 0.0,
        failures: Vec::new(),
        report: None,
    };
    if job.shard.is_some() {
        // A shard says it started, so `merge_reports` can tell one killed on the way from one never run.
        write_report(&report, &summary);
    }
    progress.start(todo.len(), skipped.len());
    let text = engine.embed_queries(&job.queries.engine_queries())?;
    // Throughput counts the image loop: decoding, inference and writing, not the one-off text encoding.
    let loop_start = Instant::now();

    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let (work_tx, work_rx) = bounded::<InputImage>(todo.len().max(1));
    for input in todo.iter().cloned() {
        // Capacity equals the list length: never blocks.
        let _ = work_tx.send(input);
    }
    drop(work_tx);
    let (decoded_tx, decoded_rx) = bounded::<Decoded>(job.batch.max(1) * 2);
    let (write_tx, write_rx) = bounded::<ToWrite>(job.batch.max(1) * 2);
    let (outcome_tx, outcome_rx) = crossbeam::channel::unbounded::<Outcome>();

    let outcomes = std::thread::scope(|scope| -> Result<Vec<Outcome>> {
        for _ in 0..job.jobs.max(1) {
            let (work_rx, decoded_tx, stop) =
                (work_rx.clone(), decoded_tx.clone(), Arc::clone(&stop));
            scope.spawn(move || decode_worker(work_rx, decoded_tx, &stop, job.max_pixels));
        }
        drop(decoded_tx);
        {
            let outcome_tx = outcome_tx.clone();
            let (stop, failed) = (Arc::clone(&stop), Arc::clone(&failed));
            let files = &files;
            scope.spawn(move || {
                writer(
                    write_rx, outcome_tx, job, engine, files, progress, &stop, &failed,
                )
            });
        }
        let collector = scope.spawn(move || outcome_rx.iter().collect::<Vec<Outcome>>());
        infer_loop(
            engine,
            job,
            &text,
            decoded_rx,
            write_tx,
            &outcome_tx,
            progress,
            &stop,
            &failed,
        );
        drop(outcome_tx);
        collector
            .join()
            .map_err(|_| anyhow::anyhow!("the outcome collector panicked"))
    })?;

    let done = outcomes.iter().filter(|o| o.ok).count();
    let failures: Vec<Outcome> = outcomes.iter().filter(|o| !o.ok).cloned().collect();
    let seconds = start.elapsed().as_secs_f64();
    let loop_seconds = loop_start.elapsed().as_secs_f64();
    summary.finished = true;
    summary.done = done;
    summary.failed = failures.len();
    summary.not_attempted = todo.len() - outcomes.len();
    summary.seconds = seconds;
    summary.images_per_second = if loop_seconds > 0.0 {
        done as f64 / loop_seconds
    } else {
        0.0
    };
    summary.failures = failures;
    if write_report(&report, &summary) {
        summary.report = Some(report);
    }
    Ok(summary)
}

/// This shard's share of the inputs (all of them without a shard), logged.
fn share(all: Vec<InputImage>, shard: Option<&Shard>) -> Vec<InputImage> {
    let Some(shard) = shard else { return all };
    let total = all.len();
    let mine: Vec<InputImage> = all
        .into_iter()
        .filter(|input| shard.owns(&path_key(&input.name)))
        .collect();
    tracing::info!(
        "shard {shard}: {} of the {total} images are this shard's (by a hash of each path under its folder)",
        mine.len()
    );
    mine
}

/// Writes the report (temporary file + rename); a failure is logged, not fatal: the outputs are what counts.
fn write_report(report: &Path, summary: &Summary) -> bool {
    match serde_json::to_vec_pretty(summary)
        .map_err(anyhow::Error::from)
        .and_then(|bytes| write_atomic(report, &bytes))
    {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!("cannot write the report {}: {err:#}", report.display());
            false
        }
    }
}

fn decode_worker(
    work: Receiver<InputImage>,
    out: Sender<Decoded>,
    stop: &AtomicBool,
    max_pixels: u64,
) {
    for input in work.iter() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let start = Instant::now();
        let image = decode(&input.path, max_pixels).map_err(|e| e.to_string());
        let decode_ms = start.elapsed().as_secs_f64() * 1e3;
        if out
            .send(Decoded {
                input,
                image,
                decode_ms,
            })
            .is_err()
        {
            break;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn infer_loop(
    engine: &Engine,
    job: &SegmentJob,
    text: &crate::model::TextEmbeddings,
    decoded: Receiver<Decoded>,
    write: Sender<ToWrite>,
    outcomes: &Sender<Outcome>,
    progress: &dyn Progress,
    stop: &AtomicBool,
    failed: &AtomicUsize,
) {
    let fail = |input: &InputImage, error: String| {
        tracing::warn!("{error}");
        let outcome = Outcome {
            image: input.path.display().to_string(),
            ok: false,
            error: Some(error),
        };
        progress.image_done(&outcome);
        let _ = outcomes.send(outcome);
        note_failure(job, failed, stop);
    };
    let settings = SegmentSettings {
        keep_scores: job.outputs.scores,
        ..job.settings
    };
    while let Ok(first) = decoded.recv() {
        let mut batch = vec![first];
        while batch.len() < job.batch.max(1) {
            match decoded.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let mut ready: Vec<(InputImage, RgbImage, f64)> = Vec::new();
        for d in batch {
            match d.image {
                Ok(image) => ready.push((d.input, image, d.decode_ms)),
                Err(error) => fail(&d.input, error),
            }
        }
        if ready.is_empty() || stop.load(Ordering::Relaxed) {
            continue;
        }
        let images: Vec<&RgbImage> = ready.iter().map(|(_, img, _)| img).collect();
        let start = Instant::now();
        let result = engine.segment_batch(&images, text, &settings);
        let inference_ms = start.elapsed().as_secs_f64() * 1e3 / ready.len() as f64;
        match result {
            Ok(segmentations) => {
                for ((input, image, decode_ms), segmentation) in
                    ready.into_iter().zip(segmentations)
                {
                    let item = ToWrite {
                        input,
                        image,
                        segmentation,
                        decode_ms,
                        inference_ms,
                    };
                    if write.send(item).is_err() {
                        return;
                    }
                }
            }
            Err(err) => {
                for (input, _, _) in &ready {
                    fail(
                        input,
                        format!("{}: inference failed: {err:#}", input.path.display()),
                    );
                }
            }
        }
    }
}

fn note_failure(job: &SegmentJob, failed: &AtomicUsize, stop: &AtomicBool) {
    let n = failed.fetch_add(1, Ordering::Relaxed) + 1;
    if job.max_failures.is_some_and(|max| n >= max) && !stop.swap(true, Ordering::Relaxed) {
        tracing::error!("{n} images failed (--max-failures); stopping");
    }
}

#[allow(clippy::too_many_arguments)]
fn writer(
    items: Receiver<ToWrite>,
    outcomes: Sender<Outcome>,
    job: &SegmentJob,
    engine: &Engine,
    files: &OutputWriter,
    progress: &dyn Progress,
    stop: &AtomicBool,
    failed: &AtomicUsize,
) {
    for item in items.iter() {
        let image = item.input.path.display().to_string();
        let outcome = match write_outputs(&item, job, engine, files) {
            Ok(()) => Outcome {
                image,
                ok: true,
                error: None,
            },
            Err(err) => {
                let error = format!("{image}: cannot write outputs: {err:#}");
                tracing::warn!("{error}");
                note_failure(job, failed, stop);
                Outcome {
                    image,
                    ok: false,
                    error: Some(error),
                }
            }
        };
        progress.image_done(&outcome);
        let _ = outcomes.send(outcome);
    }
}

/// Where one image's outputs go: `<out>/<relative>.<suffix>`.
fn image_paths(job: &SegmentJob, input: &InputImage) -> ImagePaths {
    ImagePaths::new(job.out_dir.join(&input.relative))
}

/// `--out` inside (or equal to) a folder being segmented would have the next run read this run's outputs as
/// images; refused before anything is written.
fn refuse_output_inside_input(out: &Path, images: &[InputImage]) -> Result<()> {
    let roots: std::collections::BTreeSet<&Path> = images
        .iter()
        .filter_map(|i| i.folder_root.as_deref())
        .collect();
    for root in roots {
        if let Some(Overlap::Same | Overlap::Inside) = paths::overlap(out, root) {
            bail!(
                "--out {} is inside the input folder {}: its outputs would be read as input images by the next \
                 run; choose an --out outside {}",
                out.display(),
                root.display(),
                root.display()
            );
        }
    }
    Ok(())
}

/// True when every output exists and is newer than the input (resume). The outputs are written as one unit
/// whose last file (the sidecar when there is one) appears last, so this holds only for a complete unit.
fn outputs_fresh(job: &SegmentJob, input: &InputImage) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(source) = modified(&input.path) else {
        return false;
    };
    let paths = image_paths(job, input).all(&job.outputs, job.queries.specs.len());
    !paths.is_empty()
        && paths
            .iter()
            .all(|p| modified(p).is_some_and(|t: SystemTime| t >= source))
}

fn probe_writable(dir: &Path) -> Result<()> {
    temp_file_in(dir)
        .map(drop)
        .with_context(|| format!("the output folder {} is not writable", dir.display()))
}

/// Writes every output of one image as one unit (sidecar last).
fn write_outputs(
    item: &ToWrite,
    job: &SegmentJob,
    engine: &Engine,
    files: &OutputWriter,
) -> Result<()> {
    let image = item.input.path.display().to_string();
    let info = SidecarInfo {
        image: image.clone(),
        frame: None,
        captured: None,
        model: engine.model_info(&job.settings),
        decode_ms: item.decode_ms,
        inference_ms: item.inference_ms,
    };
    let segmented = SegmentedImage {
        image: &item.image,
        segmentation: &item.segmentation,
        queries: &job.queries,
        settings: &job.settings,
    };
    let paths = image_paths(job, &item.input);
    files.write_image(&image, &paths, &segmented, &job.outputs, info)
}
