//! From a parsed config to the pipelines the daemon runs: every pipeline is checked as a whole (its source, the
//! secrets its `*_file` keys name, its queries and its outputs), every problem is collected with where it is, and
//! a pipeline with none becomes a `PipelinePlan`. Kept apart from `load` (reading the file and the environment)
//! and from `validate` (the per-key checks: ranges, paths, HTTP), which this calls.

use std::collections::BTreeSet;

use super::sections::{PipelineConfig, QueryEntry, QueuePolicy, ServeConfig};
use super::{paths, redact};
use crate::queries::{QuerySet, QuerySpec};
use crate::sink::template::PathTemplate;
use crate::source::{SourceKind, SourceSpec};

/// A pipeline after validation: everything parsed and checked.
#[derive(Debug, Clone)]
pub struct PipelinePlan {
    pub config: PipelineConfig,
    pub source: SourceSpec,
    pub queries: QuerySet,
    pub queue: QueuePolicy,
    pub template: PathTemplate,
}

/// Checks every field; returns all problems, each prefixed by where it is, redacted.
pub fn validate(cfg: &ServeConfig) -> Result<Vec<PipelinePlan>, Vec<String>> {
    let mut errors = super::validate::check_ranges(cfg);
    errors.extend(super::validate::check_paths(cfg));
    errors.extend(super::validate::check_http(cfg));
    errors.extend(super::events::check_events(cfg));
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
    use crate::source::{rtsp::RtspTransport, SourceKind};
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
    pub fn rtsp_transport(&self) -> crate::source::rtsp::RtspTransport {
        self.config
            .rtsp_transport
            .as_deref()
            .and_then(crate::source::rtsp::RtspTransport::parse)
            .unwrap_or_default()
    }

    /// How long a watched folder's files must hold still.
    pub fn folder_settle(&self) -> std::time::Duration {
        self.config
            .folder_settle_s
            .map(|s| super::validate::duration(s, super::validate::ranges::FOLDER_SETTLE_S, 1.0))
            .unwrap_or(crate::source::folder::DEFAULT_SETTLE)
    }
}
