//! The running set: the engine, the inference worker and the pipelines it serves. Start-up builds it, a reload
//! applies the config diff to it (unchanged pipelines are not touched), and shutdown drains it. Its methods block
//! (thread joins, text encoding, the model load): the control loop in `daemon/mod.rs` calls them off tokio's
//! workers, which is why they live apart from it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use crate::config::diff::{diff, ConfigDiff, PipelineChange};
use crate::config::{self, ConfigErrors, PipelinePlan, ServeConfig};
use crate::events::Catalog;
use crate::model::{Engine, EngineOptions};
use crate::pipeline::output::EventsHub;
use crate::pipeline::worker::Scheduler;
use crate::pipeline::{Pipeline, PipelineQueries};
use crate::queries::QuerySet;
use crate::telemetry::unix_ms;
use tokio::sync::watch;

use super::State;

/// What a reload did. The control loop logs it and hands it to whoever asked; only the HTTP layer
/// (`daemon/http.rs`) turns it into a reply, so the reply's shape is written in one place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// The diff that was applied: pipelines added, removed and changed (and how), and the global sections that
    /// changed but take effect only after the daemon restarts.
    pub diff: ConfigDiff,
    /// `name: why` for each pipeline that did not start or whose new queries could not be prepared.
    pub failed: Vec<String>,
    /// `[model]` changed and the new engine was loaded, warmed and handed to the worker: its manifest sha256.
    pub model_swapped: Option<String>,
    /// `[model]` changed but the new engine could not be loaded (or a pipeline's queries not embedded by it):
    /// why. The old model keeps serving.
    pub model_error: Option<String>,
}

/// Why a reload changed nothing.
#[derive(Debug)]
pub enum ReloadError {
    /// The new config is invalid (every error, already redacted); the running one stays in effect.
    Invalid(ConfigErrors),
    /// The reload could not run: the running set's lock was poisoned, or the reload panicked.
    Failed(String),
}

/// Everything the control side owns once the model is loaded. The control loop keeps it behind one lock, so a
/// reload and the drain never overlap.
pub(super) struct Running {
    config_path: PathBuf,
    /// The running config: pipelines as last applied, global sections as at start-up (they need a restart).
    config: ServeConfig,
    engine: Arc<Engine>,
    scheduler: Arc<Scheduler>,
    worker: Option<std::thread::JoinHandle<()>>,
    pipelines: BTreeMap<String, Pipeline>,
    state: Arc<State>,
    /// The events hub (None without `[events]`), and the pipelines and queries MQTT discovery announces.
    events: EventsHub,
    catalog: watch::Sender<Catalog>,
}

impl Running {
    /// Loads and warms the model, starts the inference worker, then every pipeline that can start (one that
    /// cannot is logged and marked; the rest run).
    pub(super) fn start(
        config_path: PathBuf,
        config: ServeConfig,
        plans: Vec<PipelinePlan>,
        model_dir: &Path,
        state: Arc<State>,
        (events, catalog): (EventsHub, watch::Sender<Catalog>),
    ) -> Result<Running> {
        let engine = Arc::new(open_warm(&config, model_dir)?);
        state.set_model(&engine, model_dir);
        let scheduler = Arc::new(Scheduler::new(
            Arc::clone(&engine),
            Arc::clone(&state.telemetry),
            config.inference.max_batch,
            config.inference.max_wait(),
            config.http.segment_queue,
        ));
        state.set_worker(&scheduler);
        let worker = {
            let scheduler = Arc::clone(&scheduler);
            std::thread::Builder::new()
                .name("inference".into())
                .spawn(move || scheduler.run())
                .context("cannot start the inference worker")?
        };
        let mut running = Running {
            config_path,
            config,
            engine,
            scheduler,
            worker: Some(worker),
            pipelines: BTreeMap::new(),
            state,
            events,
            catalog,
        };
        for plan in plans {
            let name = plan.config.name.clone();
            if let Err(e) = running.start_pipeline(plan) {
                tracing::error!(pipeline = %name, "not started: {e:#}");
            }
        }
        running.publish();
        Ok(running)
    }

    /// The inference worker's scheduler, for the watchdog: its heartbeat is read without the lock that a
    /// reload holds for seconds.
    pub(super) fn scheduler(&self) -> Arc<Scheduler> {
        Arc::clone(&self.scheduler)
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
                &telemetry,
                Arc::clone(&self.scheduler.doorbell),
                self.events.clone(),
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

    /// Tells `/status` and the events catalog (MQTT discovery) what runs now.
    fn publish(&self) {
        self.state.publish(&self.pipelines);
        self.state
            .live
            .publish(&self.pipelines, &self.config, &self.config_path);
        let catalog: Catalog = self
            .pipelines
            .iter()
            .map(|(name, p)| (name.clone(), query_names(&p.shared.queries().queries)))
            .collect();
        self.catalog.send_replace(catalog);
    }

    /// A removed pipeline's presences end now (its output thread has stopped).
    fn close_events(&self, name: &str) {
        if let Some(events) = &self.events {
            if let Err(e) = events.close_pipeline(name, unix_ms(), self.engine.manifest_sha256()) {
                tracing::warn!(pipeline = %name, "cannot record the end of its events: {e}");
            }
        }
    }

    /// Reads the config file again and applies what changed; unchanged pipelines are not touched. An invalid
    /// file changes nothing: its errors are logged and returned, and the running config stays in effect.
    pub(super) fn reload(&mut self) -> Result<ReloadOutcome, ReloadError> {
        match config::load(&self.config_path) {
            Ok((mut new_config, mut plans)) => {
                let shard = self.state.shard();
                if let Some(share) = super::shard::keep_share(shard, &mut new_config, &mut plans) {
                    self.state.set_share(&share);
                }
                Ok(self.apply(new_config, plans))
            }
            Err(e) => {
                self.state
                    .telemetry
                    .reload_failures
                    .fetch_add(1, Ordering::Relaxed);
                for line in &e.errors {
                    tracing::error!("reload rejected: {}: {line}", e.file.display());
                }
                tracing::error!("reload rejected; the running config stays in effect");
                Err(ReloadError::Invalid(e))
            }
        }
    }

    /// Applies the diff from the running config to a valid new one: removed pipelines stop, added ones start,
    /// changed ones get new queries in place or restart, and any that failed to start before are tried again.
    fn apply(&mut self, new_config: ServeConfig, plans: Vec<PipelinePlan>) -> ReloadOutcome {
        let d = diff(&self.config, &new_config);
        for section in &d.needs_restart {
            tracing::warn!("reload: [{section}] changed; that takes effect only after a restart");
        }
        let mut failed = Vec::new();
        let plan_of = |name: &str| plans.iter().find(|p| p.config.name == name).cloned();
        for name in &d.removed {
            self.stop_pipeline(name);
            self.close_events(name);
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
        let (model_swapped, model_error) = if self.config.model != new_config.model {
            let swapped = self.swap_model(&new_config, &plans);
            self.state.telemetry.models.swapped(swapped.is_ok());
            match swapped {
                Ok(sha) => (Some(sha), None),
                Err(e) => {
                    tracing::error!(
                        "reload: the model was not swapped, the old one keeps serving: {e:#}"
                    );
                    (None, Some(format!("{e:#}")))
                }
            }
        } else {
            (None, None)
        };
        // Global sections other than [model] keep their running values until a restart.
        let model = if model_swapped.is_some() {
            new_config.model.clone()
        } else {
            self.config.model.clone()
        };
        self.config = ServeConfig {
            model,
            inference: self.config.inference.clone(),
            http: self.config.http.clone(),
            events: self.config.events.clone(),
            pipelines: new_config.pipelines,
        };
        let names: Vec<String> = self
            .config
            .pipelines
            .iter()
            .map(|p| p.name.clone())
            .collect();
        let telemetry = &self.state.telemetry;
        telemetry.retain(&names);
        telemetry.reloads.fetch_add(1, Ordering::Relaxed);
        self.publish();
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
        ReloadOutcome {
            diff: d,
            failed,
            model_swapped,
            model_error,
        }
    }

    /// Loads and warms the engine of the new `[model]` beside the running one, on a thread of its own (the
    /// inference worker keeps serving the old one meanwhile), embeds every running pipeline's queries with it,
    /// then hands both to the worker, which swaps them in between batches. Any error leaves the old model
    /// serving. Returns the new model's manifest sha256.
    fn swap_model(&mut self, new_config: &ServeConfig, plans: &[PipelinePlan]) -> Result<String> {
        let dir = crate::model::resolve_bundle_dir(new_config.model.path.clone())?;
        let engine = {
            let (config, dir) = (new_config.clone(), dir.clone());
            std::thread::Builder::new()
                .name("model-load".into())
                .spawn(move || open_warm(&config, &dir))
                .context("cannot start the model-load thread")?
                .join()
                .map_err(|_| anyhow!("the model load panicked"))??
        };
        let engine = Arc::new(engine);
        let mut queries = Vec::new();
        for name in self.pipelines.keys() {
            let Some(plan) = plans.iter().find(|p| &p.config.name == name) else {
                continue;
            };
            queries.push((
                name.clone(),
                Arc::new(PipelineQueries::prepare(&engine, plan)?),
            ));
        }
        let sha = engine.manifest_sha256().to_string();
        self.scheduler.swap_engine(Arc::clone(&engine), queries);
        self.state.set_model(&engine, &dir);
        self.engine = engine;
        Ok(sha)
    }

    /// Stops the sources, lets the worker finish what is queued (bounded), then closes every output. An error
    /// when a thread had died (panicked) on the way: the stop was not clean, and the exit status says so.
    pub(super) fn shutdown(&mut self) -> Result<()> {
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

/// The queries a pipeline reports, by the names its frames' statistics carry (background prompts are none).
fn query_names(queries: &QuerySet) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for spec in queries.specs.iter().filter(|s| !s.background) {
        let name = spec.name.trim().to_string();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// Opens the configured model and warms it: at start-up, and for a reload's model swap (on its own thread).
fn open_warm(config: &ServeConfig, model_dir: &Path) -> Result<Engine> {
    let engine = load_engine(config, model_dir)?;
    let manifest = engine.bundle().manifest();
    tracing::info!(
        "model {} v{} ({}) on {:?}",
        manifest.name,
        manifest.version,
        model_dir.display(),
        engine.device()
    );
    warm_up(&engine)?;
    Ok(engine)
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
