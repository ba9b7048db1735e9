//! `POST /v1/segment`: one image, segmented with the queries the request names (`queries=a,b` or repeated
//! `query=`) or those of a running pipeline (`pipeline=<name>`, its thresholds too), with optional settings and
//! per-query thresholds (`params.rs`). The image is the whole body (PNG, JPEG or any format `source::decode`
//! reads), or the part `image` of a `multipart/form-data` upload whose text fields carry the parameters
//! (`upload.rs`); the query string's parameters count either way. The answer is the JSON sidecar a pipeline
//! writes (same encoder, `sink::encode`), or with `Accept: image/png` the label PNG, or with `Accept:
//! image/jpeg` the overlay.
//!
//! The image goes to the inference worker through its request queue (`pipeline::requests`): the worker serves
//! it in turn with the streams, on its own thread; this handler only waits for the answer. Decoding and encoding
//! run on the blocking pool, never on the runtime's threads. Limits: the body (`http.segment_max_mb`, 413), the
//! image's pixels (`http.segment_max_pixels`, 413, checked from the header before decoding), the queue
//! (`http.segment_queue`: full → 429 with `Retry-After`), and a deadline on reading the body (408).

mod params;
mod upload;

use std::path::PathBuf;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{RawQuery, State as Extract};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::oneshot;

use super::http::{authorize, text, Ctx};
use crate::config::HttpSection;
use crate::pipeline::requests::{
    overridden, with_thresholds, RequestQueries, SegmentReply, SegmentRequest,
};
use crate::pipeline::worker::Scheduler;
use crate::queries::QuerySet;
use crate::sink::encode::{
    encode_image, ImagePaths, Keep, OutputKinds, SegmentedImage, SidecarInfo,
};
use crate::sink::overlay::OverlayFormat;
use crate::source::decode::{decode_bytes, DecodeError};

/// What a 429 tells the client to wait, in seconds: a queued image is usually served well within it.
const RETRY_AFTER_S: &str = "1";
/// What the sidecar's `image` field says: the image came in a request, not from a file or a stream.
const UPLOAD: &str = "the request body";

/// The body and pixel limits of `POST /v1/segment`.
#[derive(Debug, Clone, Copy)]
pub struct SegmentLimits {
    pub max_bytes: usize,
    pub max_pixels: u64,
}

impl SegmentLimits {
    pub fn from_config(http: &HttpSection) -> SegmentLimits {
        SegmentLimits {
            max_bytes: usize::try_from(http.segment_max_mb.saturating_mul(1 << 20))
                .unwrap_or(usize::MAX),
            max_pixels: http.segment_max_pixels,
        }
    }
}

/// What the client asked to get back.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Reply {
    Sidecar,
    Labels,
    Overlay,
}

impl Reply {
    /// From `Accept`: `image/png` the label map, `image/jpeg` the overlay, anything else the JSON sidecar.
    fn from_accept(headers: &HeaderMap) -> Reply {
        let accept = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let wants = |kind: &str| {
            accept
                .split(',')
                .any(|part| part.split(';').next().unwrap_or("").trim() == kind)
        };
        if wants("image/png") {
            Reply::Labels
        } else if wants("image/jpeg") {
            Reply::Overlay
        } else {
            Reply::Sidecar
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Reply::Sidecar => "application/json",
            Reply::Labels => "image/png",
            Reply::Overlay => "image/jpeg",
        }
    }

    fn kinds(self) -> OutputKinds {
        OutputKinds {
            labels: self == Reply::Labels,
            overlay: (self == Reply::Overlay).then_some(OverlayFormat::Jpeg),
            json: self == Reply::Sidecar,
            scores: false,
        }
    }
}

/// The route: answers, and records the answer's code and time in `/metrics`.
pub(super) async fn handler(
    Extract(ctx): Extract<Ctx>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    let response = match segment(&ctx, query.as_deref(), &headers, body).await {
        Ok(response) => response,
        Err(refused) => refused,
    };
    ctx.state
        .telemetry
        .segment_requests
        .record(response.status().as_u16(), start.elapsed());
    response
}

async fn segment(
    ctx: &Ctx,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Response> {
    let state = &ctx.state;
    if let Some(refused) = authorize(state, headers, "POST /v1/segment") {
        return Err(refused);
    }
    let Some(scheduler) = state.worker() else {
        return Err(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: the model is not loaded yet\n",
        ));
    };
    let mut params = params::Params::from_query(query).map_err(bad_request)?;
    let limits = state.segment_limits;
    let bytes = upload::read(body, headers, limits.max_bytes, &mut params).await?;
    let queries = request_queries(scheduler, params)?;
    let decode_start = Instant::now();
    let image = blocking(move || decode_bytes(UPLOAD, &bytes, limits.max_pixels))
        .await?
        .map_err(|e| {
            let code = match e {
                DecodeError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            text(code, format!("{e}\n"))
        })?;
    let decode_ms = decode_start.elapsed().as_secs_f64() * 1e3;
    let (reply, answer) = oneshot::channel();
    let request = SegmentRequest {
        image,
        queries,
        received: Instant::now(),
        reply,
    };
    if scheduler.requests.try_push(request).is_err() {
        let mut busy = text(
            StatusCode::TOO_MANY_REQUESTS,
            "busy: the queue of images waiting for the model is full; retry later\n",
        );
        busy.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
        return Err(busy);
    }
    let segmented = match answer.await {
        Ok(Ok(segmented)) => segmented,
        Ok(Err(why)) => return Err(text(StatusCode::INTERNAL_SERVER_ERROR, format!("{why}\n"))),
        Err(_) => return Err(text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")),
    };
    let format = Reply::from_accept(headers);
    let bytes = blocking(move || encode(&segmented, format, decode_ms))
        .await?
        .map_err(|e| text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")))?;
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(format.content_type()),
        )],
        bytes,
    )
        .into_response())
}

fn bad_request(why: impl std::fmt::Display) -> Response {
    text(StatusCode::BAD_REQUEST, format!("{why}\n"))
}

/// The queries a request is segmented with: the names it gives, or the running pipeline's it names (404 when
/// none runs by that name), with its settings and thresholds over the defaults.
fn request_queries(
    scheduler: &Scheduler,
    params: params::Params,
) -> Result<RequestQueries, Response> {
    let asked = params.asked().map_err(bad_request)?;
    match asked.queries {
        params::QuerySource::Pipeline(name) => {
            let Some(prepared) = scheduler.pipeline_queries(&name) else {
                return Err(text(
                    StatusCode::NOT_FOUND,
                    format!("no running pipeline is named '{name}'\n"),
                ));
            };
            overridden(&prepared, asked.overrides, &asked.thresholds)
                .map(RequestQueries::Pipeline)
                .map_err(bad_request)
        }
        params::QuerySource::Names(names) => {
            let set = QuerySet::from_names(&names)
                .map_err(|e| bad_request(format_args!("queries: {e:#}")))?;
            let set = with_thresholds(&set, &asked.thresholds).map_err(bad_request)?;
            Ok(RequestQueries::Given(set, asked.overrides))
        }
    }
}

/// Runs CPU work (decoding, encoding) on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    tokio::task::spawn_blocking(work).await.map_err(|_| {
        text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request's task failed\n",
        )
    })
}

/// The answer's bytes, through the one encoder of an image's outputs.
fn encode(segmented: &SegmentReply, format: Reply, decode_ms: f64) -> anyhow::Result<Vec<u8>> {
    let q = &segmented.queries;
    let item = SegmentedImage {
        image: &segmented.image,
        segmentation: &segmented.segmentation,
        queries: &q.queries,
        settings: &q.settings,
    };
    let info = SidecarInfo {
        image: UPLOAD.into(),
        frame: None,
        captured: None,
        // The engine that answered (after a model swap, the new one).
        model: segmented.engine.model_info(&q.settings),
        decode_ms,
        inference_ms: segmented.infer.as_secs_f64() * 1e3,
    };
    let paths = ImagePaths::new(PathBuf::from("upload"));
    let encoded = encode_image(&paths, &item, &format.kinds(), Keep::default(), info)?;
    encoded
        .files
        .into_iter()
        .next()
        .map(|file| file.bytes)
        .ok_or_else(|| anyhow::anyhow!("nothing was encoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_picks_the_label_map_the_overlay_or_the_sidecar() {
        let with = |accept: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::ACCEPT,
                HeaderValue::from_str(accept).expect("header"),
            );
            Reply::from_accept(&h)
        };
        assert_eq!(with("image/png"), Reply::Labels);
        assert_eq!(with("image/jpeg;q=0.9, */*"), Reply::Overlay);
        assert_eq!(with("application/json"), Reply::Sidecar);
        assert_eq!(Reply::from_accept(&HeaderMap::new()), Reply::Sidecar);
    }
}
