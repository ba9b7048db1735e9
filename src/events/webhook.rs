//! Webhook delivery from the outbox: POST each event's JSON, signed, one at a time, retried with backoff.
//!
//! The signature follows the common provider scheme: HMAC-SHA256 with the shared secret over `<timestamp>.<body>`,
//! sent as `X-Tclseg-Signature: sha256=<hex>` beside `X-Tclseg-Timestamp` (Unix seconds), so the receiver can
//! reject a replayed or altered body. Events go out strictly one after another and the next waits until the
//! receiver answered 2xx, which keeps them in order per pipeline; any other answer, a timeout or a refused
//! connection is retried with exponential backoff (the bounded outbox caps what piles up meanwhile). `https://`
//! URLs go over TLS with the same rustls config as MQTT ([`super::tls`]): the system's roots, or a `ca_file` for a
//! receiver with a private CA, and a client certificate where the receiver asks for one. The signature is kept
//! over TLS too: TLS authenticates the receiver to us, the signature authenticates us to the receiver.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use sha2::Sha256;
use tokio::sync::watch;

use super::event::Event;
use super::outbox::Outbox;
use super::tls::{self, TlsError, TlsFiles};

/// One `[[events.webhooks]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the outbox queue (`webhook:<name>`) and the logs.
    pub name: String,
    /// `http://host[:port]/path` or `https://host[:port]/path`.
    pub url: String,
    /// For `https://`: PEM certificates of the CA(s) that signed the receiver's certificate, trusted instead of the
    /// system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// For `https://`: a PEM certificate chain to present to a receiver that requires client certificates.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// The PEM private key of `client_cert_file`.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// A file holding the signing secret (trailing newline ignored); without it requests go unsigned.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Seconds one request may take, connection included.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// The longest wait between retries.
    #[serde(default = "default_max_backoff")]
    pub max_backoff_s: f64,
}

fn default_timeout() -> f64 {
    10.0
}

fn default_max_backoff() -> f64 {
    60.0
}

impl WebhookConfig {
    /// The outbox destination this webhook reads.
    pub fn destination(&self) -> String {
        format!("webhook:{}", self.name)
    }

    /// Whether the URL is `https://`.
    pub fn uses_tls(&self) -> bool {
        self.url.starts_with("https://")
    }

    /// The TLS files given.
    pub fn tls_files(&self) -> TlsFiles<'_> {
        TlsFiles::of(&self.ca_file, &self.client_cert_file, &self.client_key_file)
    }

    /// Problems in the entry as (key, message), for config validation; the files themselves are read by the
    /// whole-config check.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        if !(self.url.starts_with("http://") || self.uses_tls()) {
            errors.push(("url".into(), "must be an http:// or https:// URL".into()));
        } else if !self.uses_tls() {
            for key in self.tls_files().keys_given() {
                errors.push((
                    key.into(),
                    format!(
                        "is only used for https:// URLs, and url is {}: make it https:// or remove {key}",
                        self.url
                    ),
                ));
            }
        }
        errors
    }
}

/// Why one POST did not deliver.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook URL {0:?} is not an http:// or https:// URL with a host")]
    Url(String),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("TLS handshake: {error}{}", hint.map(|h| format!(" ({h})")).unwrap_or_default())]
    Handshake {
        error: std::io::Error,
        hint: Option<&'static str>,
    },
    #[error("secret file {0}: {1}")]
    Secret(String, std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Request(#[from] hyper::http::Error),
    #[error("receiver answered {0}")]
    Status(u16),
}

/// The signature header's value for `body` sent at `timestamp`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    // HMAC accepts a key of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Delivers one webhook's outbox queue.
pub struct WebhookSink {
    config: WebhookConfig,
    outbox: Outbox,
    /// The TLS client config of an `https://` URL, built at the first POST (and again after a failed build, so a
    /// fixed file is picked up by the next retry).
    tls: Mutex<Option<Arc<rustls::ClientConfig>>>,
}

impl WebhookSink {
    pub fn new(config: WebhookConfig, outbox: Outbox) -> WebhookSink {
        WebhookSink {
            config,
            outbox,
            tls: Mutex::new(None),
        }
    }

    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, WebhookError> {
        // A poisoned lock only means another POST panicked mid-build; the cached value is still whole.
        let mut cached = self.tls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(config) = cached.as_ref() {
            return Ok(config.clone());
        }
        let config = tls::client_config(self.config.tls_files())?;
        *cached = Some(config.clone());
        Ok(config)
    }

    /// Deliver until `shutdown` turns true (or its sender is dropped).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let dest = self.config.destination();
        let (Ok(notify), Ok(counters)) = (self.outbox.notifier(&dest), self.outbox.counters(&dest))
        else {
            tracing::error!(webhook = %self.config.name, "the outbox has no queue for this webhook");
            return;
        };
        let first = Duration::from_millis(250);
        let max = Duration::from_secs_f64(self.config.max_backoff_s.clamp(0.25, 3600.0));
        let mut backoff = first;
        while !super::stopped(&shutdown) {
            let next = match self.outbox.pending(&dest, None, 1) {
                Ok(mut v) => v.pop(),
                Err(error) => {
                    tracing::error!(webhook = %self.config.name, %error, "event outbox unreadable");
                    None
                }
            };
            let Some((seq, event)) = next else {
                tokio::select! {
                    _ = notify.notified() => {}
                    _ = super::stopping(&mut shutdown) => {}
                    // A store error above is retried rather than waited out forever.
                    _ = tokio::time::sleep(max) => {}
                }
                continue;
            };
            match self.post(&event).await {
                Ok(()) => {
                    backoff = first;
                    if let Err(error) = self.outbox.ack(&dest, &[seq]) {
                        tracing::error!(webhook = %self.config.name, %error, "could not acknowledge an event");
                    }
                }
                Err(error) => {
                    counters.retried.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        webhook = %self.config.name, event = %event.id, %error,
                        retry_in_ms = backoff.as_millis() as u64, "webhook delivery failed"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = super::stopping(&mut shutdown) => {}
                    }
                    backoff = (backoff * 2).min(max);
                }
            }
        }
    }

    /// One signed POST of `event`; Ok only for a 2xx answer within the timeout.
    pub async fn post(&self, event: &Event) -> Result<(), WebhookError> {
        let limit = Duration::from_secs_f64(self.config.timeout_s.clamp(0.1, 600.0));
        tokio::time::timeout(limit, self.post_unbounded(event))
            .await
            .map_err(|_| WebhookError::Timeout)?
    }

    async fn post_unbounded(&self, event: &Event) -> Result<(), WebhookError> {
        let bad_url = || WebhookError::Url(self.config.url.clone());
        let uri: Uri = self.config.url.parse().map_err(|_| bad_url())?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad_url()),
        };
        let host = uri.host().ok_or_else(bad_url)?.to_string();
        let authority = uri.authority().ok_or_else(bad_url)?.to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let body = event.to_json();
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut request = Request::post(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("X-Tclseg-Event-Id", &event.id)
            .header("X-Tclseg-Timestamp", timestamp.to_string());
        if let Some(file) = &self.config.secret_file {
            let secret = std::fs::read_to_string(file)
                .map_err(|e| WebhookError::Secret(file.display().to_string(), e))?;
            let secret = secret.trim_end_matches(['\r', '\n']);
            request = request.header(
                "X-Tclseg-Signature",
                signature(secret.as_bytes(), timestamp, &body),
            );
        }
        let request = request.body(Full::new(Bytes::from(body)))?;
        // An IPv6 literal is bracketed in the URL, bare in a socket address and a TLS server name.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let stream = tokio::net::TcpStream::connect((host, port)).await?;
        if !https {
            return exchange(stream, request).await;
        }
        let name =
            rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|_| bad_url())?;
        let stream = tokio_rustls::TlsConnector::from(self.tls_config()?)
            .connect(name, stream)
            .await
            .map_err(|error| WebhookError::Handshake {
                hint: tls::hint(&error, true),
                error,
            })?;
        exchange(stream, request).await
    }
}

/// Send `request` over `stream` (plain or TLS) and wait for a 2xx.
async fn exchange<S>(stream: S, request: Request<Full<Bytes>>) -> Result<(), WebhookError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let response = sender.send_request(request).await;
    let outcome = match response {
        Ok(r) => {
            let status = r.status();
            // Read the answer so the connection closes cleanly; its content does not matter.
            let _ = r.into_body().collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(WebhookError::Status(status.as_u16()))
            }
        }
        Err(e) => Err(e.into()),
    };
    driver.abort();
    outcome
}
