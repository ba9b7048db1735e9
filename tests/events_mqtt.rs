//! MQTT delivery against a real broker (Debian's mosquitto, installed by scripts/setup): events survive a broker
//! outage and a restart of the outbox, arrive in order per pipeline, and Home Assistant discovery follows the
//! documented schema.

use std::time::{Duration, Instant};

use tclseg::events::{Event, EventKind, MqttConfig, Outbox};

mod events_common;
use events_common::broker::{run_sink, subscribe, Broker, Received};
use events_common::{assert_in_order_per_pipeline, event};

fn received_events(got: &Received) -> Vec<Event> {
    got.lock()
        .expect("lock")
        .iter()
        .filter(|(t, _, _)| t == "cam/events")
        .filter_map(|(_, p, _)| serde_json::from_slice(p).ok())
        .collect()
}

/// Wait until `want` distinct event ids have arrived; duplicates are allowed (at least once).
async fn wait_for(got: &Received, want: usize) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut seen = std::collections::HashSet::new();
        let events: Vec<Event> = received_events(got)
            .into_iter()
            .filter(|e| seen.insert(e.id.clone()))
            .collect();
        if events.len() >= want || Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn config(port: u16) -> MqttConfig {
    MqttConfig {
        port: Some(port),
        prefix: "cam".into(),
        client_id: "tclseg-test".into(),
        ..MqttConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_survives_a_broker_outage_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(dir.path(), None);
    let got = subscribe(broker.port, "cam/#", None).await;
    let outbox = Outbox::open(&dir.path().join("events.redb"), 1000, &["mqtt"]).expect("outbox");
    let (stop, task) = run_sink(config(broker.port), &outbox, Vec::new());
    let pipeline = |n: u64| if n.is_multiple_of(3) { "b" } else { "a" };
    for n in 0..5 {
        outbox
            .push(&[event(pipeline(n), n, EventKind::Start)])
            .expect("push");
    }
    assert_eq!(
        wait_for(&got, 5).await.len(),
        5,
        "delivered while the broker is up"
    );

    broker.stop();
    for n in 5..25 {
        outbox
            .push(&[event(pipeline(n), n, EventKind::Update)])
            .expect("push");
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let counters = outbox.counters("mqtt").expect("counters");
    assert!(
        counters.depth.load(std::sync::atomic::Ordering::Relaxed) >= 20,
        "events wait in the outbox"
    );
    broker.restart();

    let events = wait_for(&got, 25).await;
    assert_eq!(
        events.len(),
        25,
        "every event arrives after the broker returns; outbox depth {}, got {:?}, broker log {}",
        counters.depth.load(std::sync::atomic::Ordering::Relaxed),
        events.iter().map(|e| e.at_ms).collect::<Vec<_>>(),
        std::fs::read_to_string(dir.path().join("mosquitto.log")).unwrap_or_default()
    );
    assert_in_order_per_pipeline(&events);
    // Retained state: the availability and the query's state topic.
    let all = got.lock().expect("lock").clone();
    assert!(all
        .iter()
        .any(|(t, p, _)| t == "cam/availability" && p == b"online"));
    assert!(all
        .iter()
        .any(|(t, p, _)| t == "cam/a/person" && p == b"ON"));
    assert!(all
        .iter()
        .any(|(t, p, _)| t == "cam/a/person/area" && p == b"25.00"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while counters.depth.load(std::sync::atomic::Ordering::Relaxed) > 0 && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(counters.depth.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(
        counters
            .delivered
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 25
    );
    stop.send(true).expect("stop");
    task.await.expect("sink ends");
}

/// The outage test's subscriber keeps its session across the broker's restart only if the broker saved it: a
/// persistent client that is away while the broker restarts still gets what was published meanwhile. (Run as root,
/// mosquitto used to drop to a user that could not write the temp dir, and lost the session.)
#[test]
fn the_test_broker_keeps_an_absent_subscribers_queue_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(dir.path(), None);
    let port = broker.port.to_string();
    let client = |tool: &str, args: &[&str]| {
        let out = std::process::Command::new(tool)
            .args(["-p", &port, "-q", "1", "-t", "probe/t"])
            .args(args)
            .output()
            .expect("mosquitto clients (scripts/setup installs them)");
        assert!(out.status.success(), "{tool} {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // Subscribe with a persistent session, then leave.
    client("mosquitto_sub", &["-c", "-i", "probe", "-E"]);
    broker.stop();
    broker.restart();
    client("mosquitto_pub", &["-m", "queued"]);
    assert_eq!(
        client(
            "mosquitto_sub",
            &["-c", "-i", "probe", "-C", "1", "-W", "10"]
        ),
        "queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_left_in_the_outbox_are_delivered_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("events.redb");
    let mut broker = Broker::start(dir.path(), None);
    broker.stop();
    {
        // The daemon's first life: the broker is down, events pile up, then the daemon stops.
        let outbox = Outbox::open(&path, 1000, &["mqtt"]).expect("outbox");
        let (stop, task) = run_sink(config(broker.port), &outbox, Vec::new());
        for n in 0..10u64 {
            let p = if n.is_multiple_of(2) { "a" } else { "b" };
            outbox.push(&[event(p, n, EventKind::Start)]).expect("push");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.send(true).expect("stop");
        task.await.expect("sink ends");
    }
    broker.restart();
    let got = subscribe(broker.port, "cam/events", None).await;
    // The second life: the store is reopened and its events go out.
    let outbox = Outbox::open(&path, 1000, &["mqtt"]).expect("reopen");
    let (stop, task) = run_sink(config(broker.port), &outbox, Vec::new());
    let events = wait_for(&got, 10).await;
    assert_eq!(events.len(), 10);
    assert_in_order_per_pipeline(&events);
    stop.send(true).expect("stop");
    task.await.expect("sink ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_discovery_with_credentials_and_a_last_will() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), Some(("tclseg", "s3cret")));
    std::fs::write(dir.path().join("password"), "s3cret\n").expect("password file");
    let got = subscribe(broker.port, "#", Some(("tclseg", "s3cret"))).await;
    let outbox = Outbox::open(&dir.path().join("events.redb"), 10, &["mqtt"]).expect("outbox");
    let cfg = MqttConfig {
        username: Some("tclseg".into()),
        password_file: Some(dir.path().join("password")),
        discovery: true,
        ..config(broker.port)
    };
    let catalog = vec![(
        "door".to_string(),
        vec!["person".to_string(), "red car".to_string()],
    )];
    let (_stop, task) = run_sink(cfg, &outbox, catalog);
    let deadline = Instant::now() + Duration::from_secs(20);
    let configs = loop {
        let c: Vec<_> = got
            .lock()
            .expect("lock")
            .iter()
            .filter(|(t, _, _)| t.starts_with("homeassistant/"))
            .cloned()
            .collect();
        if c.len() >= 4 || Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        configs.len(),
        4,
        "a binary_sensor and a sensor per query: {configs:?}"
    );
    let mut ids = std::collections::HashSet::new();
    for (topic, payload, _) in &configs {
        let v: serde_json::Value = serde_json::from_slice(payload).expect("json");
        let id = v["unique_id"].as_str().expect("unique_id");
        assert!(
            id.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "{id}"
        );
        assert!(ids.insert(id.to_string()), "unique ids differ");
        let component = if topic.starts_with("homeassistant/binary_sensor/") {
            "binary_sensor"
        } else {
            "sensor"
        };
        assert_eq!(topic, &format!("homeassistant/{component}/{id}/config"));
        assert_eq!(v["availability_topic"], "cam/availability");
        assert_eq!(
            (
                v["payload_available"].as_str(),
                v["payload_not_available"].as_str()
            ),
            (Some("online"), Some("offline"))
        );
        assert!(v["device"]["identifiers"]
            .as_array()
            .is_some_and(|a| !a.is_empty()));
        assert!(v["device"]["name"].is_string() && v["name"].is_string());
        let state = v["state_topic"].as_str().expect("state_topic");
        if component == "binary_sensor" {
            assert!(
                state == "cam/door/person" || state == "cam/door/red car",
                "{state}"
            );
            assert_eq!(
                (v["payload_on"].as_str(), v["payload_off"].as_str()),
                (Some("ON"), Some("OFF"))
            );
        } else {
            assert!(state.ends_with("/area"));
            assert_eq!(v["unit_of_measurement"], "%");
        }
    }
    // A crash (no DISCONNECT): the broker publishes the last will.
    task.abort();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let last = got
            .lock()
            .expect("lock")
            .iter()
            .filter(|(t, _, _)| t == "cam/availability")
            .map(|(_, p, _)| p.clone())
            .next_back();
        if last.as_deref() == Some(b"offline".as_slice()) {
            break;
        }
        assert!(Instant::now() < deadline, "no last will: {last:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
