//! Metrics: per-pipeline counters and gauges, per-stage latency histograms and the inference worker's batch
//! sizes, all lock-free atomics that sources, the inference worker and sinks record into, rendered in the Prometheus
//! text format (`prometheus.rs`). The daemon only exposes them (`/metrics`, `/status`); it lives above this
//! module, not inside it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

mod deliveries;
mod prometheus;
mod serving;

pub use deliveries::{Deliveries, Delivery, DeliverySource};
pub use prometheus::PROMETHEUS_CONTENT_TYPE;
pub use serving::{
    ModelLabel, Models, SegmentFigures, SegmentOutcome, SegmentRequests, SwapFigures,
};

/// Why a frame was not segmented. Each reason is its own series, so a stalled camera never looks like a slow model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Over the pipeline's `max_fps` (dropped in GStreamer by `videorate`, before colour conversion).
    RateCap,
    /// A live frame replaced by a fresher one before the inference worker took it.
    Superseded,
    /// The sink could not keep up (live pipelines only; lossless ones wait).
    SinkBacklog,
    /// The frame or image could not be decoded.
    DecodeError,
    /// The engine failed on the batch holding the frame.
    InferenceError,
    /// Outputs could not be written.
    WriteError,
    /// Still queued when the pipeline was removed or the daemon stopped.
    Shutdown,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::RateCap,
        DropReason::Superseded,
        DropReason::SinkBacklog,
        DropReason::DecodeError,
        DropReason::InferenceError,
        DropReason::WriteError,
        DropReason::Shutdown,
    ];

    pub fn key(self) -> &'static str {
        match self {
            DropReason::RateCap => "rate_cap",
            DropReason::Superseded => "superseded",
            DropReason::SinkBacklog => "sink_backlog",
            DropReason::DecodeError => "decode_error",
            DropReason::InferenceError => "inference_error",
            DropReason::WriteError => "write_error",
            DropReason::Shutdown => "shutdown",
        }
    }

    fn index(self) -> usize {
        DropReason::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Stages of a frame's life, for the latency histograms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Capture (the buffer's timestamp on the pipeline clock) → decoded frame handed to tclseg.
    Decode,
    /// Handed over → taken by the inference worker.
    Queue,
    /// The engine's run (per frame share of its batch).
    Infer,
    /// Encoding and writing the outputs.
    Write,
    /// Capture → every output written.
    Total,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Decode,
        Stage::Queue,
        Stage::Infer,
        Stage::Write,
        Stage::Total,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Queue => "queue",
            Stage::Infer => "infer",
            Stage::Write => "write",
            Stage::Total => "total",
        }
    }
}

/// Upper bounds of the latency histogram buckets, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upper bounds of the batch-size histogram buckets.
const BATCH_BUCKETS: [f64; 7] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// A cumulative histogram with fixed buckets (Prometheus semantics).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in micro-units (µs for latencies), so it fits an atomic integer.
    sum_micro: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micro: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        let value = if value.is_finite() {
            value.max(0.0)
        } else {
            0.0
        };
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micro
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// An upper bound of the q-quantile from the buckets (None when empty or beyond the last bucket).
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil() as u64;
        let mut seen = 0;
        for (bound, c) in self.bounds.iter().zip(&self.counts) {
            seen += c.load(Ordering::Relaxed);
            if seen >= rank {
                return Some(*bound);
            }
        }
        None
    }
}

/// Everything recorded about one pipeline. Kept after the pipeline is removed only until the next reload.
#[derive(Debug)]
pub struct PipelineMetrics {
    /// Decoded frames (or images) that reached tclseg, before the rate cap.
    pub frames_in: AtomicU64,
    /// Frames whose outputs were all written.
    pub frames_out: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
    /// Source (re)starts after the first.
    pub reconnects: AtomicU64,
    /// No-frame watchdog firings.
    pub stalls: AtomicU64,
    /// Wall time of the last frame in, ms since the Unix epoch (0: none yet).
    pub last_frame_ms: AtomicU64,
    /// Frames waiting for the inference worker.
    pub queue_depth: AtomicU64,
    /// The source is delivering frames.
    pub connected: AtomicBool,
    /// Why the pipeline is not running (it failed to start, or one of its threads died); None while it runs.
    failure: Mutex<Option<String>>,
    /// How the source last ended (redacted), kept while it reconnects and after: `/status` and the live page.
    source_trouble: Mutex<Option<SourceTrouble>>,
    latency: Vec<Histogram>,
}

/// Why a source last ended before its retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTrouble {
    /// The no-frame watchdog fired (rather than an error).
    pub stalled: bool,
    /// What happened, redacted.
    pub why: String,
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        PipelineMetrics::new()
    }
}

impl PipelineMetrics {
    fn new() -> PipelineMetrics {
        PipelineMetrics {
            frames_in: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            reconnects: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            last_frame_ms: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            failure: Mutex::new(None),
            source_trouble: Mutex::new(None),
            latency: Stage::ALL
                .iter()
                .map(|_| Histogram::new(&LATENCY_BUCKETS))
                .collect(),
        }
    }

    pub fn drop_frames(&self, reason: DropReason, n: u64) {
        self.drops[reason.index()].fetch_add(n, Ordering::Relaxed);
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].load(Ordering::Relaxed)
    }

    pub fn frame_in(&self) {
        self.frames_in_n(1);
    }

    /// `n` frames arrived (n may be 0: only the last-frame time moves).
    pub fn frames_in_n(&self, n: u64) {
        self.frames_in.fetch_add(n, Ordering::Relaxed);
        self.last_frame_ms.store(unix_ms(), Ordering::Relaxed);
    }

    pub fn observe(&self, stage: Stage, latency: Duration) {
        let i = Stage::ALL.iter().position(|s| *s == stage).unwrap_or(0);
        self.latency[i].observe(latency.as_secs_f64());
    }

    pub fn latency(&self, stage: Stage) -> &Histogram {
        let i = Stage::ALL.iter().position(|s| *s == stage).unwrap_or(0);
        &self.latency[i]
    }

    /// Marks the pipeline as not running, and why (None: running again).
    pub fn set_failure(&self, why: Option<String>) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// Why the pipeline is not running; None while it runs (or retries its source).
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records how the source ended before a retry (`why` already redacted).
    pub fn set_source_trouble(&self, trouble: SourceTrouble) {
        *self
            .source_trouble
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(trouble);
    }

    /// The source's state for `/status`: `failed` (the pipeline is not running), `connected`, `stalled` or
    /// `reconnecting` (after its last end), else `connecting`; and the last trouble's description.
    pub fn source_state(&self) -> (&'static str, Option<String>) {
        let trouble = self
            .source_trouble
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let state = if self.failure().is_some() {
            "failed"
        } else if self.connected.load(Ordering::Relaxed) {
            "connected"
        } else {
            match &trouble {
                Some(t) if t.stalled => "stalled",
                Some(_) => "reconnecting",
                None => "connecting",
            }
        };
        (state, trouble.map(|t| t.why))
    }

    /// Seconds since the last frame (None: no frame yet).
    pub fn last_frame_age(&self) -> Option<f64> {
        match self.last_frame_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(unix_ms().saturating_sub(ms) as f64 / 1e3),
        }
    }
}

/// The process-wide registry.
#[derive(Debug)]
pub struct Telemetry {
    pipelines: RwLock<BTreeMap<String, Arc<PipelineMetrics>>>,
    pub batch_size: Histogram,
    /// Image trunk runs: each on a batch of crops, shared by every head whose frames are in it.
    pub trunk_runs: AtomicU64,
    pub inference_errors: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// The event deliveries, when `[events]` is configured.
    pub deliveries: Deliveries,
    /// `POST /v1/segment`'s answers and request queue.
    pub segment_requests: SegmentRequests,
    /// The model serving now and the swaps reloads attempted.
    pub models: Models,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            pipelines: RwLock::new(BTreeMap::new()),
            batch_size: Histogram::new(&BATCH_BUCKETS),
            trunk_runs: AtomicU64::new(0),
            inference_errors: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            deliveries: Deliveries::default(),
            segment_requests: SegmentRequests::default(),
            models: Models::default(),
        }
    }
}

/// Per-pipeline figures for `/status`.
#[derive(Debug, Serialize)]
pub struct PipelineStatus {
    pub frames_in: u64,
    pub frames_out: u64,
    pub drops: BTreeMap<&'static str, u64>,
    pub reconnects: u64,
    pub stalls: u64,
    pub connected: bool,
    /// False when the pipeline failed to start or one of its threads died; `error` says why.
    pub running: bool,
    pub error: Option<String>,
    /// `connected`, `reconnecting`, `stalled`, `connecting` or `failed` (see `PipelineMetrics::source_state`).
    pub source_state: &'static str,
    /// How the source last ended (redacted); None if it never has.
    pub source_error: Option<String>,
    pub last_frame_age_s: Option<f64>,
    pub queue_depth: u64,
    /// Bucket upper bounds of the capture → written latency's p50 and p95.
    pub latency_p50_s: Option<f64>,
    pub latency_p95_s: Option<f64>,
}

impl Telemetry {
    /// The metrics of a pipeline, created on first use. A pipeline that is restarted by a reload keeps its
    /// counters, so rates stay continuous.
    pub fn pipeline(&self, name: &str) -> Arc<PipelineMetrics> {
        if let Ok(map) = self.pipelines.read() {
            if let Some(m) = map.get(name) {
                return Arc::clone(m);
            }
        }
        let mut map = self.pipelines.write().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            map.entry(name.to_string())
                .or_insert_with(|| Arc::new(PipelineMetrics::new())),
        )
    }

    /// The configured pipelines that are not running, with why: readiness needs this empty.
    pub fn not_running(&self) -> Vec<(String, String)> {
        let map = self.pipelines.read().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .filter_map(|(name, m)| m.failure().map(|why| (name.clone(), why)))
            .collect()
    }

    /// Forgets pipelines that are no longer configured.
    pub fn retain(&self, names: &[String]) {
        let mut map = self.pipelines.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|k, _| names.contains(k));
    }

    pub fn status(&self) -> BTreeMap<String, PipelineStatus> {
        let map = self.pipelines.read().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|(name, m)| {
                let total = m.latency(Stage::Total);
                let (source_state, source_error) = m.source_state();
                (
                    name.clone(),
                    PipelineStatus {
                        frames_in: m.frames_in.load(Ordering::Relaxed),
                        frames_out: m.frames_out.load(Ordering::Relaxed),
                        drops: DropReason::ALL
                            .iter()
                            .map(|r| (r.key(), m.drops(*r)))
                            .collect(),
                        reconnects: m.reconnects.load(Ordering::Relaxed),
                        stalls: m.stalls.load(Ordering::Relaxed),
                        connected: m.connected.load(Ordering::Relaxed),
                        running: m.failure().is_none(),
                        error: m.failure(),
                        source_state,
                        source_error,
                        last_frame_age_s: m.last_frame_age(),
                        queue_depth: m.queue_depth.load(Ordering::Relaxed),
                        latency_p50_s: total.quantile_bound(0.5),
                        latency_p95_s: total.quantile_bound(0.95),
                    },
                )
            })
            .collect()
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_state_follows_its_last_end_until_it_delivers_again() {
        let m = PipelineMetrics::default();
        assert_eq!(m.source_state(), ("connecting", None));
        m.set_source_trouble(SourceTrouble {
            stalled: false,
            why: "connection refused".into(),
        });
        assert_eq!(
            m.source_state(),
            ("reconnecting", Some("connection refused".into()))
        );
        m.set_source_trouble(SourceTrouble {
            stalled: true,
            why: "no frame for 3.0 s".into(),
        });
        assert_eq!(m.source_state().0, "stalled");
        m.connected.store(true, Ordering::Relaxed);
        assert_eq!(
            m.source_state(),
            ("connected", Some("no frame for 3.0 s".into()))
        );
        m.set_failure(Some("its output thread panicked".into()));
        assert_eq!(m.source_state().0, "failed");
    }
}
