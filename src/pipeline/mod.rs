//! A running pipeline: its source thread (supervised), its frame queue, its current queries and its output
//! thread. The inference worker (`worker`) takes frames from every pipeline's queue and hands results to that
//! pipeline's output thread (`output`), so a slow disk never holds up inference and a slow camera never holds up
//! another.
//!
//! Lifecycle: `start` → frames flow → `stop_source` (the source ends; the queue refuses frames) → `finish`
//! (queued frames dropped or drained by the caller, the output closed, the video finalized).

pub mod output;
pub mod queue;
pub mod requests;
pub mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crossbeam::channel::{bounded, Sender, TrySendError};

use crate::config::{PipelinePlan, QueuePolicy};
use crate::model::{Engine, SegmentSettings, Segmentation, SettingsOverrides, TextEmbeddings};
use crate::queries::QuerySet;
use crate::sink::frame_numbers;
use crate::source::sequence::FrameSequence;
use crate::source::stream::StreamSettings;
use crate::source::supervisor::{self, SupervisorSettings};
use crate::source::{Frame, FrameIntake};
use crate::telemetry::{DropReason, PipelineMetrics, Telemetry};
use queue::{Doorbell, FrameQueue};

/// Results waiting for a pipeline's output thread.
const OUTPUT_DEPTH: usize = 8;

/// A pipeline's queries with their text embeddings and engine settings; swapped whole on reload, so a frame's
/// labels, palette and embedding always belong together.
#[derive(Debug)]
pub struct PipelineQueries {
    pub queries: QuerySet,
    pub text: Arc<TextEmbeddings>,
    pub settings: SegmentSettings,
    /// The manifest sha256 of the engine that embedded `text`: the worker runs these queries only on that
    /// engine, so no batch mixes one model's embeddings with another's after a model swap.
    pub model_sha256: String,
}

impl PipelineQueries {
    /// Embeds the queries (cached by the engine) and resolves thresholds against the bundle's defaults.
    pub fn prepare(engine: &Engine, plan: &PipelinePlan) -> Result<PipelineQueries> {
        PipelineQueries::embed_for_head(
            engine,
            &plan.queries,
            SettingsOverrides {
                pamr: plan.config.pamr,
                bg_thresh: plan.config.bg_thresh,
                kp_weight: plan.config.kp_weight,
            },
            plan.config.head.as_deref(),
        )
        .with_context(|| format!("pipeline '{}': cannot embed its queries", plan.config.name))
    }

    /// `prepare` for queries outside any pipeline (a `POST /v1/segment` request's).
    pub fn embed(
        engine: &Engine,
        queries: &QuerySet,
        overrides: SettingsOverrides,
    ) -> Result<PipelineQueries> {
        PipelineQueries::embed_for_head(engine, queries, overrides, None)
    }

    /// `embed` scored by a named head of the bundle (None: its default head); a head the bundle lacks is an
    /// error naming the heads it has.
    pub fn embed_for_head(
        engine: &Engine,
        queries: &QuerySet,
        overrides: SettingsOverrides,
        head: Option<&str>,
    ) -> Result<PipelineQueries> {
        let settings = SegmentSettings::resolve_head(
            engine.bundle().manifest(),
            head,
            overrides,
            queries.has_background_prompts(),
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        Ok(PipelineQueries {
            queries: queries.clone(),
            text: engine.embed_queries(&queries.engine_queries())?,
            settings,
            model_sha256: engine.manifest_sha256().to_string(),
        })
    }
}

/// One segmented frame on its way to the output thread.
pub struct Segmented {
    pub frame: Frame,
    pub segmentation: Segmentation,
    pub queries: Arc<PipelineQueries>,
    /// The engine that segmented it (after a model swap, not necessarily the configured one): its sidecar names
    /// this model.
    pub engine: Arc<Engine>,
    /// When the worker took the frame from the queue.
    pub taken: Instant,
    /// This frame's share of its batch's inference time.
    pub infer: Duration,
}

/// The state shared by a pipeline's source thread, the inference worker and its output thread.
pub struct PipelineState {
    pub plan: PipelinePlan,
    pub queue: FrameQueue,
    pub metrics: Arc<PipelineMetrics>,
    queries: Mutex<Arc<PipelineQueries>>,
    output: Mutex<Option<Sender<Segmented>>>,
    stopping: AtomicBool,
    source_done: AtomicBool,
}

impl PipelineState {
    pub fn name(&self) -> &str {
        &self.plan.config.name
    }

    pub fn queries(&self) -> Arc<PipelineQueries> {
        Arc::clone(&self.queries.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn lossless(&self) -> bool {
        self.plan.queue == QueuePolicy::Lossless
    }

    /// True when the output thread has no room: a lossless pipeline is then skipped by the worker until it has.
    pub fn output_full(&self) -> bool {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|tx| tx.len() >= OUTPUT_DEPTH)
    }

    /// Hands a result to the output thread: lossless pipelines wait; live ones drop it when the writer is behind.
    pub fn deliver(&self, item: Segmented) {
        let tx = self
            .output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(tx) = tx else {
            self.metrics.drop_frames(DropReason::Shutdown, 1);
            return;
        };
        if self.lossless() {
            if tx.send(item).is_err() {
                self.metrics.drop_frames(DropReason::Shutdown, 1);
            }
        } else {
            match tx.try_send(item) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => self.metrics.drop_frames(DropReason::SinkBacklog, 1),
                Err(TrySendError::Disconnected(_)) => {
                    self.metrics.drop_frames(DropReason::Shutdown, 1)
                }
            }
        }
    }

    /// The source has ended for good (a file's end, a one-shot folder) or was stopped.
    pub fn source_done(&self) -> bool {
        self.source_done.load(Ordering::Relaxed)
    }
}

impl FrameIntake for PipelineState {
    fn push(&self, frame: Frame) -> bool {
        !self.stopping() && self.queue.push(frame)
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}

/// Marks the pipeline as not running when the thread it lives on panics, so `/readyz`, `/status` and the
/// STATUS line see a dead pipeline instead of reporting it as running (its drop runs while unwinding).
struct PanicWatch {
    metrics: Arc<PipelineMetrics>,
    thread: &'static str,
}

impl PanicWatch {
    fn new(metrics: &Arc<PipelineMetrics>, thread: &'static str) -> PanicWatch {
        PanicWatch {
            metrics: Arc::clone(metrics),
            thread,
        }
    }
}

impl Drop for PanicWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.metrics.set_failure(Some(format!(
                "its {} thread panicked (a bug: see the log, and report it)",
                self.thread
            )));
        }
    }
}

/// The owner's handle on a running pipeline.
pub struct Pipeline {
    pub shared: Arc<PipelineState>,
    source: Option<JoinHandle<()>>,
    output: Option<JoinHandle<()>>,
}

impl Pipeline {
    pub fn start(
        plan: PipelinePlan,
        queries: PipelineQueries,
        telemetry: &Telemetry,
        doorbell: Arc<Doorbell>,
        events: output::EventsHub,
    ) -> Result<Pipeline> {
        let name = plan.config.name.clone();
        let out_dir = plan.config.output.dir.clone();
        std::fs::create_dir_all(&out_dir).with_context(|| {
            format!(
                "pipeline '{name}': cannot create the output folder {}",
                out_dir.display()
            )
        })?;
        crate::sink::atomic::temp_file_in(&out_dir)
            .map(drop)
            .with_context(|| {
                format!(
                    "pipeline '{name}': the output folder {} is not writable",
                    out_dir.display()
                )
            })?;
        let numbers = frame_numbers::file_in(&out_dir);
        let sequence = FrameSequence::reserving(
            frame_numbers::read(&numbers),
            Box::new(move |end| frame_numbers::write(&numbers, end)),
        )
        .with_context(|| format!("pipeline '{name}': cannot reserve frame numbers"))?;
        let metrics = telemetry.pipeline(&name);
        let (tx, rx) = bounded::<Segmented>(OUTPUT_DEPTH);
        let shared = Arc::new(PipelineState {
            queue: FrameQueue::new(plan.queue, doorbell, Arc::clone(&metrics)),
            metrics,
            queries: Mutex::new(Arc::new(queries)),
            output: Mutex::new(Some(tx)),
            stopping: AtomicBool::new(false),
            source_done: AtomicBool::new(false),
            plan,
        });
        let output = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("out-{name}"))
                .spawn(move || {
                    let _watch = PanicWatch::new(&shared.metrics, "output");
                    output::run(&shared, rx, &events)
                })
                .context("cannot start an output thread")?
        };
        let source = {
            let shared = Arc::clone(&shared);
            let c = &shared.plan.config;
            let settings = SupervisorSettings {
                stream: StreamSettings {
                    max_fps: c.max_fps,
                    watchdog: c.watchdog(),
                    rtsp_transport: shared.plan.rtsp_transport(),
                },
                backoff_initial: c.backoff_initial(),
                backoff_max: c.backoff_max(),
                folder_settle: shared.plan.folder_settle(),
            };
            std::thread::Builder::new()
                .name(format!("src-{name}"))
                .spawn(move || {
                    let _watch = PanicWatch::new(&shared.metrics, "source");
                    let spec = shared.plan.source.clone();
                    supervisor::supervise(
                        shared.name(),
                        &spec,
                        &settings,
                        shared.as_ref(),
                        &shared.metrics,
                        &sequence,
                    );
                    shared.source_done.store(true, Ordering::Relaxed);
                })
                .context("cannot start a source thread")?
        };
        tracing::info!(pipeline = %name, source = %shared.plan.source, queue = ?shared.plan.queue, "pipeline started");
        Ok(Pipeline {
            shared,
            source: Some(source),
            output: Some(output),
        })
    }

    pub fn name(&self) -> &str {
        self.shared.name()
    }

    /// Swaps in new queries; frames already taken by the worker finish with the old ones.
    pub fn set_queries(&self, queries: PipelineQueries) {
        *self
            .shared
            .queries
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(queries);
    }

    /// Ends the source and refuses further frames. Returns when the source thread has ended.
    pub fn stop_source(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        self.shared.queue.close();
        if let Some(h) = self.source.take() {
            if h.join().is_err() {
                tracing::error!(pipeline = %self.name(), "the source thread panicked");
            }
        }
    }

    /// Drops what is still queued, closes the output (finalizing the video) and waits for it.
    pub fn finish(mut self) {
        self.stop_source();
        self.shared.queue.discard();
        self.shared
            .output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = self.output.take() {
            if h.join().is_err() {
                tracing::error!(pipeline = %self.name(), "the output thread panicked");
            }
        }
        tracing::info!(pipeline = %self.name(), "pipeline stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_panics_marks_its_pipeline_not_running() {
        let metrics = Arc::new(PipelineMetrics::default());
        let watched = Arc::clone(&metrics);
        let joined = std::thread::spawn(move || {
            let _watch = PanicWatch::new(&watched, "output");
            panic!("a bug");
        })
        .join();
        assert!(joined.is_err());
        let why = metrics.failure().expect("marked as not running");
        assert!(why.contains("output thread panicked"), "{why}");

        // A thread that ends normally (a file's end, a stop) leaves it running.
        let metrics = Arc::new(PipelineMetrics::default());
        let watched = Arc::clone(&metrics);
        std::thread::spawn(move || {
            let _watch = PanicWatch::new(&watched, "source");
        })
        .join()
        .expect("join");
        assert_eq!(metrics.failure(), None);
    }
}
