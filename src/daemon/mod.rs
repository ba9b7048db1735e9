//! `tclseg serve`: the task tree around the pipelines.
//!
//! Start-up: load and validate the config (every error reported), start HTTP (`/livez` answers at once,
//! `/readyz` only once warm), load the model and warm it up, start every pipeline whose output folder works
//! (a camera that is down does not hold anything up: its supervisor keeps retrying), start the inference worker,
//! then tell systemd READY=1. SIGTERM/SIGINT during start-up stop it at once. Readiness (`/readyz`) also needs
//! every configured pipeline running: one that failed to start or lost a thread is named there, in `/status`
//! and in the STATUS line.
//!
//! Control: SIGHUP or `POST /reload` applies the config diff (see `config::diff`); an invalid new config is
//! rejected with its errors and the old one keeps running. SIGTERM/SIGINT drain: sources stop, queued frames are
//! finished within `inference.drain_timeout_s`, outputs close and videos are finalized. The systemd watchdog is
//! fed only while the inference worker's loop is turning.

pub mod http;
pub mod notify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use crate::config::diff::{diff, PipelineChange};
use crate::config::{self, PipelinePlan, ServeConfig};
use crate::model::{Engine, EngineOptions};
use crate::pipeline::worker::Scheduler;
use crate::pipeline::{Pipeline, PipelineQueries};
use crate::telemetry::Telemetry;

/// The worker may take this long over one batch before the systemd watchdog is starved on purpose.
const WORKER_STALL_LIMIT_S: f64 = 120.0;

/// What the HTTP endpoints read.
pub struct State {
    pub telemetry: Arc<Telemetry>,
    /// The model is warm and the pipelines were started (false again while draining). Readiness also needs
    /// every pipeline running: see `not_ready`.
    pub ready: AtomicBool,
    started: Instant,
    info: Mutex<serde_json::Value>,
    /// The bearer token mutating endpoints require (`http.token_file`); None: they are open (loopback only).
    token: Option<String>,
}

impl State {
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
        })
    }
}

/// Everything the control side owns. Its methods block (thread joins, text encoding): call them off tokio's
/// workers.
struct Daemon {
    config_path: PathBuf,
    config: ServeConfig,
    engine: Arc<Engine>,
    scheduler: Arc<Scheduler>,
    worker: Option<std::thread::JoinHandle<()>>,
    pipelines: BTreeMap<String, Pipeline>,
    state: Arc<State>,
}

/// Runs the daemon until SIGTERM/SIGINT. `resolve_model` turns `model.path` (maybe None) into a bundle folder.
pub fn run(
    config_path: &Path,
    resolve_model: impl Fn(Option<PathBuf>) -> Result<PathBuf>,
) -> Result<()> {
    let (config, plans) = config::load(config_path).map_err(|e| anyhow!("{e}"))?;
    for warning in config::validate::warnings(&config) {
        tracing::warn!("{warning}");
    }
    crate::gst::init()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("tclseg-ctl")
        .build()
        .context("cannot start the tokio runtime")?;
    let model_dir = resolve_model(config.model.path.clone())?;
    let result = runtime.block_on(serve(config_path.to_path_buf(), config, plans, model_dir));
    // Only a start-up abandoned by SIGTERM leaves a blocking task behind; do not wait for it.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn serve(
    config_path: PathBuf,
    config: ServeConfig,
    plans: Vec<PipelinePlan>,
    model_dir: PathBuf,
) -> Result<()> {
    let telemetry = Arc::new(Telemetry::default());
    // Read again here (validation read it too): the file may have changed since, and start-up must not go on
    // with mutating endpoints open when the token cannot be read.
    let token = match &config.http.token_file {
        Some(file) => Some(config::validate::read_token(file).map_err(|e| anyhow!("{e}"))?),
        None => None,
    };
    let state = Arc::new(State {
        telemetry: Arc::clone(&telemetry),
        ready: AtomicBool::new(false),
        started: Instant::now(),
        info: Mutex::new(json!({ "config": config_path.display().to_string() })),
        token,
    });
    // Signals first, so a SIGTERM during the model load is not the default (immediate) death.
    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let (reload_tx, mut reload_rx) = mpsc::channel::<http::ReloadRequest>(4);
    // The HTTP server stops when this is sent or dropped: on every way out of this function, after the drain.
    let (http_stop, http_stopped) = oneshot::channel::<()>();
    let mut http_server = None;
    if !config.http.listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&config.http.listen)
            .await
            .with_context(|| format!("cannot listen on {} (http.listen)", config.http.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(
            "HTTP on http://{addr} (/livez /readyz /metrics /status, POST /reload{})",
            if state.token.is_some() {
                " with the bearer token"
            } else {
                ""
            }
        );
        http_server = Some(tokio::spawn(http::serve(
            listener,
            Arc::clone(&state),
            reload_tx.clone(),
            async move {
                let _ = http_stopped.await;
            },
        )));
    }
    notify::notify("STATUS=loading the model");
    let starting = {
        let state = Arc::clone(&state);
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            Daemon::start(config_path, config, plans, &model_dir, state, telemetry)
        })
    };
    // A start-up can take minutes (a TensorRT engine build, a model on a slow disk): a stop request during it
    // is obeyed at once rather than after it. Nothing has been handed over yet, and whatever a half-started
    // pipeline wrote is as safe as after a crash (atomic files, Matroska video).
    let daemon = tokio::select! {
        started = starting => started.map_err(|e| anyhow!("start-up panicked: {e}"))??,
        _ = sigterm.recv() => {
            stopped_during_start_up("SIGTERM");
            return Ok(());
        }
        _ = sigint.recv() => {
            stopped_during_start_up("SIGINT");
            return Ok(());
        }
    };
    let scheduler = Arc::clone(&daemon.scheduler);
    let daemon = Arc::new(Mutex::new(daemon));
    state.ready.store(true, Ordering::Relaxed);
    let summary = status_line(&state);
    notify::notify(&format!("READY=1\nSTATUS={summary}"));
    match state.not_ready() {
        None => tracing::info!("ready: {summary}"),
        Some(why) => tracing::error!("started, but not ready: {why}"),
    }

    let watchdog = notify::watchdog_interval();
    let mut next_ping = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let why = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                let _ = blocking_reload(&daemon).await;
            }
            Some(reply) = reload_rx.recv() => {
                tracing::info!("reload requested over HTTP");
                let _ = reply.send(blocking_reload(&daemon).await);
            }
            _ = tick.tick() => {
                if let Some(interval) = watchdog {
                    if Instant::now() >= next_ping && scheduler.heartbeat_age() < WORKER_STALL_LIMIT_S {
                        notify::notify(&format!("WATCHDOG=1\nSTATUS={}", status_line(&state)));
                        next_ping = Instant::now() + interval;
                    }
                }
            }
        }
    };
    tracing::info!("{why}: draining (in-flight frames finish, videos are finalized)");
    state.ready.store(false, Ordering::Relaxed);
    notify::notify("STOPPING=1\nSTATUS=draining");
    let stopped = tokio::task::spawn_blocking(move || {
        let mut guard = daemon
            .lock()
            .map_err(|_| anyhow!("daemon state poisoned"))?;
        guard.shutdown()
    })
    .await;
    match stopped {
        Ok(result) => result?,
        Err(e) => return Err(anyhow!("shutdown panicked: {e}")),
    }
    // Closing the reload channel first answers a reload still waiting with 503, so no answer holds the server.
    drop(reload_rx);
    let _ = http_stop.send(());
    if let Some(server) = http_server {
        let _ = server.await;
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

fn stopped_during_start_up(why: &str) {
    tracing::info!("{why} during start-up: stopping without finishing it");
    notify::notify("STOPPING=1\nSTATUS=stopped during start-up");
}

async fn blocking_reload(
    daemon: &Arc<Mutex<Daemon>>,
) -> Result<serde_json::Value, serde_json::Value> {
    let daemon = Arc::clone(daemon);
    tokio::task::spawn_blocking(move || match daemon.lock() {
        Ok(mut d) => d.reload(),
        Err(_) => Err(json!({ "errors": ["daemon state poisoned"] })),
    })
    .await
    .unwrap_or_else(|e| Err(json!({ "errors": [format!("reload panicked: {e}")] })))
}

fn status_line(state: &State) -> String {
    let status = state.telemetry.status();
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

impl Daemon {
    fn start(
        config_path: PathBuf,
        config: ServeConfig,
        plans: Vec<PipelinePlan>,
        model_dir: &Path,
        state: Arc<State>,
        telemetry: Arc<Telemetry>,
    ) -> Result<Daemon> {
        let engine = Arc::new(load_engine(&config, model_dir)?);
        let manifest = engine.bundle().manifest();
        tracing::info!(
            "model {} v{} ({}) on {:?}",
            manifest.name,
            manifest.version,
            model_dir.display(),
            engine.device()
        );
        warm_up(&engine)?;
        if let Ok(mut info) = state.info.lock() {
            info["model"] = json!({
                "name": manifest.name,
                "version": manifest.version,
                "dir": model_dir.display().to_string(),
                "manifest_sha256": engine.manifest_sha256(),
                "device": format!("{:?}", engine.device()).to_lowercase(),
            });
        }
        let scheduler = Arc::new(Scheduler::new(
            Arc::clone(&engine),
            Arc::clone(&telemetry),
            config.inference.max_batch,
            config.inference.max_wait(),
        ));
        let worker = {
            let scheduler = Arc::clone(&scheduler);
            std::thread::Builder::new()
                .name("inference".into())
                .spawn(move || scheduler.run())
                .context("cannot start the inference worker")?
        };
        let mut daemon = Daemon {
            config_path,
            config,
            engine,
            scheduler,
            worker: Some(worker),
            pipelines: BTreeMap::new(),
            state,
        };
        for plan in plans {
            let name = plan.config.name.clone();
            if let Err(e) = daemon.start_pipeline(plan) {
                tracing::error!(pipeline = %name, "not started: {e:#}");
            }
        }
        daemon.publish();
        Ok(daemon)
    }

    /// Starts a pipeline; one that cannot start is marked as not running (readiness, `/status`, STATUS) until
    /// a reload starts it.
    fn start_pipeline(&mut self, plan: PipelinePlan) -> Result<()> {
        let name = plan.config.name.clone();
        let telemetry = Arc::clone(&self.state.telemetry);
        let started = PipelineQueries::prepare(&self.engine, &plan).and_then(|queries| {
            Pipeline::start(
                plan,
                queries,
                Arc::clone(&self.engine),
                &telemetry,
                Arc::clone(&self.scheduler.doorbell),
            )
        });
        match started {
            Ok(pipeline) => {
                pipeline.shared.metrics.set_failure(None);
                self.scheduler.add(Arc::clone(&pipeline.shared));
                self.pipelines.insert(name, pipeline);
                Ok(())
            }
            Err(e) => {
                telemetry
                    .pipeline(&name)
                    .set_failure(Some(format!("it failed to start: {e:#}")));
                Err(e)
            }
        }
    }

    fn stop_pipeline(&mut self, name: &str) {
        self.scheduler.remove(name);
        if let Some(p) = self.pipelines.remove(name) {
            p.finish();
        }
    }

    /// Applies the config file's changes; unchanged pipelines are not touched.
    fn reload(&mut self) -> Result<serde_json::Value, serde_json::Value> {
        let telemetry = Arc::clone(&self.state.telemetry);
        let (new_config, plans) = match config::load(&self.config_path) {
            Ok(loaded) => loaded,
            Err(e) => {
                telemetry.reload_failures.fetch_add(1, Ordering::Relaxed);
                for line in &e.errors {
                    tracing::error!("reload rejected: {}: {line}", e.file.display());
                }
                tracing::error!("reload rejected; the running config stays in effect");
                return Err(json!({ "file": e.file.display().to_string(), "errors": e.errors }));
            }
        };
        let d = diff(&self.config, &new_config);
        for section in &d.needs_restart {
            tracing::warn!("reload: [{section}] changed; that takes effect only after a restart");
        }
        let mut applied = serde_json::Map::new();
        let mut failed = Vec::new();
        let plan_of = |name: &str| plans.iter().find(|p| p.config.name == name).cloned();
        for name in &d.removed {
            self.stop_pipeline(name);
        }
        let mut to_start: Vec<String> = d.added.clone();
        for (name, change) in &d.changed {
            let Some(plan) = plan_of(name) else { continue };
            match (change, self.pipelines.get(name)) {
                (PipelineChange::Queries, Some(running)) => {
                    match PipelineQueries::prepare(&self.engine, &plan) {
                        Ok(q) => {
                            running.set_queries(q);
                            tracing::info!(pipeline = %name, "queries updated in place");
                        }
                        Err(e) => failed.push(format!("{name}: {e:#}")),
                    }
                }
                _ => {
                    self.stop_pipeline(name);
                    to_start.push(name.clone());
                }
            }
        }
        // Pipelines that failed to start before get another chance.
        for plan in &plans {
            if !self.pipelines.contains_key(&plan.config.name)
                && !to_start.contains(&plan.config.name)
            {
                to_start.push(plan.config.name.clone());
            }
        }
        for name in &to_start {
            if let Some(plan) = plan_of(name) {
                if let Err(e) = self.start_pipeline(plan) {
                    tracing::error!(pipeline = %name, "not started: {e:#}");
                    failed.push(format!("{name}: {e:#}"));
                }
            }
        }
        // Global sections keep their running values until a restart.
        self.config = ServeConfig {
            model: self.config.model.clone(),
            inference: self.config.inference.clone(),
            http: self.config.http.clone(),
            pipelines: new_config.pipelines,
        };
        let names: Vec<String> = self
            .config
            .pipelines
            .iter()
            .map(|p| p.name.clone())
            .collect();
        telemetry.retain(&names);
        telemetry.reloads.fetch_add(1, Ordering::Relaxed);
        self.publish();
        applied.insert("added".into(), json!(d.added));
        applied.insert("removed".into(), json!(d.removed));
        applied.insert(
            "changed".into(),
            json!(d
                .changed
                .iter()
                .map(|(n, c)| json!({ "pipeline": n, "change": format!("{c:?}").to_lowercase() }))
                .collect::<Vec<_>>()),
        );
        applied.insert("needs_restart".into(), json!(d.needs_restart));
        applied.insert("failed".into(), json!(failed));
        tracing::info!(
            "reload applied: {} added, {} removed, {} changed{}",
            d.added.len(),
            d.removed.len(),
            d.changed.len(),
            if failed.is_empty() {
                String::new()
            } else {
                format!(", {} failed", failed.len())
            }
        );
        Ok(serde_json::Value::Object(applied))
    }

    /// Describes the running pipelines for `/status`.
    fn publish(&self) {
        let pipelines: serde_json::Map<String, serde_json::Value> = self
            .pipelines
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
                        "queries": plan.queries.specs.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
                    }),
                )
            })
            .collect();
        if let Ok(mut info) = self.state.info.lock() {
            info["pipelines"] = serde_json::Value::Object(pipelines);
        }
    }

    /// Stops the sources, lets the worker finish what is queued (bounded), then closes every output. An error
    /// when a thread had died (panicked) on the way: the stop was not clean, and the exit status says so.
    fn shutdown(&mut self) -> Result<()> {
        let mut died: Vec<String> = self
            .pipelines
            .iter()
            .filter(|(_, p)| p.shared.metrics.failure().is_some())
            .map(|(name, _)| format!("pipeline '{name}'"))
            .collect();
        for p in self.pipelines.values_mut() {
            p.stop_source();
        }
        let limit = self.config.inference.drain_timeout();
        let start = Instant::now();
        while !self.scheduler.idle() && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.scheduler.idle() {
            tracing::warn!(
                "drain timeout ({:.0} s): queued frames are dropped",
                limit.as_secs_f64()
            );
        }
        self.scheduler.shutdown();
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                tracing::error!("the inference worker panicked");
                died.push("the inference worker".into());
            }
        }
        let names: Vec<String> = self.pipelines.keys().cloned().collect();
        for name in names {
            self.stop_pipeline(&name);
        }
        if died.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(
                "stopped, but {} had died on the way (see the log)",
                died.join(", ")
            ))
        }
    }
}

fn load_engine(config: &ServeConfig, model_dir: &Path) -> Result<Engine> {
    let model = &config.model;
    // Validated with the rest of the config: these only fail on a config that skipped `config::validate`.
    let options = EngineOptions {
        device: model.device.get("model.device").map_err(|e| anyhow!(e))?,
        precision: model
            .precision
            .get("model.precision")
            .map_err(|e| anyhow!(e))?,
        threads: model.threads,
        crop_batch: model.crop_batch,
        spin: false,
        processing: model
            .processing
            .get("model.processing")
            .map_err(|e| anyhow!(e))?,
    };
    Engine::open(model_dir, options)
}

/// One small image through every graph, so the first camera frame does not pay for session start-up.
fn warm_up(engine: &Engine) -> Result<()> {
    let start = Instant::now();
    let text = engine.embed_queries(&[crate::model::Query::named("object")])?;
    let image = image::RgbImage::from_pixel(64, 64, image::Rgb([127, 127, 127]));
    engine
        .segment_batch(&[&image], &text, &engine.default_settings())
        .context("warm-up inference failed")?;
    tracing::info!("model warm in {:.2} s", start.elapsed().as_secs_f64());
    Ok(())
}
