//! The live page's data routes (issue 18): `GET /v1/pipelines` (the effective config of every pipeline, sources
//! redacted), each pipeline's overlay as an MJPEG stream (`live.mjpeg`) or one JPEG (`live.jpg`), and its
//! per-query area history (`history`). The frames and samples come from the pipeline's `pipeline::live::LiveTap`,
//! fed by its output thread.
//!
//! MJPEG (`multipart/x-mixed-replace`) rather than WebSocket or SSE: an `<img>` element shows it with no script,
//! it needs no upgrade on a server that runs one request per connection, and each part is a plain JPEG. A stream
//! sends one part per frame the pipeline segments; it ends when its pipeline stops (removed or restarted by a
//! reload, or the daemon's shutdown), and a viewer that reads slowly gets the latest frame when it is ready for
//! one, never a backlog.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path as FilePath, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State as Extract};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::http::{guard, json_reply, Ctx, Need};
use super::session::page_off;
use crate::config::{PipelineConfig, QueryEntry, ServeConfig};
use crate::pipeline::live::{LiveFrame, LiveFrames, HISTORY_SECONDS};
use crate::pipeline::{Pipeline, PipelineState};
use crate::queries::QuerySet;
use crate::telemetry::unix_ms;

/// The multipart boundary of `live.mjpeg`.
const BOUNDARY: &str = "tclsegframe";
/// `live.jpg` waits this long for a new frame when the one it has is not fresh.
const NEXT_FRAME_WAIT: Duration = Duration::from_secs(10);
/// A frame older than this may not be the latest for `live.jpg` (nobody was watching): it waits for a new one.
const FRESH_MS: u64 = 2000;

/// What the page routes read of the running set, replaced whole at start-up and after each reload.
#[derive(Default)]
pub struct Board(RwLock<Published>);

#[derive(Default, Clone)]
struct Published {
    /// Every configured pipeline, in config order.
    pipelines: Vec<PipelineView>,
    /// The running config's pipelines, as loaded: the query editor compares the file on disk with them.
    configs: Vec<PipelineConfig>,
    /// A query is present at this area fraction or more (`events.min_area`, else the events default).
    min_area: f64,
    /// The config file the running config came from (where the query editor writes).
    config_path: Option<PathBuf>,
}

#[derive(Clone)]
struct PipelineView {
    name: String,
    /// The `GET /v1/pipelines` entry (source redacted).
    entry: serde_json::Value,
    /// None when it is not running (it failed to start).
    shared: Option<Arc<PipelineState>>,
}

impl Board {
    /// Records what runs now; called with `State::publish`.
    pub(super) fn publish(
        &self,
        running: &BTreeMap<String, Pipeline>,
        config: &ServeConfig,
        config_path: &FilePath,
    ) {
        let pipelines = config
            .pipelines
            .iter()
            .map(|p| {
                let shared = running.get(&p.name).map(|r| Arc::clone(&r.shared));
                let (source, queries) = match &shared {
                    Some(s) => (s.plan.source.redacted(), s.queries().queries.clone()),
                    None => (
                        p.source
                            .as_deref()
                            .map_or_else(|| "(source_file)".into(), crate::source::redact_uri),
                        QuerySet::new(p.queries.iter().map(QueryEntry::to_spec).collect())
                            .unwrap_or_else(|_| QuerySet {
                                specs: Vec::new(),
                                labels: Vec::new(),
                                palette: Vec::new(),
                            }),
                    ),
                };
                PipelineView {
                    name: p.name.clone(),
                    entry: json!({
                        "name": p.name,
                        "source": source,
                        "queries": queries_json(&queries),
                        "bg_thresh": p.bg_thresh,
                    }),
                    shared,
                }
            })
            .collect();
        let min_area = config.events.as_ref().map_or_else(
            || crate::events::StateConfig::default().min_area,
            |e| e.min_area,
        );
        let mut board = self.0.write().unwrap_or_else(|e| e.into_inner());
        *board = Published {
            pipelines,
            configs: config.pipelines.clone(),
            min_area,
            config_path: Some(config_path.to_path_buf()),
        };
    }

    fn snapshot(&self) -> Published {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn running(&self, name: &str) -> Option<Arc<PipelineState>> {
        let board = self.0.read().unwrap_or_else(|e| e.into_inner());
        board
            .pipelines
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.shared.clone())
    }

    /// The running config's entry of pipeline `name`, if there is one.
    pub(super) fn config_of(&self, name: &str) -> Option<PipelineConfig> {
        let board = self.0.read().unwrap_or_else(|e| e.into_inner());
        board.configs.iter().find(|p| p.name == name).cloned()
    }

    /// The config file, once the running set has published.
    pub(super) fn config_path(&self) -> Option<PathBuf> {
        self.snapshot().config_path
    }

    /// The running config's pipelines.
    pub(super) fn configs(&self) -> Vec<PipelineConfig> {
        self.snapshot().configs
    }
}

/// A query set as the page shows and edits it: name, colour, prompts, threshold, background.
fn queries_json(queries: &QuerySet) -> Vec<serde_json::Value> {
    queries
        .specs
        .iter()
        .zip(&queries.labels)
        .map(|(spec, &label)| {
            let colour = (!spec.background)
                .then(|| queries.palette.get(label as usize))
                .flatten()
                .map(|[r, g, b]| format!("#{r:02x}{g:02x}{b:02x}"));
            json!({
                "name": spec.name.trim(),
                "colour": colour,
                "prompts": (!spec.prompts.is_empty()).then_some(&spec.prompts),
                "threshold": spec.threshold,
                "background": spec.background,
            })
        })
        .collect()
}

/// The page switch and the viewing guard, for every route here.
fn viewing(ctx: &Ctx, headers: &HeaderMap, route: &str) -> Option<Response> {
    if !ctx.state.access.page {
        return Some(page_off());
    }
    guard(&ctx.state, headers, Need::View, route)
}

fn no_pipeline(name: &str) -> Response {
    json_reply(
        StatusCode::NOT_FOUND,
        json!({ "error": format!("no running pipeline '{}'", name.chars().take(64).collect::<String>()) }),
    )
}

/// `GET /v1/pipelines`.
pub async fn list(Extract(ctx): Extract<Ctx>, headers: HeaderMap) -> Response {
    if let Some(refused) = viewing(&ctx, &headers, "GET /v1/pipelines") {
        return refused;
    }
    let board = ctx.state.live.snapshot();
    let pipelines: Vec<serde_json::Value> = board
        .pipelines
        .iter()
        .map(|p| {
            let mut entry = p.entry.clone();
            entry["running"] = json!(p
                .shared
                .as_ref()
                .is_some_and(|s| s.metrics.failure().is_none()));
            entry
        })
        .collect();
    json_reply(StatusCode::OK, json!({ "pipelines": pipelines }))
}

/// `GET /v1/pipelines/{name}/history?seconds=N` (N at most 600, the default).
pub async fn history(
    Extract(ctx): Extract<Ctx>,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = viewing(&ctx, &headers, "GET /v1/pipelines/{name}/history") {
        return refused;
    }
    let Some(shared) = ctx.state.live.running(&name) else {
        return no_pipeline(&name);
    };
    let seconds = match seconds_param(uri.query()) {
        Ok(s) => s,
        Err(why) => return json_reply(StatusCode::BAD_REQUEST, json!({ "error": why })),
    };
    let min_area = ctx.state.live.snapshot().min_area;
    let queries: serde_json::Map<String, serde_json::Value> = shared
        .live
        .history(seconds, unix_ms())
        .into_iter()
        .map(|(query, h)| {
            let present: Vec<bool> = h.area.iter().map(|a| f64::from(*a) >= min_area).collect();
            (
                query,
                json!({ "t_ms": h.t_ms, "area": h.area, "present": present }),
            )
        })
        .collect();
    json_reply(
        StatusCode::OK,
        json!({ "interval_s": 1.0, "min_area": min_area, "queries": queries }),
    )
}

/// `seconds=N` from a query string: 1 to `HISTORY_SECONDS` (larger is capped); absent: all of it.
fn seconds_param(query: Option<&str>) -> Result<u64, String> {
    let value = query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("seconds="));
    match value {
        None => Ok(HISTORY_SECONDS),
        Some(v) => match v.parse::<u64>() {
            Ok(s) if s >= 1 => Ok(s.min(HISTORY_SECONDS)),
            _ => Err(format!(
                "seconds: '{}' is not a whole number of seconds from 1 to {HISTORY_SECONDS}",
                v.chars().take(20).collect::<String>()
            )),
        },
    }
}

/// A viewer's receiver of pipeline `name`'s overlays, after the page switch and the viewing guard.
fn subscribe(
    ctx: &Ctx,
    headers: &HeaderMap,
    name: &str,
    route: &str,
) -> Result<LiveFrames, Response> {
    if let Some(refused) = viewing(ctx, headers, route) {
        return Err(refused);
    }
    ctx.state
        .live
        .running(name)
        .and_then(|s| s.live.subscribe())
        .ok_or_else(|| no_pipeline(name))
}

/// `GET /v1/pipelines/{name}/live.mjpeg`.
pub async fn mjpeg(
    Extract(ctx): Extract<Ctx>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    // Only the receiver goes into the stream: a removed pipeline's state is not kept alive by a viewer.
    let frames = match subscribe(&ctx, &headers, &name, "GET /v1/pipelines/{name}/live.mjpeg") {
        Ok(frames) => frames,
        Err(refused) => return refused,
    };
    let parts = futures_util::stream::unfold(frames, |mut frames| async move {
        loop {
            // Err: the pipeline has stopped, and so does the stream.
            frames.changed().await.ok()?;
            let latest = frames.borrow_and_update().clone();
            if let Some(frame) = latest {
                return Some((Ok::<_, Infallible>(part(&frame)), frames));
            }
        }
    });
    let mut reply = Body::from_stream(parts).into_response();
    let headers = reply.headers_mut();
    if let Ok(value) =
        HeaderValue::from_str(&format!("multipart/x-mixed-replace; boundary={BOUNDARY}"))
    {
        headers.insert(header::CONTENT_TYPE, value);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    reply
}

/// One multipart part: boundary, headers, the JPEG.
fn part(frame: &LiveFrame) -> Vec<u8> {
    let mut bytes = format!(
        "--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\nX-Frame-Sequence: {}\r\n\r\n",
        frame.jpeg.len(),
        frame.sequence
    )
    .into_bytes();
    bytes.extend_from_slice(&frame.jpeg);
    bytes.extend_from_slice(b"\r\n");
    bytes
}

/// `GET /v1/pipelines/{name}/live.jpg`: the latest overlay; asking for it makes the pipeline encode the next
/// one when nobody was watching. When none is fresh it waits `NEXT_FRAME_WAIT` for one, then answers with the
/// last one made, or 503 with Retry-After when there has been none.
pub async fn jpeg(
    Extract(ctx): Extract<Ctx>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut frames = match subscribe(&ctx, &headers, &name, "GET /v1/pipelines/{name}/live.jpg") {
        Ok(frames) => frames,
        Err(refused) => return refused,
    };
    let current = frames.borrow_and_update().clone();
    let mut latest = current
        .clone()
        .filter(|f| unix_ms().saturating_sub(f.wall_ms) < FRESH_MS);
    if latest.is_none() {
        let waited = tokio::time::timeout(NEXT_FRAME_WAIT, async {
            while frames.changed().await.is_ok() {
                if let Some(f) = frames.borrow_and_update().clone() {
                    return Some(f);
                }
            }
            None
        })
        .await;
        // A slow pipeline (or a source that went down) still shows the last overlay it made.
        latest = waited.ok().flatten().or(current);
    }
    match latest {
        Some(frame) => {
            let mut reply = Body::from(frame.jpeg.clone()).into_response();
            let h = reply.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            reply
        }
        None => {
            let mut reply = json_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "error": format!("no frame from '{name}' yet: its source may be down; see /status") }),
            );
            reply
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            reply
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_is_checked_and_capped() {
        assert_eq!(seconds_param(None), Ok(HISTORY_SECONDS));
        assert_eq!(seconds_param(Some("seconds=60")), Ok(60));
        assert_eq!(seconds_param(Some("x=1&seconds=9999")), Ok(HISTORY_SECONDS));
        assert!(seconds_param(Some("seconds=0")).is_err());
        assert!(seconds_param(Some("seconds=-5")).is_err());
    }

    #[test]
    fn a_part_carries_its_length_and_the_jpeg() {
        let frame = LiveFrame {
            sequence: 7,
            wall_ms: 0,
            jpeg: vec![0xff, 0xd8, 0xff, 0xd9],
        };
        let bytes = part(&frame);
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.starts_with("--tclsegframe\r\nContent-Type: image/jpeg\r\nContent-Length: 4\r\n")
        );
        assert!(bytes.ends_with(&[0xff, 0xd8, 0xff, 0xd9, b'\r', b'\n']));
    }

    #[test]
    fn queries_show_their_colours_and_background_none() {
        let set = QuerySet::new(vec![
            QueryEntry::Name("cat".into()).to_spec(),
            crate::queries::QuerySpec {
                name: "sky".into(),
                prompts: vec!["the sky".into()],
                colour: None,
                threshold: Some(0.5),
                background: true,
            },
        ])
        .expect("valid");
        let shown = queries_json(&set);
        assert_eq!(shown[0]["colour"], "#800000");
        assert_eq!(shown[0]["prompts"], serde_json::Value::Null);
        assert_eq!(shown[1]["colour"], serde_json::Value::Null);
        assert_eq!(shown[1]["prompts"], json!(["the sky"]));
        assert_eq!(shown[1]["threshold"], 0.5);
    }
}
