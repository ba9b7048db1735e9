//! A pipeline's output thread: per frame, the label PNG, the overlay image and the JSON sidecar (one unit:
//! `sink::files`, sidecar last), a JSON line appended to `<pipeline>.jsonl`, and a frame of the overlay video;
//! then the per-query statistics of the frame to the daemon's `events::Events` (the sidecar's class results when
//! one is built anyway, else `sidecar::class_statistics` alone, without the RLE only files need), then the
//! retention sweep every `SWEEP_EVERY`. It runs off the inference path: a slow disk delays only this
//! pipeline's outputs.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use crossbeam::channel::Receiver;

use super::{PipelineState, Segmented};
use crate::events::{Events, FrameStats, QueryStats};
use crate::sink::atomic::sweep_stale_temps;
use crate::sink::encode::{
    encode_image, ImagePaths, Keep, OutputKinds, SegmentedImage, SidecarInfo,
};
use crate::sink::files::OutputWriter;
use crate::sink::retention::{self, Retention};
use crate::sink::sidecar::{class_statistics, ClassResult, ClassStats, FrameInfo};
use crate::sink::template::{utc_date_time, TemplateValues};
use crate::sink::video::VideoWriter;
use crate::telemetry::{DropReason, Stage};

const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Output paths remembered for the collision check (three files per frame: about 100k frames). Names are unique
/// by construction (the template must hold `{frame}` or `{name}`); this is the guard that turns a mistake into
/// an error instead of an overwrite.
const REMEMBERED_OUTPUTS: usize = 300_000;

/// The events hub when `[events]` is configured; the output thread feeds it each written frame.
pub type EventsHub = Option<std::sync::Arc<Events>>;

pub fn run(shared: &PipelineState, results: Receiver<Segmented>, events: &EventsHub) {
    let out = &shared.plan.config.output;
    // The folder is this pipeline's alone (config validation refuses overlaps): its whole tree is ours to sweep.
    sweep_stale_temps(&out.dir, true);
    let files = OutputWriter::new(Some(REMEMBERED_OUTPUTS));
    let jsonl_path = out.dir.join(format!("{}.jsonl", shared.name()));
    let mut jsonl: Option<File> = None;
    let mut video: Option<VideoWriter> = None;
    let mut video_failed = false;
    let retention = Retention {
        max_age: out.retention_age(),
        max_bytes: out.retention_bytes(),
    };
    let mut last_sweep: Option<Instant> = None;
    for item in results.iter() {
        let start = Instant::now();
        let written = write_frame(
            shared,
            &item,
            &files,
            &jsonl_path,
            &mut jsonl,
            &mut video,
            &mut video_failed,
            events,
        );
        match written {
            Ok(()) => {
                shared.metrics.frames_out.fetch_add(1, Ordering::Relaxed);
                shared.metrics.observe(Stage::Write, start.elapsed());
                shared
                    .metrics
                    .observe(Stage::Total, item.frame.captured.elapsed());
            }
            Err(e) => {
                tracing::warn!(pipeline = %shared.name(), frame = item.frame.sequence, "cannot write outputs: {e:#}");
                shared.metrics.drop_frames(DropReason::WriteError, 1);
            }
        }
        // The live page's view (overlay only while watched, history always), whether or not the files made it.
        shared.live.observe(&item);
        if (retention.max_age.is_some() || retention.max_bytes.is_some())
            && last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY)
        {
            // The frame-number reservation is the pipeline's memory, not an output: deleting it would let the
            // next start number (and name) frames from 0 again.
            let mut keep = vec![
                PathBuf::from(jsonl_path.file_name().unwrap_or_default()),
                PathBuf::from(crate::sink::frame_numbers::FILE_NAME),
            ];
            if let Some(v) = &video {
                keep.push(PathBuf::from(v.path().file_name().unwrap_or_default()));
            }
            let swept = retention::sweep(&out.dir, retention, &keep, SystemTime::now());
            if swept.files > 0 {
                tracing::info!(pipeline = %shared.name(), "retention: deleted {} files ({} bytes)", swept.files, swept.bytes);
            }
            last_sweep = Some(Instant::now());
        }
    }
    if let Some(v) = video {
        let path = v.path().to_path_buf();
        match v.finish() {
            Ok(frames) => {
                tracing::info!(pipeline = %shared.name(), "video {} finished ({frames} frames)", path.display())
            }
            Err(e) => tracing::warn!(pipeline = %shared.name(), "{e:#}"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn write_frame(
    shared: &PipelineState,
    item: &Segmented,
    files: &OutputWriter,
    jsonl_path: &Path,
    jsonl: &mut Option<File>,
    video: &mut Option<VideoWriter>,
    video_failed: &mut bool,
    events: &EventsHub,
) -> Result<()> {
    let out = &shared.plan.config.output;
    let q = &item.queries;
    let relative = shared.plan.template.render(&TemplateValues {
        pipeline: shared.name(),
        wall_ms: item.frame.wall_ms,
        sequence: item.frame.sequence,
        name: item.frame.file.as_ref().map(|(rel, _)| rel.as_path()),
    });
    let kinds = OutputKinds {
        labels: out.labels,
        // Validated with the config: an unknown format never gets here.
        overlay: out
            .overlay
            .as_ref()
            .and_then(|fmt| fmt.get("output.overlay").ok()),
        json: out.json,
        scores: false,
    };
    let zones = events
        .as_ref()
        .is_some_and(|e| e.needs_labels(shared.name()));
    let sidecar_built = kinds.json || out.jsonl;
    let keep = Keep {
        overlay: out.video.is_some() && !*video_failed,
        sidecar: out.jsonl,
        // Events measure zones on the label map, and without a sidecar they compute their statistics from it.
        labels: events.is_some() && (zones || !sidecar_built),
    };
    // The engine that produced this frame: after a model swap, frames still queued name the model they ran on.
    let model = item.engine.model_info(&q.settings);
    let (model_hash, head) = (model.manifest_sha256.clone(), model.head.clone());
    let info = SidecarInfo {
        image: match &item.frame.file {
            Some((_, path)) => path.display().to_string(),
            None => shared.plan.source.redacted(),
        },
        frame: Some(FrameInfo {
            pipeline: shared.name().to_string(),
            source: shared.plan.source.redacted(),
            sequence: item.frame.sequence,
            pts_ns: item.frame.pts_ns,
            wall_ms: item.frame.wall_ms,
            latency_ms: 0.0,
        }),
        captured: Some(item.frame.captured),
        model,
        decode_ms: item.taken.duration_since(item.frame.captured).as_secs_f64() * 1e3,
        inference_ms: item.infer.as_secs_f64() * 1e3,
    };
    let segmented = SegmentedImage {
        image: &item.frame.image,
        segmentation: &item.segmentation,
        queries: &q.queries,
        settings: &q.settings,
    };
    let owner = match &item.frame.file {
        Some((_, path)) => path.display().to_string(),
        None => format!("frame {}", item.frame.sequence),
    };
    let paths = ImagePaths::new(out.dir.join(relative));
    let encoded = encode_image(&paths, &segmented, &kinds, keep, info)?;
    let sidecar_path = kinds.json.then(|| paths.with_suffix("json"));
    if let (Some(name), Some(img)) = (&out.video, &encoded.overlay) {
        if !*video_failed {
            if video.is_none() {
                let (date, time) = utc_date_time(item.frame.wall_ms);
                let file = Path::new(name);
                let stem = file.file_stem().unwrap_or_default().to_string_lossy();
                let ext = file.extension().unwrap_or_default().to_string_lossy();
                let path = out.dir.join(format!("{stem}-{date}-{time}.{ext}"));
                match VideoWriter::create(&path, img.width(), img.height()) {
                    Ok(v) => *video = Some(v),
                    Err(e) => {
                        *video_failed = true;
                        tracing::error!(pipeline = %shared.name(), "overlay video off: {e:#}");
                    }
                }
            }
            if let Some(v) = video.as_mut() {
                if let Err(e) = v.push(img, item.frame.wall_ms) {
                    *video_failed = true;
                    tracing::error!(pipeline = %shared.name(), "overlay video off: {e:#}");
                }
            }
        }
    }
    files.write_unit(&owner, encoded.files)?;
    let sidecar = encoded.sidecar;
    if let (true, Some(sidecar)) = (out.jsonl, &sidecar) {
        if jsonl.is_none() {
            *jsonl = Some(
                File::options()
                    .create(true)
                    .append(true)
                    .open(jsonl_path)
                    .with_context(|| format!("cannot open {}", jsonl_path.display()))?,
            );
        }
        if let Some(f) = jsonl.as_mut() {
            let mut line = serde_json::to_vec(sidecar)?;
            line.push(b'\n');
            // One write per line: a reader sees whole lines (a crash can cut only the last one).
            f.write_all(&line)
                .with_context(|| format!("cannot append to {}", jsonl_path.display()))?;
        }
    }
    if let Some(events) = events {
        let seg = &item.segmentation;
        let labels = encoded.labels;
        let classes: Vec<ClassStats> = match &sidecar {
            Some(s) => s.classes.iter().map(ClassResult::stats).collect(),
            None => class_statistics(
                &q.queries,
                labels.as_deref().unwrap_or(&[]),
                &seg.best,
                seg.width,
            ),
        };
        let stats = frame_stats(
            shared.name(),
            item.frame.wall_ms,
            (seg.width, seg.height),
            &classes,
            labels.filter(|_| zones),
            (model_hash, head),
            sidecar_path.map(|p| p.display().to_string()),
        );
        // A full disk or a broken outbox must not stop the files: the frame's outputs are written already.
        if let Err(e) = events.observe(&stats) {
            tracing::warn!(pipeline = %shared.name(), frame = item.frame.sequence, "events not recorded: {e}");
        }
    }
    Ok(())
}

/// The frame as the events layer sees it: the class statistics of every query (label 0, the background, is no
/// query), and the label map when the pipeline has zones.
fn frame_stats(
    pipeline: &str,
    wall_ms: u64,
    (width, height): (usize, usize),
    classes: &[ClassStats],
    labels: Option<Vec<u16>>,
    (model, head): (String, String),
    outputs: Option<String>,
) -> FrameStats {
    FrameStats {
        pipeline: pipeline.to_string(),
        at_ms: wall_ms,
        width,
        height,
        labels: labels.unwrap_or_default(),
        queries: classes
            .iter()
            .filter(|c| c.label != 0)
            .map(|c| QueryStats {
                label: c.label,
                name: c.name.clone(),
                fraction: c.pixel_fraction,
                bbox: c.bbox,
                mean_score: c.mean_score,
            })
            .collect(),
        model,
        head: Some(head),
        outputs,
    }
}
