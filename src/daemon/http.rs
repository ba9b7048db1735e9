//! The control plane over HTTP/1.1 on localhost: `/livez`, `/readyz`, `/metrics` (Prometheus), `/status` (JSON)
//! and `POST /reload`. A deliberately small server on tokio: one request per connection, bounded request size
//! and read time, nothing but these five routes.
//!
//! Access: the GET routes are read-only and stay open, so probes and Prometheus scrapes need no credentials
//! (they show redacted sources only). `POST /reload` changes what runs: when `http.token_file` is set (which
//! validation requires for any `listen` address off loopback) it needs `Authorization: Bearer <token>`,
//! compared in constant time.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::State;

const MAX_REQUEST: usize = 16 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A reload asked for over HTTP; the answer is the report or the config's errors.
pub type ReloadRequest = oneshot::Sender<Result<serde_json::Value, serde_json::Value>>;

pub async fn serve(listener: TcpListener, state: Arc<State>, reload: mpsc::Sender<ReloadRequest>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (state, reload) = (Arc::clone(&state), reload.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &state, &reload).await {
                tracing::debug!("http: {e}");
            }
        });
    }
}

async fn handle(
    mut stream: TcpStream,
    state: &State,
    reload: &mpsc::Sender<ReloadRequest>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 2048];
        loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                return Ok::<_, std::io::Error>(Some(i));
            }
            if buf.len() > MAX_REQUEST {
                return Ok(None);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .unwrap_or(Ok(None))?;
    let Some(_) = head_end else {
        return respond(&mut stream, 400, "text/plain", "bad request\n").await;
    };
    let head = String::from_utf8_lossy(&buf);
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/livez") => respond(&mut stream, 200, "text/plain", "ok\n").await,
        ("GET", "/readyz") => match state.not_ready() {
            None => respond(&mut stream, 200, "text/plain", "ready\n").await,
            Some(why) => {
                respond(
                    &mut stream,
                    503,
                    "text/plain",
                    &format!("not ready: {why}\n"),
                )
                .await
            }
        },
        ("GET", "/metrics") => {
            let body = state.telemetry.render_prometheus();
            respond(&mut stream, 200, "text/plain; version=0.0.4", &body).await
        }
        ("GET", "/status") => {
            let body = serde_json::to_string_pretty(&state.status()).unwrap_or_default();
            respond(&mut stream, 200, "application/json", &body).await
        }
        ("POST", "/reload") => {
            if let Some(token) = &state.token {
                match bearer(&head) {
                    None => return respond(
                        &mut stream,
                        401,
                        "text/plain",
                        "unauthorized: send Authorization: Bearer <the token in http.token_file>\n",
                    )
                    .await,
                    Some(given) if !same_token(given, token) => {
                        tracing::warn!("POST /reload refused: wrong bearer token");
                        return respond(&mut stream, 403, "text/plain", "forbidden: wrong token\n")
                            .await;
                    }
                    Some(_) => {}
                }
            }
            let (tx, rx) = oneshot::channel();
            if reload.send(tx).await.is_err() {
                return respond(&mut stream, 503, "text/plain", "shutting down\n").await;
            }
            match rx.await {
                Ok(Ok(report)) => {
                    respond(&mut stream, 200, "application/json", &report.to_string()).await
                }
                Ok(Err(errors)) => {
                    respond(&mut stream, 400, "application/json", &errors.to_string()).await
                }
                Err(_) => respond(&mut stream, 503, "text/plain", "shutting down\n").await,
            }
        }
        (_, "/livez" | "/readyz" | "/metrics" | "/status" | "/reload") => {
            respond(&mut stream, 405, "text/plain", "method not allowed\n").await
        }
        _ => {
            respond(
                &mut stream,
                404,
                "text/plain",
                "not found (try /livez, /readyz, /metrics, /status, POST /reload)\n",
            )
            .await
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header, if the request has one.
fn bearer(head: &str) -> Option<&str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("authorization") {
            return None;
        }
        let value = value.trim();
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then_some(token.trim())
    })
}

/// Compares the SHA-256 digests in constant time: neither the contents nor the length of the token leak
/// through the response time.
fn same_token(given: &str, expected: &str) -> bool {
    let (a, b) = (
        Sha256::digest(given.as_bytes()),
        Sha256::digest(expected.as_bytes()),
    );
    bool::from(a.as_slice().ct_eq(b.as_slice()))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let challenge = if code == 401 {
        "WWW-Authenticate: Bearer realm=\"tclseg\"\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{challenge}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
