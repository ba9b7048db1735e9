//! What an operator sees when MQTT's TLS or the broker says no, against a real mosquitto: a client that does not
//! trust the broker's CA delivers nothing, says why and what to do in its log, and delivers once the CA is given;
//! TLS spoken to a plain listener is named as such; an MQTT 5 broker that refuses a publish (ACL) keeps the event
//! in the outbox and the log names the topic and the reason. Its own test binary, because it captures this
//! process's logs (events_common::logs).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tclseg::events::{EventKind, MqttConfig, MqttSink, Outbox, Protocol};
use tokio::sync::watch;

mod events_common;
use events_common::broker::{subscribe, Broker};
use events_common::event;
use events_common::logs::Logs;
use events_common::pki::tls_broker;

/// Run a sink on this thread (so the thread-local subscriber sees it) until `done` (or 30 s), then stop it.
async fn run_until(cfg: MqttConfig, outbox: &Outbox, done: impl Fn() -> bool) {
    let (stop, stop_rx) = watch::channel(false);
    let (_cat, cat_rx) = watch::channel(Vec::new());
    let run = MqttSink::new(cfg, outbox.clone(), "mqtt").run(cat_rx, stop_rx);
    let stopper = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.send(true).expect("stop");
    };
    tokio::join!(run, stopper);
}

fn depth(outbox: &Outbox) -> u64 {
    outbox
        .counters("mqtt")
        .expect("counters")
        .depth
        .load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_broker_refusals_are_explained_and_lose_nothing() {
    let (logs, _guard) = Logs::capture();
    let dir = tempfile::tempdir().expect("tempdir");
    let (pki, broker, tls_port) = tls_broker(dir.path(), false);
    let got = subscribe(broker.port, "cam/events", None).await;
    let outbox = Outbox::open(&dir.path().join("events.redb"), 10, &["mqtt"]).expect("outbox");
    outbox
        .push(&[event("a", 0, EventKind::Start)])
        .expect("push");
    let cfg = MqttConfig {
        port: Some(tls_port),
        prefix: "cam".into(),
        ..MqttConfig::default()
    };

    // Trusting another CA: refused at the handshake, the reason and the remedy logged, the event kept.
    let untrusting = MqttConfig {
        ca_file: Some(pki.other_ca.clone()),
        ..cfg.clone()
    };
    run_until(untrusting, &outbox, || {
        logs.text().contains("MQTT connection failed")
    })
    .await;
    let text = logs.take();
    assert!(
        text.contains("MQTT connection failed") && text.contains("UnknownIssuer"),
        "{text}"
    );
    assert!(text.contains("set ca_file"), "no remedy in: {text}");
    assert_eq!(depth(&outbox), 1, "the event waits in the outbox");
    assert!(got.lock().expect("lock").is_empty());

    // Given the CA that signed the broker's certificate: delivered.
    let trusting = MqttConfig {
        ca_file: Some(pki.ca.clone()),
        ..cfg.clone()
    };
    run_until(trusting.clone(), &outbox, || depth(&outbox) == 0).await;
    assert_eq!(
        depth(&outbox),
        0,
        "delivered once the CA is given: {}",
        logs.take()
    );
    assert_eq!(got.lock().expect("lock").len(), 1);

    // TLS spoken to the plain listener: the log says that is what it probably is.
    outbox
        .push(&[event("a", 1, EventKind::Update)])
        .expect("push");
    logs.take();
    run_until(
        MqttConfig {
            port: Some(broker.port),
            ..trusting
        },
        &outbox,
        || logs.text().contains("MQTT connection failed"),
    )
    .await;
    let text = logs.take();
    assert!(
        text.contains("MQTT connection failed") && text.contains("plain (non-TLS) listener"),
        "{text}"
    );
    assert_eq!(depth(&outbox), 1);
    drop(broker);

    // MQTT 5 tells a refused publish apart from a delivered one: the ACL lets this client write its state topics
    // but not the event topic; the event stays and the log names the topic and the reason. Once the ACL allows
    // it (mosquitto rereads it on SIGHUP), the event is delivered.
    let acl_dir = tempfile::tempdir().expect("tempdir");
    let acl = acl_dir.path().join("acl");
    std::fs::write(
        &acl,
        "topic read #\ntopic write cam/availability\ntopic write cam/a/#\n",
    )
    .expect("acl");
    let broker = Broker::start_with(
        acl_dir.path(),
        None,
        &format!("acl_file {}\n", acl.display()),
    );
    let got = subscribe(broker.port, "cam/events", None).await;
    let v5 = MqttConfig {
        port: Some(broker.port),
        protocol: Protocol::V5,
        ..cfg
    };
    run_until(v5.clone(), &outbox, || {
        logs.text().contains("refused the publish")
    })
    .await;
    let text = logs.take();
    assert!(
        text.contains("refused the publish to cam/events") && text.contains("NotAuthorized"),
        "{text}\nbroker log: {}",
        std::fs::read_to_string(acl_dir.path().join("mosquitto.log")).unwrap_or_default()
    );
    assert_eq!(
        depth(&outbox),
        1,
        "a refused event is not taken as delivered"
    );
    assert!(got.lock().expect("lock").is_empty());

    std::fs::write(&acl, "topic read #\ntopic write cam/#\n").expect("acl");
    broker.reload();
    run_until(v5, &outbox, || depth(&outbox) == 0).await;
    assert_eq!(depth(&outbox), 0, "delivered once allowed: {}", logs.take());
    assert_eq!(got.lock().expect("lock").len(), 1);
}
