//! The one entry point the daemon's output path needs: presence per pipeline, the outbox, and the delivery tasks.
//!
//! `observe` runs on the output path for every segmented frame: it updates the pipeline's presence and stores the
//! resulting events in the outbox with one fsync'd commit (only when there are events, which hysteresis keeps
//! rare). It blocks on the disk, so call it from the sink's thread or `spawn_blocking`, not on a tokio worker.
//! The delivery tasks (`spawn`) run on tokio and read the outbox on their own.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::mqtt::{Catalog, MqttSink};
use super::outbox::{Outbox, OutboxCounters, OutboxError};
use super::state::{boot_id, PipelineState};
use super::webhook::WebhookSink;
use super::{Event, EventsConfig, FrameStats};
use crate::telemetry::{Delivery, DeliverySource};

/// The outbox destination MQTT reads.
pub const MQTT_DESTINATION: &str = "mqtt";

/// Events for the whole daemon: one per process, shared by every pipeline's output path.
pub struct Events {
    config: EventsConfig,
    boot: String,
    states: Mutex<HashMap<String, PipelineState>>,
    outbox: Outbox,
}

impl Events {
    /// Open the outbox (at `outbox.path`, else `<state_dir>/events.redb`) with one queue per configured
    /// destination. Events left from an earlier run stay queued and go out once `spawn` runs.
    pub fn open(config: EventsConfig, state_dir: &Path) -> Result<Events, OutboxError> {
        let path = config
            .outbox
            .path
            .clone()
            .unwrap_or_else(|| state_dir.join("events.redb"));
        let names = destinations(&config);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let outbox = Outbox::open(&path, config.outbox.capacity, &refs)?;
        Ok(Events {
            config,
            boot: boot_id(),
            states: Mutex::new(HashMap::new()),
            outbox,
        })
    }

    /// Whether `pipeline`'s frames must carry their label map (it has zones): see `EventsConfig::needs_labels`.
    pub fn needs_labels(&self, pipeline: &str) -> bool {
        self.config.needs_labels(pipeline)
    }

    /// Feed one segmented frame; returns the events it made (already stored durably).
    pub fn observe(&self, frame: &FrameStats) -> Result<Vec<Event>, OutboxError> {
        let events = {
            // A poisoned lock means a panic elsewhere mid-update; the states are still usable.
            let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
            states
                .entry(frame.pipeline.clone())
                .or_insert_with(|| self.config.pipeline_state(&frame.pipeline, &self.boot))
                .observe(frame)
        };
        self.outbox.push(&events)?;
        Ok(events)
    }

    /// A pipeline stopped (removed, or its queries changed on reload): end what it had present, at `at_ms`.
    pub fn close_pipeline(
        &self,
        pipeline: &str,
        at_ms: u64,
        model: &str,
    ) -> Result<(), OutboxError> {
        let state = self
            .states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(pipeline);
        if let Some(mut s) = state {
            self.outbox.push(&s.close(at_ms, model))?;
        }
        Ok(())
    }

    /// Start one delivery task per destination; they end when `shutdown` turns true.
    pub fn spawn(
        &self,
        catalog: watch::Receiver<Catalog>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        if let Some(m) = &self.config.mqtt {
            let sink = MqttSink::new(m.clone(), self.outbox.clone(), MQTT_DESTINATION);
            tasks.push(tokio::spawn(sink.run(catalog, shutdown.clone())));
        }
        for w in &self.config.webhooks {
            let sink = WebhookSink::new(w.clone(), self.outbox.clone());
            tasks.push(tokio::spawn(sink.run(shutdown.clone())));
        }
        tasks
    }

    /// Each destination's counters, for `/metrics` and `/status`.
    pub fn counters(&self) -> Vec<(String, Arc<OutboxCounters>)> {
        destinations(&self.config)
            .into_iter()
            .filter_map(|d| self.outbox.counters(&d).ok().map(|c| (d, c)))
            .collect()
    }
}

impl DeliverySource for Events {
    fn deliveries(&self) -> Vec<Delivery> {
        self.counters()
            .into_iter()
            .map(|(destination, c)| Delivery {
                destination,
                depth: c.depth.load(Ordering::Relaxed),
                delivered: c.delivered.load(Ordering::Relaxed),
                retried: c.retried.load(Ordering::Relaxed),
                dropped: c.dropped.load(Ordering::Relaxed),
            })
            .collect()
    }
}

fn destinations(config: &EventsConfig) -> Vec<String> {
    let mut names: Vec<String> = config
        .mqtt
        .iter()
        .map(|_| MQTT_DESTINATION.to_string())
        .collect();
    names.extend(config.webhooks.iter().map(|w| w.destination()));
    names
}
