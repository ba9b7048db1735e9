//! A local webhook receiver on a loopback port, plain http or https (tokio-rustls with the test certificates of
//! [`super::pki`]), that verifies each signature and can fail or stall for a while.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Sha256;
use tclseg::events::Event;

use super::pki::Pki;

/// The secret the receiver verifies signatures with; the tests write it into the webhook's `secret_file`.
pub const SECRET: &str = "hush";

/// What the receiver does and saw: requests, accepted event ids (in order), requests whose signature (HMAC-SHA256
/// over `timestamp.body`, computed here with the hmac crate) or event id did not check out.
#[derive(Default)]
pub struct Receiver {
    pub requests: AtomicUsize,
    /// Answer 500 to this many requests first.
    pub fail_first: usize,
    /// Delay every answer by this much.
    pub delay: Duration,
    pub accepted: Mutex<Vec<String>>,
    pub bad_signatures: AtomicUsize,
}

async fn answer(
    r: Arc<Receiver>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (timestamp, signature, id) = (
        header("x-tclseg-timestamp"),
        header("x-tclseg-signature"),
        header("x-tclseg-event-id"),
    );
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(&body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let event: Option<Event> = serde_json::from_slice(&body).ok();
    if expected != signature || event.as_ref().map(|e| e.id.as_str()) != Some(id.as_str()) {
        r.bad_signatures.fetch_add(1, Ordering::Relaxed);
    }
    tokio::time::sleep(r.delay).await;
    let n = r.requests.fetch_add(1, Ordering::Relaxed);
    let status = if n < r.fail_first { 500 } else { 200 };
    if status == 200 {
        r.accepted.lock().expect("lock").push(id);
    }
    let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
    Ok(resp)
}

/// Serve `r` on a loopback port (returned): over TLS with `tls`, plain http without.
pub async fn serve(r: Arc<Receiver>, tls: Option<Arc<rustls::ServerConfig>>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (r, acceptor) = (r.clone(), acceptor.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| answer(r.clone(), req));
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

/// The https receiver's TLS config: the server certificate, and with `client_ca` only clients the test CA signed.
pub fn server_config(pki: &Pki, client_ca: bool) -> Arc<rustls::ServerConfig> {
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
