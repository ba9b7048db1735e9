//! `tclseg serve` delivering events over MQTT through outages, against a real broker (Debian's mosquitto) and a
//! persistent-session subscriber (QoS 1) that the broker queues for: the broker stopped in the middle of a run
//! and started again on its port (every event made meanwhile arrives after it returns), and the daemon stopped
//! with events still in its outbox (they are delivered, with the same ids, by the next start). What must arrive
//! is worked out from the sidecars the daemon wrote (`events_common::expect`).

mod common;
mod events_common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::config::{Config, Pipeline};
use common::daemon::Daemon;
use common::staged::noisy_image_bytes;
use common::wait_until;
use events_common::broker::{subscribe, Broker, Received};
use events_common::expect::{
    assert_in_order, assert_same_events, dedup, expected, of_pipeline, sequences, sidecar_frames,
    Expected, ZERO_HYSTERESIS,
};
use tclseg::events::{Event, Outbox, MQTT_DESTINATION};

const PREFIX: &str = "outage";
const WAIT: Duration = Duration::from_secs(120);
const PIPELINES: [&str; 2] = ["a", "b"];

/// The event messages the subscriber got, in arrival order (repeats included).
fn received(got: &Received) -> Vec<Event> {
    let topic = format!("{PREFIX}/events");
    got.lock()
        .expect("lock")
        .iter()
        .filter(|(t, _, _)| *t == topic)
        .map(|(_, p, _)| serde_json::from_slice(p).expect("event JSON"))
        .collect()
}

/// Images `from..to` into the inbox, each a little wider than the last so the frames differ.
fn drop_images(inbox: &Path, from: u32, to: u32) {
    for k in from..to {
        let bytes = noisy_image_bytes(80 + 4 * k, 60, image::ImageFormat::Png);
        let tmp = inbox.with_file_name(format!(".img-{k:03}.png"));
        std::fs::write(&tmp, bytes).expect("write image");
        std::fs::rename(&tmp, inbox.join(format!("img-{k:03}.png"))).expect("rename image");
    }
}

/// Fields drop in this order: the subscriber's runtime, then the broker, then the folder they use.
struct Setup {
    _runtime: tokio::runtime::Runtime,
    subscriber: Received,
    broker: Broker,
    config: Config,
    dir: tempfile::TempDir,
}

impl Setup {
    /// A broker, a subscriber to the event topic, and the config of two folder pipelines with MQTT events to it.
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tmp");
        let broker_dir = dir.path().join("broker");
        std::fs::create_dir_all(&broker_dir).expect("mkdir");
        let broker = Broker::start(&broker_dir, None);
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let subscriber =
            runtime.block_on(subscribe(broker.port, &format!("{PREFIX}/events"), None));
        let mut config = Config::new();
        for name in PIPELINES {
            let p = Pipeline::folder(
                name,
                &dir.path().join(format!("in-{name}")),
                &dir.path().join(name),
            )
            .with("bg_thresh = 0.0\nfolder_settle_s = 0.2");
            config = config.pipeline(p);
        }
        let config = config.tables(&format!(
            "[events]\n{ZERO_HYSTERESIS}[events.outbox]\npath = \"{}\"\n[events.mqtt]\nport = {}\nprefix = \"{PREFIX}\"\nclient_id = \"tclseg-outage-test\"\n",
            Setup::outbox_path(dir.path()).display(),
            broker.port
        ));
        Setup {
            dir,
            broker,
            _runtime: runtime,
            subscriber,
            config,
        }
    }

    fn outbox_path(dir: &Path) -> PathBuf {
        dir.join("events.redb")
    }

    fn inbox(&self, pipeline: &str) -> PathBuf {
        self.dir.path().join(format!("in-{pipeline}"))
    }

    /// The events each pipeline's sidecars call for, in order, and the frame sequence of each sidecar.
    fn expected(
        &self,
    ) -> Vec<(
        String,
        Vec<Expected>,
        std::collections::BTreeMap<String, u64>,
    )> {
        PIPELINES
            .iter()
            .map(|p| {
                let frames = sidecar_frames(&self.dir.path().join(p));
                (p.to_string(), expected(&frames), sequences(&frames))
            })
            .collect()
    }

    /// The events the sidecars call for on each pipeline's last `n` frames.
    fn expected_of_last_frames(&self, n: usize) -> Vec<Expected> {
        let mut out = Vec::new();
        for p in PIPELINES {
            let frames = sidecar_frames(&self.dir.path().join(p));
            let last: Vec<String> = frames
                .iter()
                .rev()
                .take(n)
                .map(|f| f.path.clone())
                .collect();
            out.extend(
                expected(&frames)
                    .into_iter()
                    .filter(|e| e.outputs.as_ref().is_some_and(|o| last.contains(o))),
            );
        }
        out
    }

    /// How many events the sidecars call for in all.
    fn expected_count(&self) -> usize {
        self.expected().iter().map(|(_, e, _)| e.len()).sum()
    }

    /// Waits until the subscriber holds every event the sidecars call for, then checks them: nothing else, in
    /// order per pipeline. Returns them, deduplicated.
    fn assert_all_arrived(&self) -> Vec<Event> {
        let want = self.expected_count();
        wait_until("every event at the subscriber", WAIT, || {
            dedup(&received(&self.subscriber)).len() >= want
        });
        let got = dedup(&received(&self.subscriber));
        assert_eq!(got.len(), want, "more events than the sidecars call for");
        for (pipeline, want, seq) in self.expected() {
            let mine = of_pipeline(&got, &pipeline);
            assert_in_order(&mine, &seq);
            assert_same_events(&mine, &want);
        }
        got
    }
}

fn wait_frames(daemon: &Daemon, n: f64) {
    let start = std::time::Instant::now();
    while start.elapsed() < WAIT {
        if PIPELINES.iter().all(|p| daemon.frames_out(p) >= n) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "timed out waiting for {n} frames out of each pipeline: {:?}\n{}",
        PIPELINES.map(|p| daemon.frames_out(p)),
        daemon.log_text()
    );
}

#[test]
fn events_made_while_the_broker_is_down_arrive_after_it_returns() {
    let mut s = Setup::new();
    let mut daemon = Daemon::start(s.dir.path(), &s.config);
    daemon.wait_ready();
    for p in PIPELINES {
        drop_images(&s.inbox(p), 0, 3);
    }
    // Stopped as soon as deliveries are under way, while the rest of the first images are still being segmented
    // and published: the outage cuts through events in flight.
    wait_until("a first event at the subscriber", WAIT, || {
        !received(&s.subscriber).is_empty()
    });
    s.broker.stop();
    for p in PIPELINES {
        drop_images(&s.inbox(p), 3, 6);
    }
    wait_frames(&daemon, 6.0);
    let before = dedup(&received(&s.subscriber));
    let while_down = s.expected_of_last_frames(3);
    assert!(!while_down.is_empty());
    assert!(
        before
            .iter()
            .all(|e| !while_down.contains(&Expected::of(e))),
        "an event of a frame segmented while the broker was down arrived before it returned"
    );
    // Those at least wait in the outbox: no broker acknowledged them.
    let depth = daemon.delivery(MQTT_DESTINATION, "depth").unwrap_or(0);
    assert!(
        depth >= while_down.len() as u64,
        "depth {depth}, {} made while down",
        while_down.len()
    );

    s.broker.restart();
    let all = s.assert_all_arrived();
    let arrived: Vec<Expected> = all.iter().map(Expected::of).collect();
    assert!(while_down.iter().all(|w| arrived.contains(w)));
    wait_until("the outbox drained", WAIT, || {
        daemon.delivery(MQTT_DESTINATION, "depth") == Some(0)
    });
    assert!(daemon.delivery(MQTT_DESTINATION, "delivered") >= Some(all.len() as u64));
    let exit = daemon.terminate(WAIT);
    assert!(exit.success(), "{exit:?}\n{}", daemon.log_text());
}

#[test]
fn events_left_in_the_outbox_by_a_stop_go_out_after_the_next_start() {
    let mut s = Setup::new();
    // The subscriber's session outlives the broker's restart: the broker queues for it once it is back.
    s.broker.stop();
    for p in PIPELINES {
        drop_images(&s.inbox(p), 0, 4);
    }
    let mut daemon = Daemon::start(s.dir.path(), &s.config);
    daemon.wait_ready();
    wait_frames(&daemon, 4.0);
    let want = s.expected_count() as u64;
    assert!(want > 0);
    assert_eq!(daemon.delivery(MQTT_DESTINATION, "depth"), Some(want));
    let exit = daemon.terminate(WAIT);
    assert!(exit.success(), "{exit:?}\n{}", daemon.log_text());
    drop(daemon);

    // What the stopped daemon left, read from its outbox file as the next start will.
    let queued: Vec<Event> = {
        let outbox = Outbox::open(
            &Setup::outbox_path(s.dir.path()),
            100_000,
            &[MQTT_DESTINATION],
        )
        .expect("the outbox reopens");
        outbox
            .pending(MQTT_DESTINATION, None, 100_000)
            .expect("pending")
            .into_iter()
            .map(|(_, e)| e)
            .collect()
    };
    assert_eq!(queued.len() as u64, want, "every event waits in the outbox");
    // Nothing for the next start to read again: only the queued events may arrive.
    for p in PIPELINES {
        std::fs::remove_dir_all(s.inbox(p)).expect("empty the inbox");
        std::fs::create_dir_all(s.inbox(p)).expect("inbox");
    }

    s.broker.restart();
    let mut daemon = Daemon::start(s.dir.path(), &s.config);
    daemon.wait_ready();
    let got = s.assert_all_arrived();
    for p in PIPELINES {
        let ids = |v: &[Event]| {
            of_pipeline(v, p)
                .into_iter()
                .map(|e| e.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ids(&got),
            ids(&queued),
            "pipeline {p}: the queued events, same ids, same order"
        );
    }
    wait_until("the outbox drained", WAIT, || {
        daemon.delivery(MQTT_DESTINATION, "depth") == Some(0)
    });
    assert_eq!(daemon.delivery(MQTT_DESTINATION, "delivered"), Some(want));
    assert_eq!(daemon.frames_out("a") + daemon.frames_out("b"), 0.0);
    let exit = daemon.terminate(WAIT);
    assert!(exit.success(), "{exit:?}\n{}", daemon.log_text());
}
