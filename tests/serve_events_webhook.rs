//! `tclseg serve` posting events to a webhook receiver run by the test, which answers 500 until the test lets it
//! answer 200: every event the frames call for arrives once accepted, in order per pipeline, each request signed
//! (HMAC-SHA256 over `<timestamp>.<body>`, checked by `events_common::receiver` with the hmac crate); `/metrics`
//! counts the retries and `/status` shows the outbox filling, then draining to 0. Two pipelines read the same
//! video file, one writing JSON sidecars and one only label maps: the events of the one without sidecars (whose
//! statistics skip the sidecar's RLE) must say what the other's say.

mod common;
mod events_common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::config::{Config, Pipeline};
use common::daemon::Daemon;
use common::video::write_video;
use common::wait_until;
use events_common::expect::{
    assert_in_order, assert_same_events, dedup, expected, of_pipeline, sequences, sidecar_frames,
    ZERO_HYSTERESIS,
};
use events_common::receiver::{serve, Receiver, SECRET};
use tclseg::events::Event;

const WAIT: Duration = Duration::from_secs(120);
const FRAMES: u64 = 10;
const DESTINATION: &str = "webhook:alerts";

#[test]
fn a_receiver_failing_then_recovering_gets_every_event_signed_and_in_order() {
    let dir = tempfile::tempdir().expect("tmp");
    let clip = dir.path().join("clip.mp4");
    write_video(&clip, FRAMES as u32);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let hook = Arc::new(Receiver::default());
    hook.failing.store(true, Ordering::SeqCst);
    let port = runtime.block_on(serve(hook.clone(), None));
    let secret = dir.path().join("webhook.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).expect("secret");

    let source = format!("file://{}", clip.display());
    let (out_a, out_b) = (dir.path().join("a"), dir.path().join("b"));
    // No background, so every pixel belongs to a query and something is seen in every frame.
    let a = Pipeline::new("a", &source, &out_a).with("bg_thresh = 0.0");
    let b = Pipeline::new("b", &source, &out_b)
        .with("bg_thresh = 0.0")
        .output("json = false\nlabels = true");
    // One frame per inference run: both pipelines' frames go through the model alike.
    let config = Config::new()
        .inference("max_batch = 1")
        .pipeline(a)
        .pipeline(b)
        .tables(&format!(
            "[events]\n{ZERO_HYSTERESIS}[events.outbox]\npath = \"{}\"\n[[events.webhooks]]\nname = \"alerts\"\nurl = \"http://127.0.0.1:{port}/hooks/tclseg\"\nsecret_file = \"{}\"\ntimeout_s = 5\nmax_backoff_s = 0.5\n",
            dir.path().join("events.redb").display(),
            secret.display()
        ));
    let mut daemon = Daemon::start(dir.path(), &config);
    daemon.wait_ready();
    wait_until("every frame of both pipelines", WAIT, || {
        daemon.frames_out("a") >= FRAMES as f64 && daemon.frames_out("b") >= FRAMES as f64
    });
    wait_until("a few refused deliveries", WAIT, || {
        hook.requests.load(Ordering::SeqCst) >= 3
    });

    let frames = sidecar_frames(&out_a);
    assert_eq!(frames.len() as u64, FRAMES, "sidecars of pipeline a");
    assert!(
        sidecar_frames(&out_b).is_empty(),
        "pipeline b writes no sidecar"
    );
    let want_a = expected(&frames);
    assert!(!want_a.is_empty());
    let total = 2 * want_a.len() as u64;
    // Nothing accepted yet: every event of both pipelines waits in the outbox.
    assert_eq!(
        daemon.delivery(DESTINATION, "depth"),
        Some(total),
        "{}",
        daemon.get("/status").body
    );
    assert!(hook.events.lock().expect("lock").is_empty());

    hook.failing.store(false, Ordering::SeqCst);
    wait_until("the outbox drained", WAIT, || {
        daemon.delivery(DESTINATION, "depth") == Some(0)
    });
    assert_eq!(daemon.delivery(DESTINATION, "delivered"), Some(total));
    let retried = daemon.metric(
        "tclseg_events_retried_total",
        &format!("destination=\"{DESTINATION}\""),
    );
    assert!(retried >= 3.0, "{}", daemon.metrics());
    assert_eq!(
        daemon.metric(
            "tclseg_events_dropped_total",
            &format!("destination=\"{DESTINATION}\"")
        ),
        0.0
    );

    // Every request, refused or accepted, carried a valid signature and the body's event id.
    assert_eq!(hook.bad_signatures.load(Ordering::SeqCst), 0);
    let accepted: Vec<Event> = hook.events.lock().expect("lock").clone();
    assert!(hook.requests.load(Ordering::SeqCst) > accepted.len());
    let got = dedup(&accepted);
    assert_eq!(got.len() as u64, total);
    let (got_a, got_b) = (of_pipeline(&got, "a"), of_pipeline(&got, "b"));
    assert_in_order(&got_a, &sequences(&frames));
    assert_in_order(&got_b, &sequences(&[]));
    assert_same_events(&got_a, &want_a);
    // The same frames through the same model: pipeline b (statistics without a sidecar) reports what a reports.
    let says = |e: &Event| (e.query.clone(), e.kind, e.area, e.bbox, e.mean_score);
    assert_eq!(
        got_b.iter().map(says).collect::<Vec<_>>(),
        got_a.iter().map(says).collect::<Vec<_>>()
    );
    assert!(got_b.iter().all(|e| e.outputs.is_none()));

    let exit = daemon.terminate(WAIT);
    assert!(exit.success(), "{exit:?}\n{}", daemon.log_text());
}
