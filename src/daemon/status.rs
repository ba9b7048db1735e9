//! What the daemon says about itself: readiness (`/readyz`), the `/status` document and the one-line summary
//! systemd shows (`STATUS=`). The HTTP handlers and the watchdog read it while the running set changes under a
//! reload, so it holds its own copy of what it reports (`publish`) instead of borrowing the running set.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde_json::json;

use super::segment::SegmentLimits;
use super::shard::Share;
use crate::model::Engine;
use crate::pipeline::worker::Scheduler;
use crate::pipeline::Pipeline;
use crate::shard::Shard;
use crate::telemetry::Telemetry;

/// What the HTTP endpoints read.
pub struct State {
    pub telemetry: Arc<Telemetry>,
    /// The model is warm and the pipelines were started (false again while draining). Readiness also needs
    /// every pipeline running: see `not_ready`.
    pub ready: AtomicBool,
    started: Instant,
    /// `/status`'s `daemon` part: the config file, the model and the running pipelines as last published.
    info: Mutex<serde_json::Value>,
    /// The bearer token mutating endpoints require (`http.token_file`); None: they are open (loopback only).
    pub(super) token: Option<String>,
    /// `POST /v1/segment`'s body and pixel limits (`[http]`).
    pub(super) segment_limits: SegmentLimits,
    /// The inference worker and the model it runs, once started: where `POST /v1/segment` sends its images.
    worker: OnceLock<Arc<Scheduler>>,
    /// `serve --shard`: the share of the config's pipelines this daemon runs (fixed until a restart).
    shard: OnceLock<Shard>,
    /// The live page's switch, listener guard and login sessions (`session.rs`; set by `with_access`).
    pub(super) access: super::session::Access,
    /// What the live page reads of each pipeline (`live.rs`), published with the rest.
    pub(super) live: super::live::Board,
}

impl State {
    /// Not ready yet: nothing is loaded, and `/status` names only the config file.
    pub(super) fn new(
        telemetry: Arc<Telemetry>,
        config_path: &Path,
        token: Option<String>,
        segment_limits: SegmentLimits,
    ) -> State {
        State {
            telemetry,
            ready: AtomicBool::new(false),
            started: Instant::now(),
            info: Mutex::new(json!({ "config": config_path.display().to_string() })),
            token,
            segment_limits,
            worker: OnceLock::new(),
            shard: OnceLock::new(),
            access: super::session::Access::default(),
            live: super::live::Board::default(),
        }
    }

    /// Records the inference worker once it runs (it does not change until a restart), and shows its request
    /// queue in `/status` and `/metrics`. The depth reader holds the worker weakly: telemetry outlives it.
    pub(super) fn set_worker(&self, scheduler: &Arc<Scheduler>) {
        let _ = self.worker.set(Arc::clone(scheduler));
        let worker = Arc::downgrade(scheduler);
        self.telemetry
            .segment_requests
            .register_queue(scheduler.requests.capacity(), move || {
                worker.upgrade().map_or(0, |w| w.requests.len() as u64)
            });
    }

    /// The inference worker; None until start-up has loaded the model.
    pub(super) fn worker(&self) -> Option<&Arc<Scheduler>> {
        self.worker.get()
    }

    /// Why the daemon is not ready, or None when it is: started, and every configured pipeline running (a
    /// source that is retrying counts as running; a pipeline that failed to start or lost a thread does not).
    pub fn not_ready(&self) -> Option<String> {
        if !self.ready.load(Ordering::Relaxed) {
            return Some("starting or stopping".into());
        }
        let failed = self.telemetry.not_running();
        if failed.is_empty() {
            return None;
        }
        Some(
            failed
                .iter()
                .map(|(name, why)| format!("pipeline '{name}' is not running: {why}"))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }

    /// The `/status` document: readiness, uptime, what runs (`publish`), every pipeline's counters, the event
    /// deliveries, `POST /v1/segment`'s queue and answers, and the model swaps.
    pub fn status(&self) -> serde_json::Value {
        let info = self.info.lock().map(|i| i.clone()).unwrap_or_default();
        let metrics = serde_json::to_value(self.telemetry.status()).unwrap_or_default();
        let not_ready = self.not_ready();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "ready": not_ready.is_none(),
            "not_ready": not_ready,
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "daemon": info,
            "pipelines": metrics,
            "events": self.telemetry.deliveries.figures(),
            "segment_requests": self.telemetry.segment_requests.figures(),
            "model_swaps": self.telemetry.models.swaps(),
        })
    }

    /// Records the model serving now: once warm at start-up, and again when a reload swaps in another.
    pub(super) fn set_model(&self, engine: &Engine, model_dir: &Path) {
        let manifest = engine.bundle().manifest();
        self.telemetry
            .models
            .set_serving(&manifest.name, engine.manifest_sha256());
        if let Ok(mut info) = self.info.lock() {
            info["model"] = json!({
                "name": manifest.name,
                "version": manifest.version,
                "dir": model_dir.display().to_string(),
                "manifest_sha256": engine.manifest_sha256(),
                "device": format!("{:?}", engine.device()).to_lowercase(),
                "precision": engine.precision().key(),
                "precision_reason": engine.precision_reason(),
                "kernels": engine.kernels(),
                "cpu_flags": engine.cpu_features().names(),
            });
        }
    }

    /// Describes the running pipelines for `/status` (sources redacted); called after start-up and each reload.
    pub(super) fn publish(&self, pipelines: &BTreeMap<String, Pipeline>) {
        let pipelines: serde_json::Map<String, serde_json::Value> = pipelines
            .iter()
            .map(|(name, p)| {
                let plan = &p.shared.plan;
                (
                    name.clone(),
                    json!({
                        "source": plan.source.redacted(),
                        "queue": format!("{:?}", plan.queue).to_lowercase(),
                        "max_fps": plan.config.max_fps,
                        "output": plan.config.output.dir.display().to_string(),
                        // The queries running now: a reload may have changed them in place.
                        "queries": p.shared.queries().queries.specs.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
                        // The configured head (null: the bundle's default head).
                        "head": plan.config.head,
                    }),
                )
            })
            .collect();
        if let Ok(mut info) = self.info.lock() {
            info["pipelines"] = serde_json::Value::Object(pipelines);
        }
    }

    /// The one-line summary for systemd's STATUS= and the "ready" log line.
    pub(super) fn line(&self) -> String {
        let status = self.telemetry.status();
        let connected = status.values().filter(|p| p.connected).count();
        let out: u64 = status.values().map(|p| p.frames_out).sum();
        let failed: Vec<&str> = status
            .iter()
            .filter(|(_, p)| !p.running)
            .map(|(name, _)| name.as_str())
            .collect();
        let failed = if failed.is_empty() {
            String::new()
        } else {
            format!(" ({} not running: {})", failed.len(), failed.join(", "))
        };
        format!(
            "{} pipelines{failed}, {connected} sources delivering, {out} frames written",
            status.len()
        )
    }
}

/// `serve --shard`: which shard this daemon is and which pipelines it leaves to the others (`/status`'s
/// `daemon.shard`).
impl State {
    /// The shard this daemon runs (None: every pipeline of the config).
    pub(super) fn shard(&self) -> Option<Shard> {
        self.shard.get().copied()
    }

    /// Records this daemon's share; at start-up and after each reload (whose new pipelines may be its or not).
    pub(super) fn set_share(&self, share: &Share) {
        let _ = self.shard.set(share.shard);
        if let Ok(mut info) = self.info.lock() {
            info["shard"] = share.to_json();
        }
    }
}
