//! Webhooks over https to a local TLS receiver (tokio-rustls + hyper, certificates made by `openssl`): every
//! event arrives once accepted, in order, with a valid signature, through a receiver that fails for a while; a
//! client that does not trust the receiver's CA, or lacks the client certificate the receiver requires, is refused
//! with a reason and a remedy; TLS spoken to a plain http receiver is named as such.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Sha256;
use tclseg::events::webhook::WebhookError;
use tclseg::events::{Event, EventKind, Outbox, WebhookConfig, WebhookSink};
use tokio::sync::watch;

mod events_common;
mod events_tls_common;
use events_common::event;
use events_tls_common::Pki;

const SECRET: &str = "tls-hush";

/// What the receiver saw: requests, accepted event ids (in order), and requests whose signature did not verify.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    fail_first: usize,
    accepted: Mutex<Vec<String>>,
    bad: AtomicUsize,
}

/// Verify the signature (HMAC-SHA256 over `timestamp.body`, computed here with the hmac crate) and answer 500 for
/// the first `fail_first` requests, 200 after.
async fn answer(
    seen: Arc<Seen>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let get = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (timestamp, signature) = (get("x-tclseg-timestamp"), get("x-tclseg-signature"));
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(&body);
    let valid = signature == format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let event: Option<Event> = serde_json::from_slice(&body).ok();
    if !valid || event.is_none() {
        seen.bad.fetch_add(1, Ordering::Relaxed);
    }
    let ok = seen.requests.fetch_add(1, Ordering::Relaxed) >= seen.fail_first;
    if let (true, Some(e)) = (ok, event) {
        seen.accepted.lock().expect("lock").push(e.id);
    }
    let mut resp = Response::new(Full::new(Bytes::from_static(b"")));
    *resp.status_mut() = if ok {
        hyper::StatusCode::OK
    } else {
        hyper::StatusCode::INTERNAL_SERVER_ERROR
    };
    Ok(resp)
}

/// The receiver's TLS config: the server certificate, and with `client_ca` only clients it signed.
fn server_config(pki: &Pki, client_ca: bool) -> Arc<rustls::ServerConfig> {
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.server_cert)
        .expect("server cert")
        .collect::<Result<_, _>>()
        .expect("server cert");
    let key = PrivateKeyDer::from_pem_file(&pki.server_key).expect("server key");
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = if client_ca {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&pki.ca).expect("ca") {
            roots.add(c.expect("ca")).expect("ca");
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("verifier");
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    Arc::new(builder.with_single_cert(chain, key).expect("server config"))
}

/// Serve `seen` on a loopback port, over TLS with `tls` or plain http without.
async fn serve(seen: Arc<Seen>, tls: Option<Arc<rustls::ServerConfig>>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (seen, acceptor) = (seen.clone(), acceptor.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| answer(seen.clone(), req));
                let http = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    // A refused handshake just ends this connection; the client reports it.
                    Some(a) => {
                        if let Ok(tls) = a.accept(stream).await {
                            let _ = http.serve_connection(TokioIo::new(tls), service).await;
                        }
                    }
                    None => {
                        let _ = http.serve_connection(TokioIo::new(stream), service).await;
                    }
                }
            });
        }
    });
    port
}

fn config(dir: &std::path::Path, port: u16, ca_file: &std::path::Path) -> WebhookConfig {
    std::fs::write(dir.join("secret"), format!("{SECRET}\n")).expect("secret");
    WebhookConfig {
        name: "secure".into(),
        url: format!("https://127.0.0.1:{port}/hook"),
        secret_file: Some(dir.join("secret")),
        timeout_s: 5.0,
        max_backoff_s: 0.5,
        ca_file: Some(ca_file.to_path_buf()),
        client_cert_file: None,
        client_key_file: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_delivers_every_event_signed_and_in_order_through_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let seen = Arc::new(Seen {
        fail_first: 3,
        ..Seen::default()
    });
    let port = serve(seen.clone(), Some(server_config(&pki, false))).await;
    let outbox =
        Outbox::open(&dir.path().join("o.redb"), 100, &["webhook:secure"]).expect("outbox");
    let ids: Vec<String> = (0..6u64)
        .map(|n| {
            let e = event(if n % 2 == 0 { "a" } else { "b" }, n, EventKind::Start);
            outbox.push(std::slice::from_ref(&e)).expect("push");
            e.id
        })
        .collect();
    let (stop, stop_rx) = watch::channel(false);
    let sink = WebhookSink::new(config(dir.path(), port, &pki.ca), outbox.clone());
    let task = tokio::spawn(sink.run(stop_rx));
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.accepted.lock().expect("lock").len() < ids.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).expect("stop");
    task.await.expect("sink ends");
    assert_eq!(
        *seen.accepted.lock().expect("lock"),
        ids,
        "every event, in order"
    );
    assert_eq!(
        seen.bad.load(Ordering::Relaxed),
        0,
        "every signature verifies"
    );
    assert!(seen.requests.load(Ordering::Relaxed) >= ids.len() + 3);
    let c = outbox.counters("webhook:secure").expect("counters");
    assert_eq!(c.depth.load(Ordering::Relaxed), 0);
    assert!(c.retried.load(Ordering::Relaxed) >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_receivers_and_missing_client_certificates_are_refused_with_a_remedy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let outbox = Outbox::open(&dir.path().join("o.redb"), 10, &["webhook:secure"]).expect("outbox");
    let e = event("a", 0, EventKind::Start);
    let post = |cfg: WebhookConfig| {
        let (outbox, e) = (outbox.clone(), e.clone());
        async move { WebhookSink::new(cfg, outbox).post(&e).await }
    };

    // Trusting another CA.
    let seen = Arc::new(Seen::default());
    let port = serve(seen.clone(), Some(server_config(&pki, false))).await;
    let err = post(config(dir.path(), port, &pki.other_ca))
        .await
        .expect_err("untrusted");
    let text = err.to_string();
    assert!(
        matches!(err, WebhookError::Handshake { .. })
            && text.contains("UnknownIssuer")
            && text.contains("set ca_file"),
        "{text}"
    );
    post(config(dir.path(), port, &pki.ca))
        .await
        .expect("trusted");
    assert_eq!(seen.accepted.lock().expect("lock").len(), 1);

    // A receiver that requires a client certificate.
    let seen = Arc::new(Seen::default());
    let port = serve(seen.clone(), Some(server_config(&pki, true))).await;
    let err = post(config(dir.path(), port, &pki.ca))
        .await
        .expect_err("no client cert");
    assert!(
        seen.accepted.lock().expect("lock").is_empty(),
        "accepted without a client certificate: {err}"
    );
    let with_cert = WebhookConfig {
        client_cert_file: Some(pki.client_cert.clone()),
        client_key_file: Some(pki.client_key.clone()),
        ..config(dir.path(), port, &pki.ca)
    };
    post(with_cert).await.expect("with the client certificate");
    assert_eq!(seen.accepted.lock().expect("lock").len(), 1);

    // https:// to a plain http receiver.
    let port = serve(Arc::new(Seen::default()), None).await;
    let err = post(config(dir.path(), port, &pki.ca))
        .await
        .expect_err("plain receiver");
    assert!(err.to_string().contains("plain (non-TLS)"), "{err}");

    // A CA file that is not there: named, with its key.
    let missing = dir.path().join("nowhere.pem");
    let err = post(config(dir.path(), port, &missing))
        .await
        .expect_err("missing CA");
    assert!(
        err.to_string()
            .contains(&format!("ca_file {}", missing.display())),
        "{err}"
    );
}
