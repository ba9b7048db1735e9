//! The event a consumer receives: one JSON object per start, update and end of a query's presence.
//!
//! Every message carries its own `id` (unique across restarts) so an at-least-once transport can deliver a
//! duplicate and the consumer drops it; `event` is shared by the start, updates and end of one presence, the way
//! Frigate's `id` ties an object's `new`/`update`/`end` together.

use serde::{Deserialize, Serialize};

/// Which step of a presence this message reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Start,
    Update,
    End,
}

/// One event message, as it is stored in the outbox and published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique per message: `<event>#<n>`.
    pub id: String,
    /// Shared by the start, updates and end of one presence.
    pub event: String,
    pub kind: EventKind,
    pub pipeline: String,
    pub query: String,
    /// None for the whole frame; the zone's name otherwise.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub zone: Option<String>,
    /// Frame time (ms since the Unix epoch) the presence began: the first frame of the `on_s` run.
    pub start_ms: u64,
    /// Frame time the presence ended (the first absent frame of the `off_s` run); only on `end`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub end_ms: Option<u64>,
    /// Frame time this message reports.
    pub at_ms: u64,
    /// Fraction of the frame (or of the zone) the query covers, in [0, 1], at `at_ms`.
    pub area: f64,
    /// The largest area seen during this presence so far.
    pub max_area: f64,
    /// `[x, y, width, height]` in image pixels, at `at_ms`; None when the query is not visible in that frame.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bbox: Option<[usize; 4]>,
    /// Mean winning score of the query's pixels (whole frame only: zones report none).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mean_score: Option<f64>,
    /// The model bundle's hash, so a consumer can tell results of different models apart.
    pub model: String,
    /// The bundle head that scored the frame (`tcl`, `naclip`, ...), when known.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub head: Option<String>,
    /// Where the frame's outputs were written, if they were.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub outputs: Option<String>,
}

impl Event {
    /// The JSON body sent to MQTT and webhooks.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings and numbers cannot fail; fall back to an empty object rather than panic.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

/// What one segmented frame says about one query: the statistics the sidecar already computes.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryStats {
    /// The output label of this query in `FrameStats::labels`.
    pub label: u16,
    pub name: String,
    pub fraction: f64,
    pub bbox: Option<[usize; 4]>,
    pub mean_score: Option<f64>,
}

/// One segmented frame, as the events layer needs it. Built by the output path from the frame and its class
/// statistics; `labels` (row-major, `width * height`) is needed only when the pipeline has zones.
#[derive(Debug, Clone, Default)]
pub struct FrameStats {
    pub pipeline: String,
    /// The frame's timestamp in ms since the Unix epoch: hysteresis runs on frame time, not the wall clock, so a
    /// replayed file or a slow pipeline behaves the same as a live one.
    pub at_ms: u64,
    pub width: usize,
    pub height: usize,
    pub labels: Vec<u16>,
    pub queries: Vec<QueryStats>,
    pub model: String,
    /// The bundle head that scored it.
    pub head: Option<String>,
    pub outputs: Option<String>,
}
