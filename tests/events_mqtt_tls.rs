//! MQTT 5 and MQTT over TLS against a real broker (Debian's mosquitto, with a TLS listener whose certificates the
//! `openssl` command made for the test): every event arrives in order with its retained state, Home Assistant
//! discovery and the last will, whichever the protocol and transport; the broker's own log shows which protocol
//! the sink spoke and on which listener. A client certificate gets in where one is required, and nothing gets in
//! without one.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tclseg::events::{Event, EventKind, MqttConfig, Outbox, Protocol};

mod events_common;
use events_common::broker::{run_sink, subscribe, Received};
use events_common::pki::tls_broker;
use events_common::{assert_in_order_per_pipeline, event};

type Messages = [(String, Vec<u8>, bool)];

/// The distinct events received (at least once: a duplicate is allowed and dropped by id), in arrival order.
fn events_of(all: &Messages) -> Vec<Event> {
    let mut seen = std::collections::HashSet::new();
    all.iter()
        .filter(|(t, _, _)| t == "cam/events")
        .filter_map(|(_, p, _)| serde_json::from_slice::<Event>(p).ok())
        .filter(|e| seen.insert(e.id.clone()))
        .collect()
}

/// Wait until `check` holds on what the subscriber received, or 30 s.
async fn wait_for(got: &Received, check: impl Fn(&Messages) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if check(&got.lock().expect("lock")) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Twenty events of two pipelines through `protocol` (over TLS when `tls`): all arrive in order per pipeline, with
/// the retained state, discovery and availability; a crash then leaves the last will. The broker's log must show
/// the protocol version the sink connected with (`p2` is 3.1.1, `p5` is 5).
async fn deliver(protocol: Protocol, tls: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pki, broker, tls_port) = tls_broker(dir.path(), false);
    let got = subscribe(broker.port, "#", None).await;
    let outbox = Outbox::open(&dir.path().join("events.redb"), 100, &["mqtt"]).expect("outbox");
    let cfg = MqttConfig {
        port: Some(if tls { tls_port } else { broker.port }),
        ca_file: tls.then(|| pki.ca.clone()),
        protocol: protocol.clone(),
        prefix: "cam".into(),
        client_id: "tclseg-tls-test".into(),
        discovery: true,
        ..MqttConfig::default()
    };
    assert_eq!(cfg.uses_tls(), tls, "a ca_file alone turns TLS on");
    let catalog = vec![("a".to_string(), vec!["person".to_string()])];
    let (_stop, task) = run_sink(cfg, &outbox, catalog);
    for n in 0..20u64 {
        let p = if n % 3 == 0 { "b" } else { "a" };
        outbox.push(&[event(p, n, EventKind::Start)]).expect("push");
    }
    let all_there = wait_for(&got, |all| events_of(all).len() >= 20).await;
    let events = events_of(&got.lock().expect("lock"));
    assert!(
        all_there,
        "{protocol:?} tls={tls}: {} of 20 arrived; broker log: {}",
        events.len(),
        std::fs::read_to_string(dir.path().join("mosquitto.log")).unwrap_or_default()
    );
    assert_in_order_per_pipeline(&events);
    let all = got.lock().expect("lock").clone();
    let has = |topic: &str, payload: &[u8]| all.iter().any(|(t, p, _)| t == topic && p == payload);
    assert!(has("cam/availability", b"online"));
    assert!(has("cam/a/person", b"ON") && has("cam/a/person/area", b"25.00"));
    assert!(
        all.iter()
            .any(|(t, _, _)| t.starts_with("homeassistant/binary_sensor/")),
        "discovery under {protocol:?}"
    );
    let c = outbox.counters("mqtt").expect("counters");
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.depth.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        c.depth.load(Ordering::Relaxed),
        0,
        "every event acknowledged"
    );

    // A crash (no DISCONNECT): the broker publishes the last will.
    task.abort();
    let will = wait_for(&got, |all| {
        all.iter()
            .rfind(|(t, _, _)| t == "cam/availability")
            .is_some_and(|(_, p, _)| p == b"offline")
    })
    .await;
    assert!(will, "no last will under {protocol:?} tls={tls}");

    let log = std::fs::read_to_string(dir.path().join("mosquitto.log")).unwrap_or_default();
    let version = if protocol == Protocol::V5 { "p5" } else { "p2" };
    let port = if tls { tls_port } else { broker.port };
    assert!(
        log.lines()
            .any(|l| l.contains("tclseg-tls-test") && l.contains(&format!("({version},"))),
        "the broker did not see a {version} client: {log}"
    );
    assert!(
        log.contains(&format!("on port {port}")),
        "the sink did not come in on port {port}: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_delivers_every_event_in_order() {
    deliver(Protocol::V5, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_over_tls_delivers_every_event_in_order() {
    deliver(Protocol::V311, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_over_tls_delivers_every_event_in_order() {
    deliver(Protocol::V5, true).await;
}

/// A broker that requires client certificates: without one nothing is delivered (the event waits in the outbox);
/// with the test CA's client certificate it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pki, broker, tls_port) = tls_broker(dir.path(), true);
    let got = subscribe(broker.port, "cam/events", None).await;
    let outbox = Outbox::open(&dir.path().join("events.redb"), 10, &["mqtt"]).expect("outbox");
    outbox
        .push(&[event("a", 1, EventKind::Start)])
        .expect("push");
    let base = MqttConfig {
        port: Some(tls_port),
        ca_file: Some(pki.ca.clone()),
        protocol: Protocol::V5,
        prefix: "cam".into(),
        ..MqttConfig::default()
    };
    let (stop, task) = run_sink(base.clone(), &outbox, Vec::new());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.send(true).expect("stop");
    task.await.expect("sink ends");
    assert!(
        events_of(&got.lock().expect("lock")).is_empty(),
        "delivered without a client certificate"
    );
    let c = outbox.counters("mqtt").expect("counters");
    assert_eq!(c.depth.load(Ordering::Relaxed), 1, "the event waits");

    let cfg = MqttConfig {
        client_cert_file: Some(pki.client_cert.clone()),
        client_key_file: Some(pki.client_key.clone()),
        ..base
    };
    let (stop, task) = run_sink(cfg, &outbox, Vec::new());
    assert!(
        wait_for(&got, |all| events_of(all).len() == 1).await,
        "not delivered with the client certificate: {}",
        std::fs::read_to_string(dir.path().join("mosquitto.log")).unwrap_or_default()
    );
    stop.send(true).expect("stop");
    task.await.expect("sink ends");
}
