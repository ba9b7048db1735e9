//! Webhook delivery to a local receiver that fails for a while: every event arrives once accepted, in order,
//! each with a valid HMAC-SHA256 signature over `timestamp.body`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use events_common::event;
use events_common::receiver::{serve, Receiver, SECRET};
use tclseg::events::webhook::WebhookError;
use tclseg::events::{Event, EventKind, Outbox, WebhookConfig, WebhookSink};
use tokio::sync::watch;

mod events_common;

fn config(dir: &std::path::Path, port: u16) -> WebhookConfig {
    std::fs::write(dir.join("secret"), format!("{SECRET}\n")).expect("secret");
    WebhookConfig {
        name: "alerts".into(),
        url: format!("http://127.0.0.1:{port}/hook?x=1"),
        secret_file: Some(dir.join("secret")),
        timeout_s: 2.0,
        max_backoff_s: 0.5,
        ca_file: None,
        client_cert_file: None,
        client_key_file: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_gets_every_event_signed_and_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = Arc::new(Receiver {
        fail_first: 3,
        ..Receiver::default()
    });
    let port = serve(receiver.clone(), None).await;
    let cfg = config(dir.path(), port);
    let outbox = Outbox::open(
        &dir.path().join("o.redb"),
        100,
        &[cfg.destination().as_str()],
    )
    .expect("outbox");
    let pushed: Vec<Event> = (0..6u64)
        .map(|n| {
            event(
                if n.is_multiple_of(2) { "a" } else { "b" },
                n,
                EventKind::Start,
            )
        })
        .collect();
    outbox.push(&pushed).expect("push");
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(WebhookSink::new(cfg.clone(), outbox.clone()).run(stop_rx));
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.accepted.lock().expect("lock").len() < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let accepted = receiver.accepted.lock().expect("lock").clone();
    assert_eq!(
        accepted,
        pushed.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        "all, once accepted, in order"
    );
    assert_eq!(
        receiver.requests.load(Ordering::Relaxed),
        9,
        "three failures retried"
    );
    assert_eq!(
        receiver.bad_signatures.load(Ordering::Relaxed),
        0,
        "every request verifies"
    );
    let c = outbox.counters(&cfg.destination()).expect("counters");
    assert_eq!(c.retried.load(Ordering::Relaxed), 3);
    assert_eq!(c.delivered.load(Ordering::Relaxed), 6);
    assert_eq!(c.depth.load(Ordering::Relaxed), 0);
    stop.send(true).expect("stop");
    task.await.expect("sink ends");
}

#[tokio::test]
async fn a_slow_receiver_times_out_and_other_schemes_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = Arc::new(Receiver {
        delay: Duration::from_secs(5),
        ..Receiver::default()
    });
    let port = serve(receiver, None).await;
    let outbox = Outbox::open(&dir.path().join("o.redb"), 10, &["webhook:alerts"]).expect("outbox");
    let mut cfg = config(dir.path(), port);
    cfg.timeout_s = 0.3;
    let sink = WebhookSink::new(cfg.clone(), outbox.clone());
    assert!(matches!(
        sink.post(&event("a", 0, EventKind::Start)).await,
        Err(WebhookError::Timeout)
    ));
    cfg.url = "ftp://example.invalid/hook".into();
    let sink = WebhookSink::new(cfg, outbox);
    assert!(matches!(
        sink.post(&event("a", 0, EventKind::Start)).await,
        Err(WebhookError::Url(_))
    ));
}

#[test]
fn webhooks_parse_with_defaults_and_refuse_unknown_keys() {
    let c: tclseg::events::EventsConfig =
        toml::from_str("[[webhooks]]\nname = \"alerts\"\nurl = \"http://127.0.0.1:9/h\"\n")
            .expect("parse");
    assert_eq!(
        (c.webhooks[0].timeout_s, c.webhooks[0].max_backoff_s),
        (10.0, 60.0)
    );
    assert!(toml::from_str::<tclseg::events::EventsConfig>(
        "[[webhooks]]\nname = \"a\"\nurl = \"u\"\nsecret = \"x\"\n"
    )
    .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_become_delivered_events_through_the_entry_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = Arc::new(Receiver::default());
    let port = serve(receiver.clone(), None).await;
    let config = tclseg::events::EventsConfig {
        on_s: 0.0,
        off_s: 0.0,
        webhooks: vec![config(dir.path(), port)],
        ..Default::default()
    };
    let events = tclseg::events::Events::open(config, dir.path()).expect("open");
    let frame = |at_ms: u64, fraction: f64| tclseg::events::FrameStats {
        pipeline: "door".into(),
        at_ms,
        queries: vec![tclseg::events::QueryStats {
            label: 1,
            name: "person".into(),
            fraction,
            bbox: None,
            mean_score: None,
        }],
        model: "hash".into(),
        ..Default::default()
    };
    assert_eq!(events.observe(&frame(0, 0.5)).expect("observe").len(), 1);
    assert!(events
        .observe(&frame(100, 0.5))
        .expect("observe")
        .is_empty());
    assert_eq!(events.observe(&frame(200, 0.0)).expect("observe").len(), 1);
    let (stop, stop_rx) = watch::channel(false);
    let (_catalog, catalog_rx) = watch::channel(Vec::new());
    let tasks = events.spawn(catalog_rx, stop_rx);
    let deadline = Instant::now() + Duration::from_secs(20);
    while receiver.accepted.lock().expect("lock").len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        receiver.accepted.lock().expect("lock").len(),
        2,
        "start and end delivered"
    );
    let counters = events.counters();
    assert_eq!(counters.len(), 1);
    assert_eq!(counters[0].0, "webhook:alerts");
    // Dropping the shutdown sender (the daemon going away) ends the deliveries too.
    drop(stop);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("ends when the shutdown sender is gone")
            .expect("task ends");
    }
}
