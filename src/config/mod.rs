//! The daemon's configuration: typed sections (serde), loading through the `config` crate (a TOML file, then
//! `TCLSEG_<SECTION>__<KEY>` environment overrides, then secrets read from files), and a validation pass that
//! reports every problem with its location instead of stopping at the first. `diff` compares two configs for
//! reload.
//!
//! ```toml
//! [model]                      # changes here need a restart
//! path = "models/default"      # default: the built-in model
//! device = "auto"              # auto | cpu | cuda | tensorrt
//! processing = "auto"          # auto | host | device: where resize/windows/argmax run (device: on the GPU)
//!
//! [inference]
//! max_batch = 4                # frames per engine run, across pipelines
//! max_wait_ms = 20             # how long a partial batch waits for more frames
//!
//! [http]
//! listen = "127.0.0.1:9480"    # "" turns the HTTP endpoints off
//! token_file = "/etc/tclseg/http.token"   # bearer token for POST /reload; required off loopback
//!
//! [[pipeline]]
//! name = "front-door"
//! source = "rtsp://cam.local/stream1"     # or source_file = "/run/secrets/front-door.uri"
//! queries = ["person", { name = "car", colour = "#ff8800", threshold = 0.6 }]
//! max_fps = 2
//! [pipeline.output]
//! dir = "/var/lib/tclseg/front-door"
//! ```

pub mod diff;
mod paths;
pub mod redact;
pub mod validate;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::model::{DeviceChoice, Precision, Processing};
use crate::queries::{QuerySet, QuerySpec};
use crate::sink::overlay::OverlayFormat;
use crate::sink::template::PathTemplate;
use crate::source::{FolderMode, SourceKind, SourceSpec};

/// Every problem found in a config file, each with where it is.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: PathBuf,
    /// Already redacted (`redact::redact`): safe for logs and HTTP replies.
    pub errors: Vec<String>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} has {} problem{}:",
            self.file.display(),
            self.errors.len(),
            if self.errors.len() == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub inference: InferenceSection,
    #[serde(default)]
    pub http: HttpSection,
    #[serde(default, rename = "pipeline")]
    pub pipelines: Vec<PipelineConfig>,
}

/// A key with a fixed set of values (a serde enum). An unknown value is kept rather than failing the whole
/// file at deserialisation, so `validate` lists it with every other problem, naming the key and the values
/// allowed.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice<T> {
    Known(T),
    /// The text given.
    Unknown(String),
}

impl<T: DeserializeOwned + clap::ValueEnum + Copy> Choice<T> {
    fn parse(text: &str) -> Choice<T> {
        let de = serde::de::value::StrDeserializer::<serde::de::value::Error>::new(text);
        T::deserialize(de).map_or_else(|_| Choice::Unknown(text.to_string()), Choice::Known)
    }

    /// The value, or the error `validate` reports for `key`: the value given and the ones allowed.
    pub fn get(&self, key: &str) -> Result<T, String> {
        match self {
            Choice::Known(v) => Ok(*v),
            Choice::Unknown(text) => Err(format!(
                "{key}: '{text}' is not one of {}",
                T::value_variants()
                    .iter()
                    .filter_map(|v| v.to_possible_value())
                    .map(|v| v.get_name().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

impl<T: DeserializeOwned + clap::ValueEnum + Copy> From<&str> for Choice<T> {
    fn from(text: &str) -> Choice<T> {
        Choice::parse(text)
    }
}

impl<T: Default> Default for Choice<T> {
    fn default() -> Self {
        Choice::Known(T::default())
    }
}

impl<'de, T: DeserializeOwned + clap::ValueEnum + Copy> Deserialize<'de> for Choice<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(Choice::parse(&text))
    }
}

impl<T: clap::ValueEnum> fmt::Display for Choice<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Choice::Known(v) => match v.to_possible_value() {
                Some(p) => f.write_str(p.get_name()),
                None => f.write_str("?"),
            },
            Choice::Unknown(text) => f.write_str(text),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Bundle folder (None: $TCLSEG_MODEL, models/default, then the built-in model).
    pub path: Option<PathBuf>,
    pub device: Choice<DeviceChoice>,
    pub precision: Choice<Precision>,
    /// ONNX Runtime intra-op threads (0: one per core).
    pub threads: usize,
    /// Crops per ONNX Runtime run (0: per device).
    pub crop_batch: usize,
    /// Where pre- and postprocessing run: `auto` (on the device on a GPU), `host` or `device`.
    pub processing: Choice<Processing>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceSection {
    pub max_batch: usize,
    pub max_wait_ms: u64,
    /// Seconds a graceful stop may take before queued frames are abandoned.
    pub drain_timeout_s: f64,
}

impl Default for InferenceSection {
    fn default() -> Self {
        InferenceSection {
            max_batch: 4,
            max_wait_ms: 20,
            drain_timeout_s: 20.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    pub listen: String,
    /// A file holding the bearer token that `POST /reload` must carry. Required when `listen` is reachable
    /// from other machines; when set, it is required on loopback too.
    pub token_file: Option<PathBuf>,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: "127.0.0.1:9480".into(),
            token_file: None,
        }
    }
}

impl InferenceSection {
    pub fn max_wait(&self) -> Duration {
        validate::duration(self.max_wait_ms as f64, validate::ranges::MAX_WAIT_MS, 1e-3)
    }

    pub fn drain_timeout(&self) -> Duration {
        validate::duration(self.drain_timeout_s, validate::ranges::DRAIN_TIMEOUT_S, 1.0)
    }
}

impl PipelineConfig {
    pub fn watchdog(&self) -> Duration {
        validate::duration(self.watchdog_s, validate::ranges::WATCHDOG_S, 1.0)
    }

    pub fn backoff_initial(&self) -> Duration {
        validate::duration(self.backoff_initial_s, validate::ranges::BACKOFF_S, 1.0)
    }

    pub fn backoff_max(&self) -> Duration {
        validate::duration(self.backoff_max_s, validate::ranges::BACKOFF_S, 1.0)
    }
}

impl OutputConfig {
    pub fn retention_age(&self) -> Option<Duration> {
        self.retention_hours
            .map(|h| validate::duration(h, validate::ranges::RETENTION_HOURS, 3600.0))
    }

    /// The size quota in bytes (the float-to-int cast saturates; the range keeps it far from that).
    pub fn retention_bytes(&self) -> Option<u64> {
        let r = validate::ranges::RETENTION_MB;
        self.retention_mb
            .map(|mb| (mb.clamp(r.min, r.max) * 1024.0 * 1024.0) as u64)
    }
}

/// A query: a bare name, or a table like `segment --queries` files take.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum QueryEntry {
    Name(String),
    Spec(QuerySpec),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueuePolicy {
    /// Keep only the freshest frame; replaced frames are counted as dropped (live sources).
    Latest,
    /// Never drop: the source waits for the worker (files and folders).
    Lossless,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub name: String,
    /// `rtsp://`, `rtsps://`, `http(s)://`, `file:///video.mp4`, `v4l2:///dev/video0`, `folder:///images`.
    pub source: Option<String>,
    /// A file holding the source URI (for URIs with credentials); read at load time.
    pub source_file: Option<PathBuf>,
    pub folder_mode: Option<FolderMode>,
    #[serde(default)]
    pub queries: Vec<QueryEntry>,
    pub pamr: Option<bool>,
    pub bg_thresh: Option<f32>,
    pub kp_weight: Option<f32>,
    /// Frames per second (of stream time) to segment; None: every frame.
    pub max_fps: Option<f64>,
    /// Default: latest for live sources, lossless for files and folders.
    pub queue: Option<QueuePolicy>,
    /// No frame for this long → the source is restarted.
    #[serde(default = "default_watchdog")]
    pub watchdog_s: f64,
    #[serde(default = "default_backoff_initial")]
    pub backoff_initial_s: f64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_s: f64,
    /// RTSP sources: how RTP travels, `auto` (TCP, then UDP if the server refuses TCP), `tcp`, `udp` or
    /// `udp-mcast`. None: auto.
    pub rtsp_transport: Option<String>,
    /// RTSP/HTTP sources: a file holding the password, percent-encoded into the URI at load time (so a password
    /// may hold any character, and stays out of the config file).
    pub password_file: Option<PathBuf>,
    /// Watched folders: seconds a file's size and time must hold still before it is read. None: 2.
    pub folder_settle_s: Option<f64>,
    pub output: OutputConfig,
}

fn default_watchdog() -> f64 {
    10.0
}
fn default_backoff_initial() -> f64 {
    0.5
}
fn default_backoff_max() -> f64 {
    30.0
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// The output root; nothing is written outside it.
    pub dir: PathBuf,
    /// Per-frame path under `dir`, without extension: `{pipeline}`, `{date}`, `{time}`, `{frame}`, `{name}`.
    #[serde(default = "default_path_template")]
    pub path: String,
    #[serde(default = "yes")]
    pub labels: bool,
    /// `jpg` or `png`; None: no overlay image.
    pub overlay: Option<Choice<OverlayFormat>>,
    #[serde(default = "yes")]
    pub json: bool,
    /// Append one JSON line per frame to `<dir>/<pipeline>.jsonl`.
    #[serde(default)]
    pub jsonl: bool,
    /// Overlay video file name under `dir` (`.mkv`: Matroska survives a crash).
    pub video: Option<String>,
    /// Delete frame outputs older than this.
    pub retention_hours: Option<f64>,
    /// Delete the oldest frame outputs beyond this size.
    pub retention_mb: Option<f64>,
}

fn default_path_template() -> String {
    "{date}/{frame}".into()
}
fn yes() -> bool {
    true
}

/// A pipeline after validation: everything parsed and checked.
#[derive(Debug, Clone)]
pub struct PipelinePlan {
    pub config: PipelineConfig,
    pub source: SourceSpec,
    pub queries: QuerySet,
    pub queue: QueuePolicy,
    pub template: PathTemplate,
}

/// Loads, overrides and validates a config file.
pub fn load(path: &Path) -> Result<(ServeConfig, Vec<PipelinePlan>), ConfigErrors> {
    load_with_env(path, std::env::vars())
}

/// `load` with an explicit environment (tests).
pub fn load_with_env(
    path: &Path,
    env: impl Iterator<Item = (String, String)>,
) -> Result<(ServeConfig, Vec<PipelinePlan>), ConfigErrors> {
    let fail = |errors: Vec<String>| ConfigErrors {
        file: path.to_path_buf(),
        errors: errors.iter().map(|e| redact::redact(e, &[])).collect(),
    };
    if !path.is_file() {
        return Err(fail(vec![format!(
            "cannot read it: {}",
            if path.exists() {
                "not a file"
            } else {
                "no such file"
            }
        )]));
    }
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let literal_errors = validate::check_number_literals(&text);
            if !literal_errors.is_empty() {
                return Err(fail(literal_errors));
            }
        }
        Err(e) => return Err(fail(vec![format!("cannot read it: {e}")])),
    }
    // Only `TCLSEG_<SECTION>__<KEY>` variables override: TCLSEG_LOG and TCLSEG_MODEL mean other things.
    let overrides: config::Map<String, String> = env
        .filter(|(k, _)| k.starts_with("TCLSEG_") && k.contains("__"))
        .collect();
    let built = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("TCLSEG")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(overrides)),
        )
        .build()
        .and_then(|c| c.try_deserialize::<ServeConfig>())
        .map_err(|e| fail(vec![e.to_string()]))?;
    let plans = validate(&built).map_err(fail)?;
    Ok((built, plans))
}

/// Checks every field; returns all problems, each prefixed by where it is, redacted.
pub fn validate(cfg: &ServeConfig) -> Result<Vec<PipelinePlan>, Vec<String>> {
    let mut errors = validate::check_ranges(cfg);
    errors.extend(validate::check_paths(cfg));
    errors.extend(validate::check_http(cfg));
    // What `*_file` keys held: scrubbed from every message below.
    let mut file_secrets: Vec<String> = Vec::new();
    errors.extend(cfg.model.device.get("model.device").err());
    errors.extend(cfg.model.processing.get("model.processing").err());
    errors.extend(cfg.model.precision.get("model.precision").err());
    if !cfg.http.listen.is_empty() && cfg.http.listen.parse::<std::net::SocketAddr>().is_err() {
        errors.push(format!(
            "http.listen: '{}' is not an address like 127.0.0.1:9480 (\"\" turns HTTP off)",
            cfg.http.listen
        ));
    }
    let mut names = BTreeSet::new();
    let mut folders: Vec<paths::PipelinePaths> = Vec::new();
    let mut plans = Vec::new();
    for (i, p) in cfg.pipelines.iter().enumerate() {
        let at = format!("pipeline[{i}] '{}'", p.name);
        let before = errors.len();
        if p.name.is_empty()
            || p.name.len() > 64
            || !p
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            errors.push(format!(
                "{at}.name: use 1-64 letters, digits, '-' or '_' (it names files and metrics)"
            ));
        }
        if !names.insert(p.name.clone()) {
            errors.push(format!("{at}.name: another pipeline has this name"));
        }
        let uri = match (&p.source, &p.source_file) {
            (Some(uri), None) => Some(uri.trim().to_string()),
            (None, Some(file)) => match std::fs::read_to_string(file) {
                Ok(text) => {
                    file_secrets.push(text.trim().to_string());
                    Some(text.trim().to_string())
                }
                Err(e) => {
                    errors.push(format!(
                        "{at}.source_file: cannot read {}: {e}",
                        file.display()
                    ));
                    None
                }
            },
            (Some(_), Some(_)) => {
                errors.push(format!("{at}: give source or source_file, not both"));
                None
            }
            (None, None) => {
                errors.push(format!("{at}.source: missing (a URI, or source_file)"));
                None
            }
        };
        let uri = uri.and_then(|uri| with_password_file(&at, p, uri, &mut errors));
        let source = uri.and_then(|uri| {
            SourceSpec::parse(&uri, p.folder_mode)
                .map_err(|e| {
                    let key = if p.source.is_some() {
                        "source"
                    } else {
                        "source_file"
                    };
                    errors.push(format!("{at}.{key}: {e:#}"))
                })
                .ok()
        });
        if p.folder_mode.is_some() && source.as_ref().is_some_and(|s| !s.is_folder()) {
            errors.push(format!(
                "{at}.folder_mode: only folder:// sources have a mode"
            ));
        }
        validate_source_options(&at, p, source.as_ref(), &mut errors);
        let specs: Vec<QuerySpec> = p.queries.iter().map(QueryEntry::to_spec).collect();
        let queries = match QuerySet::new(specs) {
            Ok(q) => Some(q),
            Err(e) => {
                errors.push(format!("{at}.queries: {e:#}"));
                None
            }
        };
        if let (Some(q), Some(_)) = (&queries, p.bg_thresh) {
            if q.has_background_prompts() {
                errors.push(format!(
                    "{at}.bg_thresh: background comes from background queries here; remove one of the two"
                ));
            }
        }
        if p.backoff_max_s < p.backoff_initial_s {
            errors.push(format!("{at}.backoff_max_s: below backoff_initial_s"));
        }
        let out = &p.output;
        if out.dir.as_os_str().is_empty() {
            errors.push(format!("{at}.output.dir: empty"));
        } else {
            let retention = out.retention_hours.is_some() || out.retention_mb.is_some();
            folders.push(paths::PipelinePaths {
                at: at.clone(),
                name: p.name.clone(),
                output: out.dir.clone(),
                watched: match source.as_ref().map(SourceSpec::kind) {
                    Some(SourceKind::Folder { dir, .. }) => Some(dir.clone()),
                    _ => None,
                },
                file_under_retention: match source.as_ref().map(SourceSpec::kind) {
                    Some(SourceKind::VideoFile(file)) if retention => Some(file.clone()),
                    _ => None,
                },
            });
        }
        let template = match PathTemplate::parse(&out.path) {
            Ok(t) => Some(t),
            Err(e) => {
                errors.push(format!("{at}.output.path: {e:#}"));
                None
            }
        };
        if let Some(fmt) = &out.overlay {
            errors.extend(fmt.get(&format!("{at}.output.overlay")).err());
        }
        if let Some(video) = &out.video {
            if !(video.ends_with(".mkv") || video.ends_with(".mp4"))
                || video.contains('/')
                || video.starts_with('.')
            {
                errors.push(format!(
                    "{at}.output.video: '{video}' must be a plain file name ending in .mkv (crash-safe) or .mp4 (fragmented)"
                ));
            }
            if source.as_ref().is_some_and(SourceSpec::is_folder) {
                errors.push(format!(
                    "{at}.output.video: folder sources have no video to write; remove it"
                ));
            }
        }
        if !(out.labels || out.overlay.is_some() || out.json || out.jsonl || out.video.is_some()) {
            errors.push(format!(
                "{at}.output: writes nothing; turn on labels, overlay, json, jsonl or video"
            ));
        }
        if errors.len() == before {
            if let (Some(source), Some(queries), Some(template)) = (source, queries, template) {
                let queue = p.queue.unwrap_or(if source.is_live() {
                    QueuePolicy::Latest
                } else {
                    QueuePolicy::Lossless
                });
                plans.push(PipelinePlan {
                    config: p.clone(),
                    source,
                    queries,
                    queue,
                    template,
                });
            }
        }
    }
    paths::check(&folders, &mut errors);
    if errors.is_empty() {
        Ok(plans)
    } else {
        Err(errors
            .iter()
            .map(|e| redact::redact(e, &file_secrets))
            .collect())
    }
}

/// `password_file`: reads the password and puts it, percent-encoded, into `uri`, which must name a user and no
/// password. Errors name the key and the file, never the password.
fn with_password_file(
    at: &str,
    p: &PipelineConfig,
    uri: String,
    errors: &mut Vec<String>,
) -> Option<String> {
    let Some(file) = &p.password_file else {
        return Some(uri);
    };
    let password = match std::fs::read_to_string(file) {
        Ok(text) => text.trim_end_matches(['\r', '\n']).to_string(),
        Err(e) => {
            errors.push(format!(
                "{at}.password_file: cannot read {}: {e}",
                file.display()
            ));
            return None;
        }
    };
    match crate::source::insert_password(&uri, &password) {
        Ok(uri) => Some(uri),
        Err(e) => {
            errors.push(format!("{at}.password_file: {e:#}"));
            None
        }
    }
}

/// The source keys that only some kinds of source take: `rtsp_transport` (RTSP), `folder_settle_s` (watched
/// folders).
fn validate_source_options(
    at: &str,
    p: &PipelineConfig,
    source: Option<&SourceSpec>,
    errors: &mut Vec<String>,
) {
    use crate::source::{stream::RtspTransport, SourceKind};
    if let Some(text) = &p.rtsp_transport {
        if RtspTransport::parse(text).is_none() {
            errors.push(format!(
                "{at}.rtsp_transport: '{text}' is not one of {}",
                RtspTransport::NAMES.join(", ")
            ));
        } else if source.is_some_and(|s| *s.kind() != SourceKind::Rtsp) {
            errors.push(format!(
                "{at}.rtsp_transport: only rtsp:// sources have a transport; remove it"
            ));
        }
    }
    // Its range is checked with every other numeric key's (validate::check_ranges).
    if p.folder_settle_s.is_some() && source.is_some_and(|s| !s.is_folder()) {
        errors.push(format!(
            "{at}.folder_settle_s: only folder:// sources settle; remove it"
        ));
    }
    if p.password_file.is_some()
        && source.is_some_and(|s| !matches!(s.kind(), SourceKind::Rtsp | SourceKind::Http))
    {
        errors.push(format!(
            "{at}.password_file: only rtsp:// and http(s):// sources take a password; remove it"
        ));
    }
}

impl PipelinePlan {
    /// The RTSP transport this pipeline asked for (auto when unset).
    pub fn rtsp_transport(&self) -> crate::source::stream::RtspTransport {
        self.config
            .rtsp_transport
            .as_deref()
            .and_then(crate::source::stream::RtspTransport::parse)
            .unwrap_or_default()
    }

    /// How long a watched folder's files must hold still.
    pub fn folder_settle(&self) -> std::time::Duration {
        self.config
            .folder_settle_s
            .map(|s| validate::duration(s, validate::ranges::FOLDER_SETTLE_S, 1.0))
            .unwrap_or(crate::source::folder::DEFAULT_SETTLE)
    }
}

impl QueryEntry {
    fn to_spec(&self) -> QuerySpec {
        match self {
            QueryEntry::Name(name) => QuerySpec {
                name: name.clone(),
                prompts: Vec::new(),
                colour: None,
                threshold: None,
                background: false,
            },
            QueryEntry::Spec(spec) => spec.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("serve.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    const GOOD: &str = r#"
[inference]
max_batch = 2
[[pipeline]]
name = "cam"
source = "rtsp://user:secret@127.0.0.1:8554/live"
queries = ["person", { name = "car", threshold = 0.6 }]
max_fps = 2
[pipeline.output]
dir = "/tmp/out-cam"
[[pipeline]]
name = "inbox"
source = "folder:///tmp/inbox"
folder_mode = "once"
queries = ["cat"]
[pipeline.output]
dir = "/tmp/out-inbox"
jsonl = true
"#;

    #[test]
    fn a_good_config_loads_with_defaults_and_env_overrides() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = write(dir.path(), GOOD);
        let env = vec![
            (
                "TCLSEG_INFERENCE__MAX_WAIT_MS".to_string(),
                "75".to_string(),
            ),
            ("TCLSEG_MODEL".to_string(), "/ignored".to_string()),
        ];
        let (cfg, plans) = load_with_env(&path, env.into_iter()).expect("valid");
        assert_eq!(cfg.inference.max_batch, 2);
        assert_eq!(cfg.inference.max_wait_ms, 75);
        assert_eq!(cfg.model.path, None);
        assert_eq!(plans.len(), 2);
        assert_eq!(plans[0].queue, QueuePolicy::Latest);
        assert_eq!(plans[1].queue, QueuePolicy::Lossless);
        assert_eq!(plans[0].queries.specs[1].threshold, Some(0.6));
        assert!(!plans[0].source.redacted().contains("secret"));
    }

    #[test]
    fn every_error_is_reported_with_its_location() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = write(
            dir.path(),
            r#"
[model]
device = "tpu"
processing = "gpu"
[[pipeline]]
name = "a b"
source = "gopher://x"
queries = []
max_fps = -1
[pipeline.output]
dir = "/tmp/x"
path = "../{frame}"
[[pipeline]]
name = "ok"
queries = ["x"]
[pipeline.output]
dir = "/tmp/x"
overlay = "gif"
"#,
        );
        let err = load_with_env(&path, std::iter::empty()).expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "model.device",
            "model.processing",
            "pipeline[0] 'a b'.name",
            "pipeline[0] 'a b'.source",
            "pipeline[0] 'a b'.queries",
            "pipeline[0] 'a b'.max_fps",
            "pipeline[0] 'a b'.output.path",
            "pipeline[1] 'ok'.source: missing",
            "pipeline[1] 'ok'.output.dir",
            "pipeline[1] 'ok'.output.overlay",
        ] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }
        assert!(text.contains("serve.toml has 10 problems"), "{text}");
    }

    #[test]
    fn syntax_and_unknown_keys_name_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = write(
            dir.path(),
            "[[pipeline]]\nname = \"x\"\nsorce = \"rtsp://a\"\n",
        );
        let text = load_with_env(&path, std::iter::empty())
            .expect_err("unknown key")
            .to_string();
        assert!(
            text.contains("serve.toml") && text.contains("sorce"),
            "{text}"
        );
        let missing = load_with_env(&dir.path().join("nope.toml"), std::iter::empty())
            .expect_err("missing")
            .to_string();
        assert!(missing.contains("nope.toml") && missing.contains("no such file"));
    }

    fn one_pipeline(dir: &Path, source: &str, extra: &str) -> String {
        let path = write(
            dir,
            &format!(
                "[[pipeline]]\nname = \"cam\"\nsource = \"{source}\"\nqueries = [\"x\"]\n{extra}\n[pipeline.output]\ndir = \"/tmp/o\"\n"
            ),
        );
        match load_with_env(&path, std::iter::empty()) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn rtsp_transport_and_folder_settle_are_checked_with_key_and_allowed_values() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        for ok in ["auto", "tcp", "udp", "udp-mcast"] {
            let text = one_pipeline(d, "rtsp://cam/s", &format!("rtsp_transport = \"{ok}\""));
            assert!(text.is_empty(), "{ok}: {text}");
        }
        let text = one_pipeline(d, "rtsp://cam/s", "rtsp_transport = \"quic\"");
        assert!(
            text.contains(
                "pipeline[0] 'cam'.rtsp_transport: 'quic' is not one of auto, tcp, udp, udp-mcast"
            ),
            "{text}"
        );
        let text = one_pipeline(d, "folder:///in", "rtsp_transport = \"tcp\"");
        assert!(
            text.contains("'cam'.rtsp_transport: only rtsp://"),
            "{text}"
        );
        assert!(one_pipeline(d, "folder:///in", "folder_settle_s = 0.5").is_empty());
        let text = one_pipeline(d, "folder:///in", "folder_settle_s = -1");
        assert!(
            text.contains("'cam'.folder_settle_s: -1 is outside [0, 3600]"),
            "{text}"
        );
        let text = one_pipeline(d, "folder:///in", "folder_settle_s = nan");
        assert!(text.contains("'cam'.folder_settle_s"), "{text}");
        let text = one_pipeline(d, "rtsp://cam/s", "folder_settle_s = 3");
        assert!(
            text.contains("'cam'.folder_settle_s: only folder://"),
            "{text}"
        );
    }

    #[test]
    fn an_unencoded_password_is_refused_at_check_time_without_printing_it() {
        let dir = tempfile::tempdir().expect("tmp");
        for (password, says) in [("hun@ter2", "raw '@'"), ("hun:ter2", "raw ':'")] {
            let text = one_pipeline(
                dir.path(),
                &format!("rtsp://admin:{password}@10.0.0.5/s1"),
                "",
            );
            assert!(
                text.contains("pipeline[0] 'cam'.source") && text.contains(says),
                "{text}"
            );
            assert!(text.contains("percent-encode"), "{text}");
            assert!(!text.contains("ter2"), "the password leaked: {text}");
        }
        let uri_file = dir.path().join("cam.uri");
        std::fs::write(&uri_file, "rtsp://admin:hun@ter2@10.0.0.5/s1\n").expect("write");
        let path = write(
            dir.path(),
            &format!(
                "[[pipeline]]\nname = \"cam\"\nsource_file = \"{}\"\nqueries = [\"x\"]\n[pipeline.output]\ndir = \"/tmp/o\"\n",
                uri_file.display()
            ),
        );
        let text = load_with_env(&path, std::iter::empty())
            .expect_err("unencoded")
            .to_string();
        assert!(
            text.contains("'cam'.source_file: ") && text.contains("raw '@'"),
            "{text}"
        );
        assert!(!text.contains("ter2"), "the password leaked: {text}");
    }

    #[test]
    fn password_file_is_percent_encoded_into_the_uri() {
        let dir = tempfile::tempdir().expect("tmp");
        let secret = dir.path().join("cam.pw");
        std::fs::write(&secret, "p@ss:w/rd\n").expect("write");
        let path = write(
            dir.path(),
            &format!(
                "[[pipeline]]\nname = \"cam\"\nsource = \"rtsp://admin@10.0.0.5/s1\"\npassword_file = \"{}\"\nqueries = [\"x\"]\n[pipeline.output]\ndir = \"/tmp/o\"\n",
                secret.display()
            ),
        );
        let (_, plans) = load_with_env(&path, std::iter::empty()).expect("valid");
        assert_eq!(
            plans[0].source.uri(),
            "rtsp://admin:p%40ss%3Aw%2Frd@10.0.0.5/s1"
        );
        assert!(!format!("{:?}", plans[0].source).contains("p%40ss"));
        let text = one_pipeline(
            dir.path(),
            "rtsp://admin:old@10.0.0.5/s1",
            &format!("password_file = \"{}\"", secret.display()),
        );
        assert!(
            text.contains("'cam'.password_file") && text.contains("already holds a password"),
            "{text}"
        );
        assert!(!text.contains("p@ss") && !text.contains("old@"), "{text}");
    }

    #[test]
    fn secrets_come_from_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let secret = dir.path().join("cam.uri");
        std::fs::write(&secret, "rtsp://admin:hunter2@10.0.0.5/s1\n").expect("write");
        let path = write(
            dir.path(),
            &format!(
                "[[pipeline]]\nname = \"cam\"\nsource_file = \"{}\"\nqueries = [\"x\"]\n[pipeline.output]\ndir = \"/tmp/o\"\n",
                secret.display()
            ),
        );
        let (_, plans) = load_with_env(&path, std::iter::empty()).expect("valid");
        assert_eq!(plans[0].source.uri(), "rtsp://admin:hunter2@10.0.0.5/s1");
        assert!(!plans[0].source.redacted().contains("hunter2"));
    }

    #[test]
    fn choices_parse_their_names_and_name_the_allowed_values() {
        let device: Choice<DeviceChoice> = "tensorrt".into();
        assert_eq!(device, Choice::Known(DeviceChoice::TensorRt));
        assert_eq!(device.to_string(), "tensorrt");
        let overlay: Choice<OverlayFormat> = "jpg".into();
        assert_eq!(overlay.get("output.overlay"), Ok(OverlayFormat::Jpeg));
        let bad: Choice<Precision> = "fp8".into();
        assert_eq!(
            bad.get("model.precision"),
            Err("model.precision: 'fp8' is not one of fp32, fp16".to_string())
        );
        assert_eq!(bad.to_string(), "fp8");
    }
}
