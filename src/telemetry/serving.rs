//! What the daemon serves besides its pipelines: `POST /v1/segment`'s answers and request queue, and the model
//! (which one serves now, and how its swaps went). The request queue lives with the inference worker (floor 5)
//! and the model with the daemon; telemetry (floor 0) reads the queue's depth through a function the daemon
//! registers once the worker runs, and is told of each model and swap.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use serde::Serialize;

use super::{Histogram, LATENCY_BUCKETS};

/// How a `POST /v1/segment` request ended, from its status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentOutcome {
    /// Segmented and answered (2xx).
    Served,
    /// Refused because the request queue was full (429).
    Rejected,
    /// Refused for what the request was: a bad image, parameter or token, too large (4xx but 429).
    Invalid,
    /// The daemon could not serve it: inference failed, starting or stopping (5xx).
    Failed,
}

impl SegmentOutcome {
    pub const ALL: [SegmentOutcome; 4] = [
        SegmentOutcome::Served,
        SegmentOutcome::Rejected,
        SegmentOutcome::Invalid,
        SegmentOutcome::Failed,
    ];

    pub fn from_code(code: u16) -> SegmentOutcome {
        match code {
            429 => SegmentOutcome::Rejected,
            400..=499 => SegmentOutcome::Invalid,
            200..=399 => SegmentOutcome::Served,
            _ => SegmentOutcome::Failed,
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            SegmentOutcome::Served => "served",
            SegmentOutcome::Rejected => "rejected",
            SegmentOutcome::Invalid => "invalid",
            SegmentOutcome::Failed => "failed",
        }
    }

    fn index(self) -> usize {
        SegmentOutcome::ALL
            .iter()
            .position(|o| *o == self)
            .unwrap_or(0)
    }
}

/// Reads how many requests wait in the queue now.
type DepthReader = Box<dyn Fn() -> u64 + Send + Sync>;

/// `POST /v1/segment`: answers by status code and by outcome, how long each took, and its request queue.
pub struct SegmentRequests {
    by_code: Mutex<BTreeMap<u16, u64>>,
    by_outcome: [AtomicU64; SegmentOutcome::ALL.len()],
    pub latency: Histogram,
    /// The queue's capacity and its depth reader, once the inference worker runs.
    queue: RwLock<Option<(u64, DepthReader)>>,
}

impl std::fmt::Debug for SegmentRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentRequests")
            .field("figures", &self.figures())
            .finish()
    }
}

impl Default for SegmentRequests {
    fn default() -> Self {
        SegmentRequests {
            by_code: Mutex::new(BTreeMap::new()),
            by_outcome: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: Histogram::new(&LATENCY_BUCKETS),
            queue: RwLock::new(None),
        }
    }
}

/// The request queue's figures for `/status` and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SegmentFigures {
    /// Requests waiting for the inference worker now.
    pub depth: u64,
    /// The most that may wait (`http.segment_queue`); 0 before the worker runs.
    pub capacity: u64,
    pub served: u64,
    /// Refused with 429 (queue full).
    pub rejected: u64,
    /// Refused with another 4xx (bad image, parameter or token).
    pub invalid: u64,
    /// Answered with 5xx (inference failed, starting or stopping).
    pub failed: u64,
}

impl SegmentRequests {
    /// An answer sent with `code`, `took` after the request arrived.
    pub fn record(&self, code: u16, took: Duration) {
        *self
            .by_code
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(code)
            .or_default() += 1;
        self.by_outcome[SegmentOutcome::from_code(code).index()].fetch_add(1, Ordering::Relaxed);
        self.latency.observe(took.as_secs_f64());
    }

    /// (status code, answers) for every code answered so far.
    pub fn by_code(&self) -> Vec<(u16, u64)> {
        let counts = self.by_code.lock().unwrap_or_else(|e| e.into_inner());
        counts.iter().map(|(c, n)| (*c, *n)).collect()
    }

    pub fn outcome(&self, outcome: SegmentOutcome) -> u64 {
        self.by_outcome[outcome.index()].load(Ordering::Relaxed)
    }

    /// Registers the request queue: its capacity, and how to read its depth (called once the worker runs; the
    /// reader must not keep the worker alive).
    pub fn register_queue(&self, capacity: usize, depth: impl Fn() -> u64 + Send + Sync + 'static) {
        *self.queue.write().unwrap_or_else(|e| e.into_inner()) =
            Some((capacity as u64, Box::new(depth)));
    }

    pub fn figures(&self) -> SegmentFigures {
        let (depth, capacity) = self
            .queue
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or((0, 0), |(capacity, depth)| (depth(), *capacity));
        SegmentFigures {
            depth,
            capacity,
            served: self.outcome(SegmentOutcome::Served),
            rejected: self.outcome(SegmentOutcome::Rejected),
            invalid: self.outcome(SegmentOutcome::Invalid),
            failed: self.outcome(SegmentOutcome::Failed),
        }
    }
}

/// The model serving now, as `/metrics`' `tclseg_model_info` labels it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelLabel {
    pub name: String,
    pub sha256: String,
}

/// The serving model and the model swaps a reload attempted.
#[derive(Debug, Default)]
pub struct Models {
    serving: Mutex<Option<ModelLabel>>,
    swaps_ok: AtomicU64,
    swaps_failed: AtomicU64,
}

/// The model swaps' figures for `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SwapFigures {
    pub ok: u64,
    pub failed: u64,
}

impl Models {
    /// The model serving from now on (at start-up, and after each swap).
    pub fn set_serving(&self, name: &str, sha256: &str) {
        *self.serving.lock().unwrap_or_else(|e| e.into_inner()) = Some(ModelLabel {
            name: name.to_string(),
            sha256: sha256.to_string(),
        });
    }

    pub fn serving(&self) -> Option<ModelLabel> {
        self.serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A reload that changed `[model]` swapped it in (`ok`) or kept the old one (the new one failed to load).
    pub fn swapped(&self, ok: bool) {
        let counter = if ok {
            &self.swaps_ok
        } else {
            &self.swaps_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn swaps(&self) -> SwapFigures {
        SwapFigures {
            ok: self.swaps_ok.load(Ordering::Relaxed),
            failed: self.swaps_failed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    use super::*;

    #[test]
    fn answers_count_by_outcome_and_the_queue_reads_its_registered_depth() {
        let requests = SegmentRequests::default();
        assert_eq!(requests.figures().capacity, 0, "no queue yet");
        for code in [200, 200, 429, 400, 413, 500, 503] {
            requests.record(code, Duration::from_millis(5));
        }
        let depth = Arc::new(AtomicU64::new(3));
        let reader = Arc::clone(&depth);
        requests.register_queue(4, move || reader.load(Ordering::Relaxed));
        assert_eq!(
            requests.figures(),
            SegmentFigures {
                depth: 3,
                capacity: 4,
                served: 2,
                rejected: 1,
                invalid: 2,
                failed: 2,
            }
        );
        depth.store(0, Ordering::Relaxed);
        assert_eq!(requests.figures().depth, 0);
        assert_eq!(requests.latency.count(), 7);
    }
}
