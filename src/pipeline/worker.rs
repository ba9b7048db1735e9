//! The inference worker: one OS thread per device (ONNX Runtime calls block), batching frames across pipelines.
//!
//! Each round takes at most one frame per pipeline in turn (fairness: a busy file never starves a camera; the
//! queue of `POST /v1/segment` requests is one more participant, not a priority lane) until
//! the batch is full (`max_batch` on CUDA, 1 on the CPU) or `max_wait` has passed since the first; frames that
//! share a query set and settings form a group, and the round's groups run through the engine together: their
//! crops share the trunk runs whatever head each group's settings select (`Engine::segment_groups`). A lossless
//! pipeline whose output is full is skipped until it has room, so one slow disk never blocks the worker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::queue::Doorbell;
use super::requests::{RequestQueue, SegmentReply, SegmentRequest};
use super::{PipelineQueries, PipelineState, Segmented};
use crate::model::{Engine, ImageGroup, Segmentation};
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

/// What one round took: a pipeline's frame or a request's image.
enum Taken {
    Frame(TakenFrame),
    Request(SegmentRequest, Instant),
}

/// Frames of one round that share a query set (and so its text embeddings and settings): one engine run.
struct QueryGroup {
    queries: Arc<PipelineQueries>,
    frames: Vec<TakenFrame>,
    requests: Vec<(SegmentRequest, Instant)>,
}

/// A model swap handed to the worker: the new engine and every pipeline's queries embedded by it.
struct Swap {
    engine: Arc<Engine>,
    queries: Vec<(String, Arc<PipelineQueries>)>,
}

/// The inference worker's state: the pipelines it serves, its batching limits and its heartbeat. `run` is the
/// worker's loop; the daemon adds and removes pipelines while it runs.
pub struct Scheduler {
    /// The engine now serving: read once per batch, replaced only by the worker itself between batches.
    engine: Mutex<Arc<Engine>>,
    /// A swap waiting for the end of the current batch (a model reload built it on another thread).
    pending: Mutex<Option<Swap>>,
    telemetry: Arc<Telemetry>,
    pub doorbell: Arc<Doorbell>,
    pipelines: Mutex<Vec<Arc<PipelineState>>>,
    /// `POST /v1/segment`'s images, served in turn with the pipelines.
    pub requests: RequestQueue,
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
        request_queue: usize,
    ) -> Scheduler {
        let doorbell = Arc::new(Doorbell::default());
        Scheduler {
            engine: Mutex::new(engine),
            pending: Mutex::new(None),
            telemetry,
            requests: RequestQueue::new(request_queue, Arc::clone(&doorbell)),
            doorbell,
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

    /// The engine serving now.
    pub fn engine(&self) -> Arc<Engine> {
        Arc::clone(&self.engine.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Hands the worker a new engine, warm, with each running pipeline's queries embedded by it; the worker
    /// swaps both in before its next batch, so frames keep flowing on the old engine until then. A pipeline
    /// left out keeps its queries, and its frames are dropped (counted) until it gets queries of the new model.
    pub fn swap_engine(&self, engine: Arc<Engine>, queries: Vec<(String, Arc<PipelineQueries>)>) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(Swap { engine, queries });
        self.doorbell.ring();
    }

    /// Applies a pending swap; only the worker calls this, between batches.
    fn take_swap(&self) {
        let Some(swap) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        for p in self.list().iter() {
            if let Some((_, q)) = swap.queries.iter().find(|(name, _)| name == p.name()) {
                *p.queries.lock().unwrap_or_else(|e| e.into_inner()) = Arc::clone(q);
            }
        }
        let manifest = swap.engine.bundle().manifest();
        tracing::info!(
            "model swapped in: {} v{} ({})",
            manifest.name,
            manifest.version,
            swap.engine.manifest_sha256()
        );
        *self.engine.lock().unwrap_or_else(|e| e.into_inner()) = swap.engine;
    }

    pub fn add(&self, pipeline: Arc<PipelineState>) {
        self.list().push(pipeline);
        self.doorbell.ring();
    }

    /// The queries the running pipeline `name` segments with now.
    pub fn pipeline_queries(&self, name: &str) -> Option<Arc<PipelineQueries>> {
        self.list()
            .iter()
            .find(|p| p.name() == name)
            .map(|p| p.queries())
    }

    pub fn remove(&self, name: &str) {
        self.list().retain(|p| p.name() != name);
    }

    /// Nothing queued anywhere and no batch running.
    pub fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.requests.is_empty()
            && self.list().iter().all(|p| p.queue.is_empty())
    }

    /// Seconds since the worker last turned its loop.
    pub fn heartbeat_age(&self) -> f64 {
        unix_ms().saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed)) as f64 / 1e3
    }

    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::Relaxed);
        self.requests.discard();
        self.doorbell.ring();
    }

    /// The worker loop; returns after `shutdown`.
    pub fn run(&self) {
        while !self.shutdown.load(Ordering::Relaxed) {
            self.heartbeat_ms.store(unix_ms(), Ordering::Relaxed);
            let batch = self.gather();
            // Between batches: a batch gathered before the swap still runs whole on the new engine, with the
            // queries it reads after the swap.
            self.take_swap();
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
        if self.engine().device().is_gpu() {
            self.max_batch
        } else {
            1
        }
    }

    /// Takes up to `batch_limit` frames, round robin across pipelines and the request queue (the last turn of
    /// each round), waiting at most `max_wait` after the first.
    fn gather(&self) -> Vec<Taken> {
        let limit = self.batch_limit();
        let mut batch = Vec::new();
        let mut deadline: Option<Instant> = None;
        loop {
            let seen = self.doorbell.count();
            let pipelines: Vec<Arc<PipelineState>> = self.list().clone();
            // One turn per pipeline, and one (index n) for the request queue.
            let n = pipelines.len();
            let mut took_any = true;
            while batch.len() < limit && took_any {
                took_any = false;
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                for i in 0..=n {
                    if batch.len() >= limit {
                        break;
                    }
                    let Some(p) = pipelines.get((start + i) % (n + 1)) else {
                        if let Some(request) = self.requests.pop() {
                            self.in_flight.fetch_add(1, Ordering::AcqRel);
                            batch.push(Taken::Request(request, Instant::now()));
                            took_any = true;
                        }
                        continue;
                    };
                    if p.lossless() && p.output_full() {
                        continue;
                    }
                    if let Some(frame) = p.queue.pop() {
                        self.in_flight.fetch_add(1, Ordering::AcqRel);
                        batch.push(Taken::Frame(TakenFrame {
                            pipeline: Arc::clone(p),
                            frame,
                            taken: Instant::now(),
                        }));
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

    fn infer(&self, batch: Vec<Taken>) {
        let engine = self.engine();
        self.telemetry.batch_size.observe(batch.len() as f64);
        // Frames that share queries and settings run together.
        let mut groups: BTreeMap<usize, QueryGroup> = BTreeMap::new();
        fn group_of(
            groups: &mut BTreeMap<usize, QueryGroup>,
            queries: Arc<PipelineQueries>,
        ) -> &mut QueryGroup {
            groups
                .entry(Arc::as_ptr(&queries) as usize)
                .or_insert_with(|| QueryGroup {
                    queries,
                    frames: Vec::new(),
                    requests: Vec::new(),
                })
        }
        for taken in batch {
            match taken {
                Taken::Frame(taken) => {
                    let queries = taken.pipeline.queries();
                    taken.pipeline.metrics.observe(
                        Stage::Queue,
                        taken.taken.duration_since(taken.frame.received),
                    );
                    group_of(&mut groups, queries).frames.push(taken);
                }
                Taken::Request(request, taken) => match request.queries.prepare(&engine) {
                    Ok(queries) => group_of(&mut groups, queries)
                        .requests
                        .push((request, taken)),
                    Err(e) => {
                        let _ = request
                            .reply
                            .send(Err(format!("cannot embed the queries: {e:#}")));
                    }
                },
            }
        }
        self.run_groups(&engine, groups.into_values().collect());
    }

    /// Runs the round's groups through the engine in one shared run: their crops share the trunk, whatever
    /// head each group's queries select.
    fn run_groups(&self, engine: &Arc<Engine>, groups: Vec<QueryGroup>) {
        let (groups, stale): (Vec<QueryGroup>, Vec<QueryGroup>) = groups
            .into_iter()
            .partition(|g| g.queries.model_sha256 == engine.manifest_sha256());
        for group in stale {
            // Queries embedded by another model (a request queued before a swap, or a pipeline the swap left
            // out): never run them on this one.
            fail(
                group,
                "not segmented: its queries were embedded by the model before the swap; retry",
            );
        }
        if groups.is_empty() {
            return;
        }
        let images: Vec<Vec<&image::RgbImage>> = groups
            .iter()
            .map(|g| {
                g.frames
                    .iter()
                    .map(|t| &t.frame.image)
                    .chain(g.requests.iter().map(|(r, _)| &r.image))
                    .collect()
            })
            .collect();
        let parts: Vec<ImageGroup> = groups
            .iter()
            .zip(&images)
            .map(|(g, images)| ImageGroup {
                images,
                text: &g.queries.text,
                settings: &g.queries.settings,
            })
            .collect();
        let start = Instant::now();
        let run = engine.segment_groups(&parts);
        let count: usize = images.iter().map(Vec::len).sum();
        let infer = start.elapsed() / count.max(1) as u32;
        self.telemetry
            .trunk_runs
            .fetch_add(run.trunk_runs, Ordering::Relaxed);
        for (group, result) in groups.into_iter().zip(run.results) {
            self.deliver(engine, group, result, infer);
        }
    }

    /// Hands a group's segmentations to its pipelines' output threads and its requests' callers.
    fn deliver(
        &self,
        engine: &Arc<Engine>,
        group: QueryGroup,
        result: anyhow::Result<Vec<Segmentation>>,
        infer: Duration,
    ) {
        match result {
            Ok(mut segs) => {
                let answers = segs.split_off(group.frames.len().min(segs.len()));
                for (t, segmentation) in group.frames.into_iter().zip(segs) {
                    t.pipeline.metrics.observe(Stage::Infer, infer);
                    t.pipeline.deliver(Segmented {
                        frame: t.frame,
                        segmentation,
                        queries: Arc::clone(&group.queries),
                        engine: Arc::clone(engine),
                        taken: t.taken,
                        infer,
                    });
                }
                for ((request, taken), segmentation) in group.requests.into_iter().zip(answers) {
                    let _ = request.reply.send(Ok(SegmentReply {
                        image: request.image,
                        segmentation,
                        queries: Arc::clone(&group.queries),
                        engine: Arc::clone(engine),
                        queued: taken.duration_since(request.received),
                        infer,
                    }));
                }
            }
            Err(e) => {
                self.telemetry
                    .inference_errors
                    .fetch_add(1, Ordering::Relaxed);
                fail(group, &format!("inference failed: {e:#}"));
            }
        }
    }
}

/// A group that was not segmented: its frames are dropped (counted as inference errors), its requests answered
/// with `why`.
fn fail(group: QueryGroup, why: &str) {
    for t in &group.frames {
        tracing::error!(pipeline = %t.pipeline.name(), frame = t.frame.sequence, "{why}");
        t.pipeline
            .metrics
            .drop_frames(DropReason::InferenceError, 1);
    }
    for (request, _) in group.requests {
        tracing::error!("{why} (a POST /v1/segment image)");
        let _ = request.reply.send(Err(why.to_string()));
    }
}
