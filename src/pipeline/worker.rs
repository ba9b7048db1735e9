//! The inference worker: one OS thread per device (ONNX Runtime calls block), batching frames across pipelines.
//!
//! Each round takes at most one frame per pipeline in turn (fairness: a busy file never starves a camera) until
//! the batch is full (`max_batch` on CUDA, 1 on the CPU) or `max_wait` has passed since the first; frames that
//! share a query set and settings run through the engine together. A lossless pipeline whose output is full is skipped until it has
//! room, so one slow disk never blocks the worker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::queue::Doorbell;
use super::{PipelineQueries, PipelineState, Segmented};
use crate::model::Engine;
use crate::source::Frame;
use crate::telemetry::{unix_ms, DropReason, Stage, Telemetry};

/// A frame the worker took from a pipeline's queue for inference.
struct TakenFrame {
    /// The pipeline it came from: its result goes back to that pipeline's output thread.
    pipeline: Arc<PipelineState>,
    frame: Frame,
    /// When it left the queue (the end of its queue wait).
    taken: Instant,
}

/// Frames of one round that share a query set (and so its text embeddings and settings): one engine run.
struct QueryGroup {
    queries: Arc<PipelineQueries>,
    frames: Vec<TakenFrame>,
}

/// The inference worker's state: the pipelines it serves, its batching limits and its heartbeat. `run` is the
/// worker's loop; the daemon adds and removes pipelines while it runs.
pub struct Scheduler {
    engine: Arc<Engine>,
    telemetry: Arc<Telemetry>,
    pub doorbell: Arc<Doorbell>,
    pipelines: Mutex<Vec<Arc<PipelineState>>>,
    max_batch: usize,
    max_wait: Duration,
    in_flight: AtomicUsize,
    shutdown: AtomicBool,
    /// Wall ms of the worker's last loop turn: the systemd watchdog is only fed while this moves.
    heartbeat_ms: AtomicU64,
    next: AtomicUsize,
}

impl Scheduler {
    pub fn new(
        engine: Arc<Engine>,
        telemetry: Arc<Telemetry>,
        max_batch: usize,
        max_wait: Duration,
    ) -> Scheduler {
        Scheduler {
            engine,
            telemetry,
            doorbell: Arc::new(Doorbell::default()),
            pipelines: Mutex::new(Vec::new()),
            max_batch: max_batch.max(1),
            max_wait,
            in_flight: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            heartbeat_ms: AtomicU64::new(unix_ms()),
            next: AtomicUsize::new(0),
        }
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Arc<PipelineState>>> {
        self.pipelines.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add(&self, pipeline: Arc<PipelineState>) {
        self.list().push(pipeline);
        self.doorbell.ring();
    }

    pub fn remove(&self, name: &str) {
        self.list().retain(|p| p.name() != name);
    }

    /// Nothing queued anywhere and no batch running.
    pub fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.list().iter().all(|p| p.queue.is_empty())
    }

    /// Seconds since the worker last turned its loop.
    pub fn heartbeat_age(&self) -> f64 {
        unix_ms().saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed)) as f64 / 1e3
    }

    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::Relaxed);
        self.doorbell.ring();
    }

    /// The worker loop; returns after `shutdown`.
    pub fn run(&self) {
        while !self.shutdown.load(Ordering::Relaxed) {
            self.heartbeat_ms.store(unix_ms(), Ordering::Relaxed);
            let batch = self.gather();
            if batch.is_empty() {
                continue;
            }
            self.infer(batch);
            self.in_flight.store(0, Ordering::Release);
        }
    }

    /// Frames per engine run: 1 on the CPU (crops run one at a time there, so a bigger batch only leaves its
    /// later frames waiting, and a live pipeline's frame is best taken fresh right before it runs); `max_batch`
    /// on CUDA, where the crops of a batch share runs.
    fn batch_limit(&self) -> usize {
        if self.engine.device().is_gpu() {
            self.max_batch
        } else {
            1
        }
    }

    /// Takes up to `batch_limit` frames, round robin across pipelines, waiting at most `max_wait` after the first.
    fn gather(&self) -> Vec<TakenFrame> {
        let limit = self.batch_limit();
        let mut batch = Vec::new();
        let mut deadline: Option<Instant> = None;
        loop {
            let seen = self.doorbell.count();
            let pipelines: Vec<Arc<PipelineState>> = self.list().clone();
            let n = pipelines.len();
            let mut took_any = true;
            while batch.len() < limit && took_any {
                took_any = false;
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                for i in 0..n {
                    if batch.len() >= limit {
                        break;
                    }
                    let p = &pipelines[(start + i) % n];
                    if p.lossless() && p.output_full() {
                        continue;
                    }
                    if let Some(frame) = p.queue.pop() {
                        self.in_flight.fetch_add(1, Ordering::AcqRel);
                        batch.push(TakenFrame {
                            pipeline: Arc::clone(p),
                            frame,
                            taken: Instant::now(),
                        });
                        took_any = true;
                    }
                }
            }
            if batch.len() >= limit || self.shutdown.load(Ordering::Relaxed) {
                return batch;
            }
            let now = Instant::now();
            let wait = match deadline {
                None if batch.is_empty() => Duration::from_millis(250),
                None => {
                    deadline = Some(now + self.max_wait);
                    self.max_wait
                }
                Some(d) if now >= d => return batch,
                Some(d) => d - now,
            };
            self.doorbell.wait(seen, wait);
            if batch.is_empty() {
                // Idle turn: let `run` refresh the heartbeat.
                return batch;
            }
        }
    }

    fn infer(&self, batch: Vec<TakenFrame>) {
        self.telemetry.batch_size.observe(batch.len() as f64);
        // Frames that share queries and settings run together.
        let mut groups: BTreeMap<usize, QueryGroup> = BTreeMap::new();
        for taken in batch {
            let queries = taken.pipeline.queries();
            taken.pipeline.metrics.observe(
                Stage::Queue,
                taken.taken.duration_since(taken.frame.received),
            );
            groups
                .entry(Arc::as_ptr(&queries) as usize)
                .or_insert_with(|| QueryGroup {
                    queries,
                    frames: Vec::new(),
                })
                .frames
                .push(taken);
        }
        for (_, group) in groups {
            self.run_group(group);
        }
    }

    fn run_group(&self, group: QueryGroup) {
        let q = &group.queries;
        let images: Vec<&image::RgbImage> = group.frames.iter().map(|t| &t.frame.image).collect();
        let start = Instant::now();
        let result = self.engine.segment_batch(&images, &q.text, &q.settings);
        let infer = start.elapsed() / group.frames.len() as u32;
        match result {
            Ok(segs) => {
                for (t, segmentation) in group.frames.into_iter().zip(segs) {
                    t.pipeline.metrics.observe(Stage::Infer, infer);
                    t.pipeline.deliver(Segmented {
                        frame: t.frame,
                        segmentation,
                        queries: Arc::clone(&group.queries),
                        taken: t.taken,
                        infer,
                    });
                }
            }
            Err(e) => {
                self.telemetry
                    .inference_errors
                    .fetch_add(1, Ordering::Relaxed);
                for t in &group.frames {
                    tracing::error!(pipeline = %t.pipeline.name(), frame = t.frame.sequence, "inference failed: {e:#}");
                    t.pipeline
                        .metrics
                        .drop_frames(DropReason::InferenceError, 1);
                }
            }
        }
    }
}
