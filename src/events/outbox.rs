//! The durable outbox: every event waits here until each destination has acknowledged it.
//!
//! An embedded store (redb) rather than a hand-written journal: its commits are atomic and fsync'd, so a push that
//! returned survives a crash or a restart, and a torn write cannot corrupt what was there. One table per
//! destination (MQTT, each webhook) keyed by one global sequence number, so each destination delivers in push
//! order (hence in order per pipeline) and acknowledges on its own. The store is bounded: past `capacity` entries a
//! destination's oldest are dropped and counted, so a receiver that never returns cannot fill the disk.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use serde::Deserialize;
use tokio::sync::Notify;

use super::event::Event;

/// The `[events.outbox]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// The store's file; None lets the daemon place it in its state directory.
    pub path: Option<PathBuf>,
    /// Most events kept per destination; the oldest go first.
    pub capacity: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            path: None,
            capacity: 100_000,
        }
    }
}

/// Why the outbox failed: the store (disk full, a second process holding it) or an undecodable entry.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("event outbox {path}: {source}")]
    Store {
        path: String,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("event outbox has no destination named {0:?}")]
    NoDestination(String),
}

/// What the metrics and `/status` read for one destination; plain atomics so any thread reads them for free.
#[derive(Debug, Default)]
pub struct OutboxCounters {
    /// Events waiting for this destination.
    pub depth: AtomicU64,
    /// Events acknowledged by the destination.
    pub delivered: AtomicU64,
    /// Delivery attempts after a failure (a publish replayed after a reconnect, a webhook POST retried).
    pub retried: AtomicU64,
    /// Events dropped because the outbox was full (or an entry could not be read back).
    pub dropped: AtomicU64,
}

struct Destination {
    name: String,
    counters: Arc<OutboxCounters>,
    notify: Arc<Notify>,
}

struct Inner {
    db: Database,
    path: String,
    capacity: u64,
    destinations: Vec<Destination>,
    /// The next sequence number; the lock also orders pushes.
    next_seq: Mutex<u64>,
}

/// A handle on the outbox; clones share the store.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

fn table(name: &str) -> TableDefinition<'_, u64, &'static [u8]> {
    TableDefinition::new(name)
}

impl Outbox {
    /// Open (or create) the store at `path` with one queue per destination name. Events already waiting from an
    /// earlier run are kept and delivered first.
    pub fn open(path: &Path, capacity: u64, destinations: &[&str]) -> Result<Outbox, OutboxError> {
        let shown = path.display().to_string();
        let err = |e: redb::Error| OutboxError::Store {
            path: shown.clone(),
            source: Box::new(e),
        };
        let db = Database::create(path).map_err(|e| err(e.into()))?;
        let mut next = 0u64;
        let mut dests = Vec::new();
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        for name in destinations {
            let t = txn.open_table(table(name)).map_err(|e| err(e.into()))?;
            if let Some((k, _)) = t.last().map_err(|e| err(e.into()))? {
                next = next.max(k.value() + 1);
            }
            let counters = OutboxCounters::default();
            counters
                .depth
                .store(t.len().map_err(|e| err(e.into()))?, Ordering::Relaxed);
            dests.push(Destination {
                name: name.to_string(),
                counters: Arc::new(counters),
                notify: Arc::new(Notify::new()),
            });
        }
        txn.commit().map_err(|e| err(e.into()))?;
        Ok(Outbox {
            inner: Arc::new(Inner {
                db,
                path: shown,
                capacity: capacity.max(1),
                destinations: dests,
                next_seq: Mutex::new(next),
            }),
        })
    }

    fn err(&self, e: impl Into<redb::Error>) -> OutboxError {
        OutboxError::Store {
            path: self.inner.path.clone(),
            source: Box::new(e.into()),
        }
    }

    fn destination(&self, name: &str) -> Result<&Destination, OutboxError> {
        self.inner
            .destinations
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| OutboxError::NoDestination(name.to_string()))
    }

    /// The counters of `destination`.
    pub fn counters(&self, destination: &str) -> Result<Arc<OutboxCounters>, OutboxError> {
        Ok(self.destination(destination)?.counters.clone())
    }

    /// Signalled after each push, so a delivery task sleeps until there is work.
    pub fn notifier(&self, destination: &str) -> Result<Arc<Notify>, OutboxError> {
        Ok(self.destination(destination)?.notify.clone())
    }

    /// Store `events` for every destination in one durable commit; when it returns they survive a crash.
    pub fn push(&self, events: &[Event]) -> Result<(), OutboxError> {
        if events.is_empty() {
            return Ok(());
        }
        let bodies: Vec<Vec<u8>> = events.iter().map(Event::to_json).collect();
        // A poisoned lock only means another push panicked; the sequence number in it is still right.
        let mut next = self
            .inner
            .next_seq
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let txn = self.inner.db.begin_write().map_err(|e| self.err(e))?;
        let mut depths = Vec::new();
        for d in &self.inner.destinations {
            let mut t = txn.open_table(table(&d.name)).map_err(|e| self.err(e))?;
            for (i, body) in bodies.iter().enumerate() {
                t.insert(*next + i as u64, body.as_slice())
                    .map_err(|e| self.err(e))?;
            }
            let mut dropped = 0;
            while t.len().map_err(|e| self.err(e))? > self.inner.capacity {
                t.pop_first().map_err(|e| self.err(e))?;
                dropped += 1;
            }
            depths.push((d, t.len().map_err(|e| self.err(e))?, dropped));
        }
        txn.commit().map_err(|e| self.err(e))?;
        *next += bodies.len() as u64;
        for (d, depth, dropped) in depths {
            d.counters.depth.store(depth, Ordering::Relaxed);
            if dropped > 0 {
                d.counters.dropped.fetch_add(dropped, Ordering::Relaxed);
                tracing::warn!(destination = %d.name, dropped, "event outbox full: oldest events dropped");
            }
            d.notify.notify_one();
        }
        Ok(())
    }

    /// Up to `max` events waiting for `destination` with a sequence number above `after`, oldest first. An entry
    /// that no longer decodes (written by an incompatible version) is removed and counted as dropped.
    pub fn pending(
        &self,
        destination: &str,
        after: Option<u64>,
        max: usize,
    ) -> Result<Vec<(u64, Event)>, OutboxError> {
        let d = self.destination(destination)?;
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut out = Vec::new();
        let mut bad = Vec::new();
        {
            let txn = self.inner.db.begin_read().map_err(|e| self.err(e))?;
            let t = txn.open_table(table(&d.name)).map_err(|e| self.err(e))?;
            for entry in t.range(start..).map_err(|e| self.err(e))? {
                if out.len() >= max {
                    break;
                }
                let (k, v) = entry.map_err(|e| self.err(e))?;
                match serde_json::from_slice::<Event>(v.value()) {
                    Ok(e) => out.push((k.value(), e)),
                    Err(error) => {
                        tracing::warn!(destination, seq = k.value(), %error, "undecodable event dropped");
                        bad.push(k.value());
                    }
                }
            }
        }
        if !bad.is_empty() {
            let n = self.remove(d, &bad)?;
            d.counters.dropped.fetch_add(n, Ordering::Relaxed);
        }
        Ok(out)
    }

    /// The destination has the events `seqs`: remove them. Acks are committed without an fsync of their own (the
    /// next push's commit makes them durable): a crash in between redelivers a few events, which at-least-once
    /// allows and the event ids let a consumer drop.
    pub fn ack(&self, destination: &str, seqs: &[u64]) -> Result<(), OutboxError> {
        let d = self.destination(destination)?;
        let n = self.remove(d, seqs)?;
        d.counters.delivered.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn remove(&self, d: &Destination, seqs: &[u64]) -> Result<u64, OutboxError> {
        let mut txn = self.inner.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(Durability::None)
            .map_err(|e| self.err(e))?;
        let mut n = 0;
        let depth;
        {
            let mut t = txn.open_table(table(&d.name)).map_err(|e| self.err(e))?;
            for s in seqs {
                if t.remove(s).map_err(|e| self.err(e))?.is_some() {
                    n += 1;
                }
            }
            depth = t.len().map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))?;
        d.counters.depth.store(depth, Ordering::Relaxed);
        Ok(n)
    }
}
