//! Events: what the segmented frames mean for the people watching them.
//!
//! Each pipeline keeps a presence state per query (and per zone) in [`state`]; its changes become [`Event`]s that go
//! through a durable [`outbox`] to MQTT 3.1.1 or 5 ([`mqtt`], over [`link`]) and webhooks ([`webhook`]), over TLS
//! where configured ([`tls`]). The daemon opens one [`Events`];
//! its output path calls [`Events::observe`] with each segmented frame's per-query statistics ([`FrameStats`]).
//! This module sits beside `sink` (floor 3): it consumes a segmented frame and imports only the floors below.

pub mod event;
pub mod hub;
pub mod link;
pub mod mqtt;
pub mod outbox;
pub mod state;
pub mod tls;
pub mod topics;
pub mod webhook;
pub mod zones;

use std::collections::BTreeMap;

use serde::Deserialize;
use tokio::sync::watch;

pub use event::{Event, EventKind, FrameStats, QueryStats};
pub use hub::{Events, MQTT_DESTINATION};
pub use mqtt::{Catalog, MqttConfig, MqttSink, Protocol};
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

    /// Every problem in the section, as (key path below `events`, message), so config validation can report them
    /// all at once.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        let mut bad = |path: String, msg: &str| errors.push((path, msg.to_string()));
        if !(0.0..=1.0).contains(&self.min_area) {
            bad("min_area".into(), "must be a fraction between 0 and 1");
        }
        for (key, v) in [
            ("on_s", self.on_s),
            ("off_s", self.off_s),
            ("update_s", self.update_s),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bad(key.into(), "must be a number of seconds, 0 or more");
            }
        }
        for (pipeline, zones) in &self.zones {
            for (zone, polygon) in zones {
                if polygon.len() < 3 || polygon.iter().flatten().any(|c| !c.is_finite()) {
                    bad(
                        format!("zones.{pipeline}.{zone}"),
                        "needs at least 3 finite [x, y] points",
                    );
                }
            }
        }
        if self.outbox.capacity == 0 {
            bad("outbox.capacity".into(), "must be at least 1");
        }
        if let Some(mqtt) = &self.mqtt {
            for (key, msg) in mqtt.validate() {
                bad(format!("mqtt.{key}"), &msg);
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, w) in self.webhooks.iter().enumerate() {
            if w.name.is_empty() || !names.insert(w.name.clone()) {
                bad(format!("webhooks[{i}].name"), "must be present and unique");
            }
            for (key, msg) in w.validate() {
                bad(format!("webhooks[{i}].{key}"), &msg);
            }
        }
        errors
    }

    /// Whether `pipeline` has zones, i.e. whether its [`FrameStats`] must carry the label map (copying it for
    /// every frame is wasted otherwise).
    pub fn needs_labels(&self, pipeline: &str) -> bool {
        self.zones.get(pipeline).is_some_and(|z| !z.is_empty())
    }

    /// A fresh presence state for `pipeline` with its zones.
    pub fn pipeline_state(&self, pipeline: &str, boot: &str) -> PipelineState {
        let zones = self.zones.get(pipeline).cloned().unwrap_or_default();
        PipelineState::new(pipeline, self.state(), zones, boot)
    }
}

/// Resolves once `shutdown` is true or its sender is gone: either way the daemon is going away. (A bare
/// `changed()` resolves at once, forever, after the sender is dropped, and would spin the delivery loops.)
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Whether the delivery tasks should end now.
fn stopped(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow() || shutdown.has_changed().is_err()
}
