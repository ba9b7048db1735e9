//! `tclseg serve` with an `[events]` table, against a real broker (Debian's mosquitto, installed by
//! scripts/setup): images dropped in a watched folder make a `start` event on `<prefix>/events`, a retained `ON`
//! on the query's state topic, a start in a zone and Home Assistant discovery configs; availability is `online` while the daemon
//! runs and `offline` after SIGTERM; `/metrics` and `/status` count the deliveries.

mod common;
mod events_common;

use std::path::Path;
use std::time::Duration;

use common::config::{Config, Pipeline};
use common::daemon::Daemon;
use common::staged::noisy_image_bytes;
use common::wait_until;
use events_common::broker::{subscribe_as, Broker, Received};
use tclseg::events::{Event, EventKind};

const PREFIX: &str = "tcltest";
const WAIT: Duration = Duration::from_secs(60);

fn messages(got: &Received, topic: &str) -> Vec<(String, bool)> {
    got.lock()
        .expect("lock")
        .iter()
        .filter(|(t, _, _)| t == topic)
        .map(|(_, p, retained)| (String::from_utf8_lossy(p).into_owned(), *retained))
        .collect()
}

fn events(got: &Received) -> Vec<Event> {
    got.lock()
        .expect("lock")
        .iter()
        .filter(|(t, _, _)| *t == format!("{PREFIX}/events"))
        .filter_map(|(_, p, _)| serde_json::from_slice(p).ok())
        .collect()
}

fn drop_image(inbox: &Path, name: &str) {
    let bytes = noisy_image_bytes(96, 64, image::ImageFormat::Png);
    // Written outside, then renamed in: the folder source never sees half a file.
    let tmp = inbox.with_file_name(format!("{name}.part"));
    std::fs::write(&tmp, bytes).expect("write image");
    std::fs::rename(&tmp, inbox.join(name)).expect("rename image");
}

#[test]
fn folder_images_become_mqtt_events_with_discovery_and_availability() {
    let dir = tempfile::tempdir().expect("tmp");
    let broker_dir = dir.path().join("broker");
    std::fs::create_dir_all(&broker_dir).expect("mkdir");
    let broker = Broker::start(&broker_dir, None);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let all = runtime.block_on(subscribe_as("all", true, broker.port, "#", None));

    let inbox = dir.path().join("inbox");
    let out = dir.path().join("out");
    // No background (bg_thresh 0) and no hysteresis: the first frame with any pixel of a query starts it.
    let cam = Pipeline::folder("cam", &inbox, &out).with("bg_thresh = 0.0\nfolder_settle_s = 0.2");
    let config = Config::new().pipeline(cam).tables(&format!(
        "[events]\nmin_area = 0.0\non_s = 0\n[events.zones.cam]\nwhole = [[0, 0], [96, 0], [96, 64], [0, 64]]\n[events.outbox]\npath = \"{}\"\n[events.mqtt]\nport = {}\nprefix = \"{PREFIX}\"\nclient_id = \"tclseg-serve-test\"\ndiscovery = true\n",
        dir.path().join("state/events.redb").display(),
        broker.port
    ));
    std::fs::create_dir_all(dir.path().join("state")).expect("mkdir");
    let mut daemon = Daemon::start(dir.path(), &config);
    daemon.wait_ready();
    let availability = format!("{PREFIX}/availability");
    wait_until("availability online", WAIT, || {
        messages(&all, &availability)
            .iter()
            .any(|(p, _)| p == "online")
    });
    wait_until("Home Assistant discovery configs", WAIT, || {
        all.lock().expect("lock").iter().any(|(t, p, _)| {
            t.starts_with("homeassistant/binary_sensor/")
                && t.ends_with("/config")
                && String::from_utf8_lossy(p).contains("cam")
        })
    });

    drop_image(&inbox, "a.png");
    wait_until("a start event", WAIT, || {
        events(&all).iter().any(|e| e.kind == EventKind::Start)
    });
    let start = events(&all)
        .into_iter()
        .find(|e| e.kind == EventKind::Start)
        .expect("start");
    assert_eq!(start.pipeline, "cam");
    assert!(
        ["red square", "blue circle"].contains(&start.query.as_str()),
        "{start:?}"
    );
    assert!(start.area > 0.0 && start.bbox.is_some(), "{start:?}");
    assert!(!start.model.is_empty());
    let sidecar = start.outputs.clone().expect("the sidecar's path");
    // The zone (the whole image) is measured on the label map, which the output thread passes only for it.
    wait_until("a start event in the zone", WAIT, || {
        events(&all)
            .iter()
            .any(|e| e.kind == EventKind::Start && e.zone.as_deref() == Some("whole"))
    });
    assert!(
        sidecar.ends_with(".json") && Path::new(&sidecar).is_file(),
        "{sidecar}"
    );

    // A fresh subscriber gets the query's state as a retained ON.
    let state_topic = format!("{PREFIX}/cam/{}", start.query);
    let fresh = runtime.block_on(subscribe_as("fresh", true, broker.port, &state_topic, None));
    wait_until("a retained ON", WAIT, || {
        messages(&fresh, &state_topic).contains(&("ON".to_string(), true))
    });

    wait_until("the delivered counter", WAIT, || {
        daemon.metric("tclseg_events_delivered_total", "destination=\"mqtt\"") > 0.0
    });
    let metrics = daemon.metrics();
    assert!(
        metrics.contains("tclseg_events_outbox_depth{destination=\"mqtt\"}"),
        "{metrics}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&daemon.get("/status").body).expect("status JSON");
    let mqtt = &status["events"][0];
    assert_eq!(mqtt["destination"], "mqtt", "{status}");
    assert!(mqtt["delivered"].as_u64().unwrap_or(0) > 0, "{status}");

    let exit = daemon.terminate(WAIT);
    assert!(exit.success(), "{exit:?}\n{}", daemon.log_text());
    wait_until("availability offline", WAIT, || {
        messages(&all, &availability)
            .last()
            .is_some_and(|(p, _)| p == "offline")
    });
    drop(broker);
}

#[test]
fn without_events_nothing_of_them_shows() {
    let dir = tempfile::tempdir().expect("tmp");
    let cam = Pipeline::folder("cam", &dir.path().join("inbox"), &dir.path().join("out"));
    let config = Config::new().pipeline(cam);
    let mut daemon = Daemon::start(dir.path(), &config);
    daemon.wait_ready();
    assert!(!daemon.metrics().contains("tclseg_events_"));
    let status: serde_json::Value =
        serde_json::from_str(&daemon.get("/status").body).expect("status JSON");
    assert_eq!(status["events"], serde_json::json!([]), "{status}");
    assert!(!dir.path().join("events.redb").exists());
    assert!(daemon.terminate(WAIT).success());
}
