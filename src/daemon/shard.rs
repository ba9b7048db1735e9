//! `serve --shard I/N`: this daemon runs only the pipelines whose name hashes to its shard (`shard::Shard::owns`),
//! so one config serves a fleet of daemons and each camera has exactly one owner. The whole config is still
//! validated (a mistake in any pipeline is every daemon's error, not only its owner's); the share is taken right
//! after, at start-up and at every reload, so the running set never sees the other shards' pipelines.

use std::collections::BTreeMap;

use serde_json::json;

use crate::config::{PipelinePlan, ServeConfig};
use crate::events::EventsConfig;
use crate::shard::{owner, Shard};

/// This daemon's share of a config's pipelines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Share {
    pub shard: Shard,
    /// The pipelines this daemon runs.
    pub runs: Vec<String>,
    /// The pipelines left to the other shards, with the shard that owns each.
    pub skipped: BTreeMap<String, u32>,
}

impl Share {
    /// One line for the log and `/status`.
    pub fn summary(&self) -> String {
        let total = self.runs.len() + self.skipped.len();
        let mut line = format!(
            "shard {}: runs {} of the config's {total} pipelines",
            self.shard,
            self.runs.len()
        );
        if !self.runs.is_empty() {
            line.push_str(&format!(" ({})", self.runs.join(", ")));
        }
        if !self.skipped.is_empty() {
            let others: Vec<String> = self
                .skipped
                .iter()
                .map(|(name, owner)| format!("{name} → shard {owner}"))
                .collect();
            line.push_str(&format!(
                "; leaves {} to other shards ({})",
                self.skipped.len(),
                others.join(", ")
            ));
        }
        line
    }

    /// `/status`'s `daemon.shard`.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "shard": self.shard.to_string(),
            "index": self.shard.index,
            "count": self.shard.count,
            "runs": self.runs,
            "skipped": self.skipped,
            "summary": self.summary(),
        })
    }
}

/// Keeps only this shard's pipelines in `config` and `plans`; None (and nothing removed) without a shard.
pub(super) fn keep_share(
    shard: Option<Shard>,
    config: &mut ServeConfig,
    plans: &mut Vec<PipelinePlan>,
) -> Option<Share> {
    let shard = shard?;
    let mut skipped = BTreeMap::new();
    let mut runs = Vec::new();
    for pipeline in &config.pipelines {
        if shard.owns(&pipeline.name) {
            runs.push(pipeline.name.clone());
        } else {
            skipped.insert(pipeline.name.clone(), owner(&pipeline.name, shard.count));
        }
    }
    config.pipelines.retain(|p| shard.owns(&p.name));
    plans.retain(|p| shard.owns(&p.config.name));
    let share = Share {
        shard,
        runs,
        skipped,
    };
    if share.runs.is_empty() {
        tracing::warn!(
            "{}: this daemon has nothing to run until a reload adds a pipeline of its shard (are there more \
             shards than pipelines?)",
            share.summary()
        );
    } else {
        tracing::info!("{}", share.summary());
    }
    Some(share)
}

/// Daemons of one config share its `[events.mqtt]` client id, and a broker lets only one client hold an id: each
/// shard connects as `<client_id>-<index>` (which also names its own Home Assistant device).
pub(super) fn events_config(shard: Option<Shard>, config: &EventsConfig) -> EventsConfig {
    let mut config = config.clone();
    if let (Some(shard), Some(mqtt)) = (shard, config.mqtt.as_mut()) {
        mqtt.client_id = format!("{}-{}", mqtt.client_id, shard.index);
        tracing::info!(
            "shard {shard}: MQTT client id {} (one per shard)",
            mqtt.client_id
        );
    }
    config
}
