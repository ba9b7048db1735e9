//! What a reload changes: which pipelines to add, remove, restart or update in place, and which global changes
//! only take effect after a restart.

use super::{PipelineConfig, ServeConfig};

/// How one pipeline that exists in both configs changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipelineChange {
    /// Only queries, thresholds or the head: the running source and sink stay; new text embeddings and settings
    /// are swapped in.
    Queries,
    /// The source, queue, rate or outputs changed: the pipeline is stopped and started again.
    Restart,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<(String, PipelineChange)>,
    /// Global sections that changed but need a restart of the daemon, e.g. `http`. Not `[model]`: a reload
    /// swaps the model in place (`daemon/running.rs`).
    pub needs_restart: Vec<String>,
}

impl ConfigDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.needs_restart.is_empty()
    }
}

pub fn diff(old: &ServeConfig, new: &ServeConfig) -> ConfigDiff {
    let mut d = ConfigDiff::default();
    if old.http != new.http {
        d.needs_restart.push("http".into());
    }
    if old.inference != new.inference {
        d.needs_restart.push("inference".into());
    }
    // The outbox, the MQTT session and the webhooks are opened once; reopening them under running deliveries
    // is not worth the risk of losing queued events.
    if old.events != new.events {
        d.needs_restart.push("events".into());
    }
    let find = |list: &[PipelineConfig], name: &str| list.iter().find(|p| p.name == name).cloned();
    for p in &new.pipelines {
        match find(&old.pipelines, &p.name) {
            None => d.added.push(p.name.clone()),
            Some(o) if o == *p => {}
            Some(o) => d.changed.push((p.name.clone(), change_kind(&o, p))),
        }
    }
    for p in &old.pipelines {
        if find(&new.pipelines, &p.name).is_none() {
            d.removed.push(p.name.clone());
        }
    }
    d
}

fn change_kind(old: &PipelineConfig, new: &PipelineConfig) -> PipelineChange {
    let strip = |p: &PipelineConfig| PipelineConfig {
        queries: Vec::new(),
        pamr: None,
        bg_thresh: None,
        kp_weight: None,
        head: None,
        ..p.clone()
    };
    if strip(old) == strip(new) {
        PipelineChange::Queries
    } else {
        PipelineChange::Restart
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OutputConfig, QueryEntry};

    fn pipeline(name: &str, source: &str, query: &str) -> PipelineConfig {
        PipelineConfig {
            name: name.into(),
            source: Some(source.into()),
            source_file: None,
            folder_mode: None,
            queries: vec![QueryEntry::Name(query.into())],
            pamr: None,
            bg_thresh: None,
            kp_weight: None,
            head: None,
            max_fps: None,
            queue: None,
            watchdog_s: 10.0,
            backoff_initial_s: 0.5,
            backoff_max_s: 30.0,
            rtsp_transport: None,
            password_file: None,
            folder_settle_s: None,
            output: OutputConfig {
                dir: format!("/tmp/{name}").into(),
                path: "{frame}".into(),
                labels: true,
                overlay: None,
                json: true,
                jsonl: false,
                video: None,
                retention_hours: None,
                retention_mb: None,
            },
        }
    }

    #[test]
    fn adds_removes_restarts_and_query_swaps() {
        let old = ServeConfig {
            model: Default::default(),
            inference: Default::default(),
            http: Default::default(),
            events: None,
            pipelines: vec![
                pipeline("keep", "rtsp://a", "cat"),
                pipeline("gone", "rtsp://b", "cat"),
                pipeline("requery", "rtsp://c", "cat"),
                pipeline("move", "rtsp://d", "cat"),
            ],
        };
        let mut new = old.clone();
        new.pipelines.remove(1);
        new.pipelines[1].queries = vec![QueryEntry::Name("dog".into())];
        new.pipelines[2].source = Some("rtsp://e".into());
        new.pipelines.push(pipeline("fresh", "rtsp://f", "cat"));
        new.model.device = "cpu".into();
        new.events = Some(Default::default());
        let d = diff(&old, &new);
        assert_eq!(d.added, ["fresh"]);
        assert_eq!(d.removed, ["gone"]);
        assert_eq!(
            d.changed,
            [
                ("requery".to_string(), PipelineChange::Queries),
                ("move".to_string(), PipelineChange::Restart)
            ]
        );
        // A changed [model] is swapped in by the reload, not left for a restart.
        assert_eq!(d.needs_restart, ["events"]);
        assert!(diff(&old, &old).is_empty());
    }

    #[test]
    fn a_source_option_change_restarts_the_source_and_a_head_change_does_not() {
        let old = ServeConfig {
            model: Default::default(),
            inference: Default::default(),
            http: Default::default(),
            events: None,
            pipelines: vec![pipeline("cam", "rtsp://a", "cat")],
        };
        let mut new = old.clone();
        new.pipelines[0].head = Some("naclip".into());
        assert_eq!(
            diff(&old, &new).changed,
            [("cam".to_string(), PipelineChange::Queries)]
        );
        let mut new = old.clone();
        new.pipelines[0].rtsp_transport = Some("udp".into());
        assert_eq!(
            diff(&old, &new).changed,
            [("cam".to_string(), PipelineChange::Restart)]
        );
        let mut new = old.clone();
        new.pipelines[0].password_file = Some("/run/secrets/cam".into());
        assert_eq!(
            diff(&old, &new).changed,
            [("cam".to_string(), PipelineChange::Restart)]
        );
    }
}
