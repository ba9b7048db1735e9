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
//!
//! Laid out after Vector's topology: this file is the control loop only (runtime, signals, triggers, systemd);
//! the running set it starts, reloads and drains is `running.rs`, what it reports is `status.rs`, and the HTTP
//! routes (the one place a reload's outcome becomes JSON) are `http.rs`. Each can then change without the others.

pub mod http;
mod live;
pub mod notify;
mod page;
mod query_edit;
mod running;
mod segment;
mod session;
mod shard;
mod status;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{self, PipelinePlan, ServeConfig};
use crate::events::{Catalog, Events};
use crate::shard::Shard;
use crate::telemetry::Telemetry;

use running::Running;
pub use running::{ReloadError, ReloadOutcome};
pub use status::State;

/// The worker may take this long over one batch before the systemd watchdog is starved on purpose.
const WORKER_STALL_LIMIT_S: f64 = 120.0;

/// How long the event deliveries get to finish (MQTT's `offline`, a webhook POST in flight) at shutdown.
const EVENTS_STOP_LIMIT: Duration = Duration::from_secs(10);

/// Runs the daemon until SIGTERM/SIGINT. The model is `model.path`, else the default bundle
/// (`model::resolve_bundle_dir`, as for `segment`). With a `shard`, only the config's pipelines of that shard
/// run (`daemon/shard.rs`).
pub fn run(config_path: &Path, shard: Option<Shard>) -> Result<()> {
    let (mut config, mut plans) = config::load(config_path).map_err(|e| anyhow!("{e}"))?;
    for warning in config::validate::warnings(&config) {
        tracing::warn!("{warning}");
    }
    let share = shard::keep_share(shard, &mut config, &mut plans);
    crate::gst::init()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("tclseg-ctl")
        .build()
        .context("cannot start the tokio runtime")?;
    let model_dir = crate::model::resolve_bundle_dir(config.model.path.clone())?;
    let result = runtime.block_on(serve(
        config_path.to_path_buf(),
        config,
        (plans, share),
        model_dir,
    ));
    // Only a start-up abandoned by SIGTERM leaves a blocking task behind; do not wait for it.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn serve(
    config_path: PathBuf,
    config: ServeConfig,
    (plans, share): (Vec<PipelinePlan>, Option<shard::Share>),
    model_dir: PathBuf,
) -> Result<()> {
    // Read again here (validation read it too): the file may have changed since, and start-up must not go on
    // with mutating endpoints open when the token cannot be read.
    let token = match &config.http.token_file {
        Some(file) => Some(config::validate::read_token(file).map_err(|e| anyhow!("{e}"))?),
        None => None,
    };
    let state = Arc::new(
        State::new(
            Arc::new(Telemetry::default()),
            &config_path,
            token,
            segment::SegmentLimits::from_config(&config.http),
        )
        .with_access(session::Access::new(
            config.http.page,
            // Validation refuses an unparsable address; one that got here anyway gets the stricter guard.
            config
                .http
                .listen
                .parse()
                .map_or(true, |addr| config::validate::is_loopback(&addr)),
        )),
    );
    if let Some(share) = &share {
        state.set_share(share);
    }
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
    // Events start before the model: what an earlier run left in the outbox goes out meanwhile.
    let events = open_events(&config, &config_path, &state)?;
    let (catalog_tx, catalog_rx) = watch::channel(Catalog::new());
    let (events_stop, events_stopped) = watch::channel(false);
    let event_tasks = match &events {
        Some(e) => e.spawn(catalog_rx, events_stopped),
        None => Vec::new(),
    };
    notify::notify("STATUS=loading the model");
    let starting = {
        let state = Arc::clone(&state);
        let config = config.clone();
        let events = events.clone();
        tokio::task::spawn_blocking(move || {
            Running::start(
                config_path,
                config,
                plans,
                &model_dir,
                state,
                (events, catalog_tx),
            )
        })
    };
    // A start-up can take minutes (a TensorRT engine build, a model on a slow disk): a stop request during it
    // is obeyed at once rather than after it. Nothing has been handed over yet, and whatever a half-started
    // pipeline wrote is as safe as after a crash (atomic files, Matroska video).
    let running = tokio::select! {
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
    let scheduler = running.scheduler();
    let running = Arc::new(Mutex::new(running));
    state.ready.store(true, Ordering::Relaxed);
    let summary = state.line();
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
                let _ = blocking_reload(&running).await;
            }
            Some(reply) = reload_rx.recv() => {
                tracing::info!("reload requested over HTTP");
                let _ = reply.send(blocking_reload(&running).await);
            }
            _ = tick.tick() => {
                if let Some(interval) = watchdog {
                    if Instant::now() >= next_ping && scheduler.heartbeat_age() < WORKER_STALL_LIMIT_S {
                        notify::notify(&format!("WATCHDOG=1\nSTATUS={}", state.line()));
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
        let mut guard = running
            .lock()
            .map_err(|_| anyhow!("daemon state poisoned"))?;
        guard.shutdown()
    })
    .await;
    // Every output thread has ended, so every frame's events are in the outbox: the deliveries may go (MQTT
    // says `offline` on its way out). What they could not deliver stays in the outbox for the next start.
    let _ = events_stop.send(true);
    for task in event_tasks {
        if tokio::time::timeout(EVENTS_STOP_LIMIT, task).await.is_err() {
            tracing::warn!("an event delivery did not stop in time; its events stay in the outbox");
        }
    }
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

/// Opens the events outbox when `[events]` is configured (at `events.outbox.path`, else in
/// `config::events_state_dir`) and registers its figures for `/metrics` and `/status`.
fn open_events(
    config: &ServeConfig,
    config_path: &Path,
    state: &State,
) -> Result<Option<Arc<Events>>> {
    let Some(cfg) = &config.events else {
        return Ok(None);
    };
    let dir = config::events_state_dir(config_path);
    let cfg = shard::events_config(state.shard(), cfg);
    let events = Arc::new(Events::open(cfg, &dir).context("cannot open the events outbox")?);
    state.telemetry.deliveries.register(events.clone());
    Ok(Some(events))
}

fn stopped_during_start_up(why: &str) {
    tracing::info!("{why} during start-up: stopping without finishing it");
    notify::notify("STOPPING=1\nSTATUS=stopped during start-up");
}

async fn blocking_reload(running: &Arc<Mutex<Running>>) -> Result<ReloadOutcome, ReloadError> {
    let running = Arc::clone(running);
    tokio::task::spawn_blocking(move || match running.lock() {
        Ok(mut d) => d.reload(),
        Err(_) => Err(ReloadError::Failed("daemon state poisoned".into())),
    })
    .await
    .unwrap_or_else(|e| Err(ReloadError::Failed(format!("reload panicked: {e}"))))
}
