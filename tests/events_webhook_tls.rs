//! Webhooks over https to a local TLS receiver (tokio-rustls + hyper, certificates made by `openssl`): every
//! event arrives once accepted, in order, with a valid signature, through a receiver that fails for a while; a
//! client that does not trust the receiver's CA, or lacks the client certificate the receiver requires, is refused
//! with a reason and a remedy; TLS spoken to a plain http receiver is named as such.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tclseg::events::webhook::WebhookError;
use tclseg::events::{EventKind, Outbox, WebhookConfig, WebhookSink};
use tokio::sync::watch;

mod events_common;
use events_common::event;
use events_common::pki::Pki;
use events_common::receiver::{serve, server_config, Receiver, SECRET};

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
    let seen = Arc::new(Receiver {
        fail_first: 3,
        ..Receiver::default()
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
        seen.bad_signatures.load(Ordering::Relaxed),
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
    let seen = Arc::new(Receiver::default());
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
    let seen = Arc::new(Receiver::default());
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
    let port = serve(Arc::new(Receiver::default()), None).await;
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
