//! The event deliveries' figures (per destination: outbox depth, delivered, retried, dropped) for `/metrics` and
//! `/status`. The counters live with the events outbox (floor 3); telemetry (floor 0) reads them through
//! `DeliverySource`, which the daemon registers once when `[events]` is configured.

use std::sync::{Arc, RwLock};

use serde::Serialize;

/// One destination's figures at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Delivery {
    /// `mqtt` or `webhook:<name>`.
    pub destination: String,
    /// Events waiting in the outbox for this destination.
    pub depth: u64,
    pub delivered: u64,
    pub retried: u64,
    /// Events dropped because the outbox was full.
    pub dropped: u64,
}

/// Whatever can report the deliveries' figures (the daemon's `events::Events`).
pub trait DeliverySource: Send + Sync {
    fn deliveries(&self) -> Vec<Delivery>;
}

/// The registered source, if any.
#[derive(Default)]
pub struct Deliveries(RwLock<Option<Arc<dyn DeliverySource>>>);

impl std::fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Deliveries")
    }
}

impl Deliveries {
    pub fn register(&self, source: Arc<dyn DeliverySource>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// Every destination's figures; empty without events.
    pub fn figures(&self) -> Vec<Delivery> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|s| s.deliveries())
            .unwrap_or_default()
    }
}
