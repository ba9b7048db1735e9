//! MQTT credentials against a real broker: a wrong password delivers nothing and never reaches the logs. Its own
//! test binary, because it captures this process's logs with a thread-local subscriber, which other tests running
//! in parallel would race on tracing's per-callsite interest cache.

use std::time::Duration;

use tclseg::events::{EventKind, MqttConfig, MqttSink, Outbox};
use tokio::sync::watch;

mod events_common;
use events_common::broker::Broker;
use events_common::event;
use events_common::logs::Logs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_delivers_nothing_and_is_never_logged() {
    let (logs, _guard) = Logs::capture();
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), Some(("tclseg", "right-one")));
    std::fs::write(dir.path().join("password"), "Wr0ng-Secret\n").expect("password file");
    let outbox = Outbox::open(&dir.path().join("events.redb"), 10, &["mqtt"]).expect("outbox");
    outbox
        .push(&[event("a", 0, EventKind::Start)])
        .expect("push");
    let cfg = MqttConfig {
        username: Some("tclseg".into()),
        password_file: Some(dir.path().join("password")),
        port: Some(broker.port),
        prefix: "cam".into(),
        ..MqttConfig::default()
    };
    // The sink runs on this thread's runtime so the thread-local log subscriber sees it.
    let (stop, stop_rx) = watch::channel(false);
    let (_cat, cat_rx) = watch::channel(Vec::new());
    let run = MqttSink::new(cfg, outbox.clone(), "mqtt").run(cat_rx, stop_rx);
    let stopper = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.send(true).expect("stop");
    };
    tokio::join!(run, stopper);
    let counters = outbox.counters("mqtt").expect("counters");
    assert_eq!(
        counters.depth.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "refused: the event waits"
    );
    let text = logs.text();
    assert!(text.contains("MQTT connection failed"), "{text}");
    assert!(
        !text.contains("Wr0ng-Secret"),
        "the password leaked into the logs: {text}"
    );
}
