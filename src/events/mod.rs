//! Events: what the segmented frames mean for the people watching them.
//!
//! Each pipeline keeps a presence state per query (and per zone) in [`state`]; its changes become [`Event`]s that go
//! through a durable [`outbox`] to MQTT ([`mqtt`]). The output path calls [`PipelineState::observe`] with one
//! segmented frame's per-query statistics ([`FrameStats`]) and pushes what it returns into the [`Outbox`].
//! This module sits beside `sink` (floor 3): it consumes a segmented frame and imports only the floors below.

pub mod event;
pub mod mqtt;
pub mod outbox;
pub mod state;
pub mod topics;
pub mod webhook;
pub mod zones;

use std::collections::BTreeMap;

use serde::Deserialize;

pub use event::{Event, EventKind, FrameStats, QueryStats};
pub use mqtt::{Catalog, MqttConfig, MqttSink};
pub use outbox::{Outbox, OutboxConfig, OutboxCounters, OutboxError};
pub use state::{boot_id, PipelineState};
pub use webhook::{WebhookConfig, WebhookSink};

/// When a query counts as present. The defaults suit a camera nobody tuned: 1% of the frame, seen for 1 s to
/// start, unseen for 5 s to end, an update every 10 s while present.
#[derive(Debug, Clone, PartialEq)]
pub struct StateConfig {
    /// Pixel fraction (0..1) at or above which a query is seen in a frame.
    pub min_area: f64,
    /// Seconds a query must be seen continuously before it is present.
    pub on_s: f64,
    /// Seconds a query must be unseen continuously before its presence ends.
    pub off_s: f64,
    /// Least seconds between two updates of one presence.
    pub update_s: f64,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            min_area: 0.01,
            on_s: 1.0,
            off_s: 5.0,
            update_s: 10.0,
        }
    }
}

/// The `[events]` section. Absent sections mean no events; a present one with no keys tracks presence with the
/// defaults of [`StateConfig`] (and delivers nowhere until a destination is configured). The thresholds are plain
/// keys here rather than a flattened struct because serde cannot flatten under `deny_unknown_fields`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    pub min_area: f64,
    pub on_s: f64,
    pub off_s: f64,
    pub update_s: f64,
    /// Zones per pipeline: pipeline → zone name → polygon (`[[x, y], ...]` in image pixels).
    pub zones: BTreeMap<String, BTreeMap<String, Vec<[f64; 2]>>>,
    pub outbox: OutboxConfig,
    /// MQTT delivery; None publishes nothing.
    pub mqtt: Option<MqttConfig>,
    /// Webhooks, each with its own outbox queue.
    pub webhooks: Vec<WebhookConfig>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        let s = StateConfig::default();
        EventsConfig {
            min_area: s.min_area,
            on_s: s.on_s,
            off_s: s.off_s,
            update_s: s.update_s,
            zones: BTreeMap::new(),
            outbox: OutboxConfig::default(),
            mqtt: None,
            webhooks: Vec::new(),
        }
    }
}

impl EventsConfig {
    /// The presence thresholds.
    pub fn state(&self) -> StateConfig {
        StateConfig {
            min_area: self.min_area,
            on_s: self.on_s,
            off_s: self.off_s,
            update_s: self.update_s,
        }
    }

    /// A fresh presence state for `pipeline` with its zones.
    pub fn pipeline_state(&self, pipeline: &str, boot: &str) -> PipelineState {
        let zones = self.zones.get(pipeline).cloned().unwrap_or_default();
        PipelineState::new(pipeline, self.state(), zones, boot)
    }
}
