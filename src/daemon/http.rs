//! The control plane over HTTP/1.1 on localhost: `/livez`, `/readyz`, `/metrics` (Prometheus), `/status` (JSON),
//! `POST /reload`, `POST /v1/segment` (an image segmented on request: `segment.rs`), and the live page's routes:
//! `/v1/session` (`session.rs`), `/v1/pipelines` with each pipeline's `live.mjpeg`, `live.jpg` and `history`
//! (`live.rs`) and `PUT .../queries` (`query_edit.rs`). Routing is axum's, the connections are hyper's: one request
//! per connection (keep-alive off), a bounded request head, a deadline on reading it, and nothing but these routes.
//!
//! Access: the probes (`/livez /readyz /metrics /status`) are read-only and stay open, so probes and Prometheus
//! scrapes need no credentials (they show redacted sources only). Every other route goes through `guard`, the one
//! place a request is authorised: the loopback Host guard, then — when `http.token_file` is set (which validation
//! requires for any `listen` address off loopback) — `Authorization: Bearer <token>` compared in constant time or
//! the page's session cookie, then for state changes (`POST /reload`, `POST /v1/segment`, the query editor) the
//! Origin check. `session.rs` says why each check is there.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State as Extract};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::config::diff::PipelineChange;

use super::{ReloadError, ReloadOutcome, State};

/// The most a request head (request line and headers) may hold, and the most any handler may read of a body.
/// Only `POST /v1/segment` takes a body, read under its own limit (`http.segment_max_mb`).
const MAX_REQUEST: usize = 16 * 1024;
/// The most a query edit (`PUT /v1/pipelines/{name}/queries`) may hold: far more than any real query list.
const QUERY_EDIT_BODY: usize = 256 * 1024;
/// How long a client has to send the whole request head, from the moment it connects. A client that stalls
/// (slowloris) is disconnected then, without an answer.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long, once the daemon has stopped, answers still being written may take before the server is dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A reload asked for over HTTP; the answer is what it did or why it did nothing.
pub type ReloadRequest = oneshot::Sender<Result<ReloadOutcome, ReloadError>>;

/// What every handler sees.
#[derive(Clone)]
pub(super) struct Ctx {
    pub(super) state: Arc<State>,
    reload: mpsc::Sender<ReloadRequest>,
}

/// The routes, with the daemon's state. Separate from `serve` so the routing can be read in one place.
fn router(state: Arc<State>, reload: mpsc::Sender<ReloadRequest>) -> Router {
    Router::new()
        .route("/livez", get(|| async { text(StatusCode::OK, "ok\n") }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/reload", post(reload_handler))
        .route("/v1/segment", post(super::segment::handler))
        .route(
            "/v1/session",
            get(super::session::status)
                .post(super::session::login)
                .delete(super::session::logout),
        )
        .route("/v1/pipelines", get(super::live::list))
        .route("/v1/pipelines/{name}/live.mjpeg", get(super::live::mjpeg))
        .route("/v1/pipelines/{name}/live.jpg", get(super::live::jpeg))
        .route("/v1/pipelines/{name}/history", get(super::live::history))
        .route(
            "/v1/pipelines/{name}/queries",
            put(super::query_edit::put).layer(DefaultBodyLimit::max(QUERY_EDIT_BODY)),
        )
        // The live page (page.rs): files compiled into the binary.
        .route("/", get(super::page::index))
        .route("/ui/app.js", get(super::page::app_js))
        .route("/ui/style.css", get(super::page::style_css))
        .method_not_allowed_fallback(|| async {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        })
        .fallback(|| async {
            text(
                StatusCode::NOT_FOUND,
                "not found (try /livez, /readyz, /metrics, /status, POST /reload, POST /v1/segment, /v1/pipelines)\n",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_REQUEST))
        .with_state(Ctx { state, reload })
}

/// Serves `listener` until `shutdown` completes; then stops accepting, lets answers in progress finish (at most
/// `SHUTDOWN_GRACE`) and returns.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    reload: mpsc::Sender<ReloadRequest>,
    shutdown: impl Future<Output = ()>,
) {
    let app = router(state, reload);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .max_buf_size(MAX_REQUEST)
        .keep_alive(false);
    let connections = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait a little instead of spinning on the error.
                    tracing::debug!("http: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("http: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, connections.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("http: connections still open at shutdown were dropped");
    }
}

async fn readyz(Extract(ctx): Extract<Ctx>) -> Response {
    match ctx.state.not_ready() {
        None => text(StatusCode::OK, "ready\n"),
        Some(why) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(Extract(ctx): Extract<Ctx>) -> Response {
    let body = ctx.state.telemetry.render_prometheus();
    reply(
        StatusCode::OK,
        crate::telemetry::PROMETHEUS_CONTENT_TYPE,
        body,
    )
}

async fn status(Extract(ctx): Extract<Ctx>) -> Response {
    let body = serde_json::to_string_pretty(&ctx.state.status()).unwrap_or_default();
    reply(StatusCode::OK, "application/json", body)
}

async fn reload_handler(Extract(ctx): Extract<Ctx>, headers: HeaderMap) -> Response {
    if let Some(refused) = authorize(&ctx.state, &headers, "POST /reload") {
        return refused;
    }
    run_reload(&ctx).await
}

/// Runs the reload of SIGHUP through the control loop and replies with its outcome: `POST /reload`, and the
/// query editor once it has written the file.
pub(super) async fn run_reload(ctx: &Ctx) -> Response {
    let (tx, rx) = oneshot::channel();
    if ctx.reload.send(tx).await.is_err() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    match rx.await {
        Ok(Ok(outcome)) => reply(
            StatusCode::OK,
            "application/json",
            outcome_json(&outcome).to_string(),
        ),
        Ok(Err(error)) => reply(
            StatusCode::BAD_REQUEST,
            "application/json",
            error_json(&error).to_string(),
        ),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
    }
}

/// What a route needs from a request (see `session.rs` for the why of each check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    /// Reading the page's data: the token or a session cookie when a token is configured.
    View,
    /// A state change: the token or a session cookie when a token is configured, and the Origin check.
    Change,
    /// Logging in or out: no credentials (the token is in the body), but the Origin check.
    Login,
}

/// How a request proved it may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// No token is configured (loopback only).
    Open,
    Bearer,
    Cookie,
}

/// The answer refusing a state-changing request to `route`, or None when it may go on. See `guard`.
pub(super) fn authorize(state: &State, headers: &HeaderMap, route: &str) -> Option<Response> {
    guard(state, headers, Need::Change, route)
}

/// The one place a request is authorised: the Host guard on a loopback listener, then the bearer token or the
/// page's session cookie (when `http.token_file` is set; the token compared in constant time), then for state
/// changes the Origin check. The answer refusing it, or None when it may go on.
pub(super) fn guard(
    state: &State,
    headers: &HeaderMap,
    need: Need,
    route: &str,
) -> Option<Response> {
    let access = &state.access;
    if let Some(why) = access.host_refusal(headers) {
        tracing::warn!("{route} refused: {why}");
        return Some(text(StatusCode::FORBIDDEN, format!("forbidden: {why}\n")));
    }
    let via = match need {
        Need::Login => Via::Open,
        Need::View | Need::Change => match credentials(state, headers, route) {
            Ok(via) => via,
            Err(refused) => return Some(refused),
        },
    };
    if need != Need::View {
        if let Some(why) = super::session::origin_refusal(headers, via == Via::Cookie) {
            tracing::warn!("{route} refused: {why}");
            return Some(text(StatusCode::FORBIDDEN, format!("forbidden: {why}\n")));
        }
    }
    None
}

/// True when the request carries what viewing needs (`GET /v1/session` reports it).
pub(super) fn authorized(state: &State, headers: &HeaderMap) -> bool {
    state.access.host_refusal(headers).is_none()
        && credentials(state, headers, "GET /v1/session").is_ok()
}

fn credentials(state: &State, headers: &HeaderMap, route: &str) -> Result<Via, Response> {
    let Some(token) = state.token.as_ref() else {
        return Ok(Via::Open);
    };
    match bearer(headers) {
        Some(given) if same_token(given, token) => Ok(Via::Bearer),
        Some(_) => {
            tracing::warn!("{route} refused: wrong bearer token");
            Err(text(StatusCode::FORBIDDEN, "forbidden: wrong token\n"))
        }
        None if state.access.cookie_valid(headers) => Ok(Via::Cookie),
        None => {
            let mut refused = text(
                StatusCode::UNAUTHORIZED,
                "unauthorized: send Authorization: Bearer <the token in http.token_file>, or log in on the page\n",
            );
            refused.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tclseg\""),
            );
            Err(refused)
        }
    }
}

/// The 200 reply to `POST /reload`: `added`, `removed`, `changed` (`pipeline` and `change`: `queries` or
/// `restart`), `needs_restart`, `failed`, and for a changed `[model]` either `model_swapped` (the new model's
/// manifest sha256) or `model_error` (why the old model keeps serving); both null when `[model]` is unchanged.
fn outcome_json(outcome: &ReloadOutcome) -> serde_json::Value {
    let applied = &outcome.diff;
    let changed: Vec<serde_json::Value> = applied
        .changed
        .iter()
        .map(|(name, change)| {
            let change = match change {
                PipelineChange::Queries => "queries",
                PipelineChange::Restart => "restart",
            };
            json!({ "pipeline": name, "change": change })
        })
        .collect();
    json!({
        "added": applied.added,
        "removed": applied.removed,
        "changed": changed,
        "needs_restart": applied.needs_restart,
        "failed": outcome.failed,
        "model_swapped": outcome.model_swapped,
        "model_error": outcome.model_error,
    })
}

/// The 400 reply to `POST /reload`: the config file and its errors, or only `errors` when the reload could
/// not run at all.
fn error_json(error: &ReloadError) -> serde_json::Value {
    match error {
        ReloadError::Invalid(e) => {
            json!({ "file": e.file.display().to_string(), "errors": e.errors })
        }
        ReloadError::Failed(why) => json!({ "errors": [why] }),
    }
}

/// The token of the first `Authorization: Bearer <token>` header, if the request has one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .find_map(|value| {
            let (scheme, token) = value.to_str().ok()?.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
}

/// Compares the SHA-256 digests in constant time: neither the contents nor the length of the token leak
/// through the response time.
pub(super) fn same_token(given: &str, expected: &str) -> bool {
    let (a, b) = (
        Sha256::digest(given.as_bytes()),
        Sha256::digest(expected.as_bytes()),
    );
    bool::from(a.as_slice().ct_eq(b.as_slice()))
}

pub(super) fn text(code: StatusCode, body: impl Into<String>) -> Response {
    reply(code, "text/plain", body.into())
}

pub(super) fn json_reply(code: StatusCode, body: serde_json::Value) -> Response {
    reply(code, "application/json", body.to_string())
}

pub(super) fn reply(code: StatusCode, content_type: &'static str, body: String) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::diff::ConfigDiff;
    use crate::config::ConfigErrors;

    #[test]
    fn a_reload_outcome_replies_with_every_list_and_each_change_by_name() {
        let outcome = ReloadOutcome {
            diff: ConfigDiff {
                added: vec!["new".into()],
                removed: vec!["old".into()],
                changed: vec![
                    ("cam".into(), PipelineChange::Queries),
                    ("door".into(), PipelineChange::Restart),
                ],
                needs_restart: vec!["http".into()],
            },
            failed: vec!["door: no such folder".into()],
            model_swapped: None,
            model_error: Some("no model bundle at /gone".into()),
        };
        assert_eq!(
            outcome_json(&outcome),
            json!({
                "added": ["new"],
                "removed": ["old"],
                "changed": [
                    { "pipeline": "cam", "change": "queries" },
                    { "pipeline": "door", "change": "restart" },
                ],
                "needs_restart": ["http"],
                "failed": ["door: no such folder"],
                "model_swapped": null,
                "model_error": "no model bundle at /gone",
            })
        );
    }

    #[test]
    fn a_rejected_reload_names_the_file_and_one_that_could_not_run_only_why() {
        let invalid = ReloadError::Invalid(ConfigErrors {
            file: PathBuf::from("/etc/tclseg.toml"),
            errors: vec!["pipelines[0].max_fps: expected a number".into()],
        });
        assert_eq!(
            error_json(&invalid),
            json!({
                "file": "/etc/tclseg.toml",
                "errors": ["pipelines[0].max_fps: expected a number"],
            })
        );
        let failed = ReloadError::Failed("daemon state poisoned".into());
        assert_eq!(
            error_json(&failed),
            json!({ "errors": ["daemon state poisoned"] })
        );
    }
}
