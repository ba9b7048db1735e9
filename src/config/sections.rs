//! The config file's typed shape: one struct per section and per `[[pipeline]]`, as serde reads them, with their
//! defaults and the `Duration`s their seconds become. Only the shape and defaults live here; what makes a value
//! acceptable is `validate` (ranges, paths, HTTP) and `plan` (each pipeline, checked as a whole).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::validate;
use super::Choice;
use crate::events::EventsConfig;
use crate::model::{DeviceChoice, Precision, Processing};
use crate::queries::QuerySpec;
use crate::sink::overlay::OverlayFormat;
use crate::source::FolderMode;

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
    /// Presence events to MQTT and webhooks; absent: none.
    #[serde(default)]
    pub events: Option<EventsConfig>,
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
    /// `POST /v1/segment`: the largest request body, in MiB (larger: 413 before the image is read).
    pub segment_max_mb: u64,
    /// `POST /v1/segment`: the largest image, in pixels (the header is checked before any pixel is decoded).
    pub segment_max_pixels: u64,
    /// `POST /v1/segment`: images waiting for the inference worker; more are refused (429) rather than queued.
    pub segment_queue: usize,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: "127.0.0.1:9480".into(),
            token_file: None,
            segment_max_mb: 32,
            segment_max_pixels: 40_000_000,
            segment_queue: 4,
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
    /// The bundle head that scores this pipeline's queries (`tcl`, `naclip`, ...; None: the bundle's default).
    /// A change is applied in place, like the queries and thresholds.
    pub head: Option<String>,
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

impl QueryEntry {
    pub(super) fn to_spec(&self) -> QuerySpec {
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
