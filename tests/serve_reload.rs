//! Reloading `tclseg serve`: SIGHUP with a broken config is rejected and the old one keeps running; `POST
//! /reload` applies the diff (one pipeline added, one removed) without restarting the one left alone.

mod common;

use std::time::{Duration, Instant};

use common::config::{Config, Pipeline};
use common::daemon::{metric, Daemon, RtspServer};
use common::wait_until;

#[test]
fn reload_applies_the_diff_and_rejects_a_broken_config() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = RtspServer::options().streams(2).start();
    let camera = |name: &str, stream: usize, fps: &str| {
        Pipeline::new(
            name,
            &server.url(stream),
            &dir.path().join(format!("out-{name}")),
        )
        .retrying(3.0)
        .with(&format!("max_fps = {fps}"))
    };
    let keep = camera("keep", 0, "5");
    let gone = camera("gone", 1, "2");
    let config = Config::new()
        .inference("max_batch = 4\nmax_wait_ms = 20")
        .pipeline(keep.clone())
        .pipeline(gone.clone());
    let daemon = Daemon::start(dir.path(), &config);
    daemon.wait_ready();
    let frames = |p: &str| daemon.frames_out(p);
    wait_until("both pipelines run", Duration::from_secs(60), || {
        frames("keep") >= 2.0 && frames("gone") >= 1.0
    });

    // A broken config is rejected, logged, and the old one keeps running.
    let broken = gone.clone().with("max_fps = \"fast\"");
    daemon.rewrite(&config.clone().with_pipelines(&[keep.clone(), broken]));
    daemon.signal("HUP");
    wait_until("reload rejected", Duration::from_secs(30), || {
        daemon.metric("tclseg_reload_failures_total", "") >= 1.0
    });
    assert!(daemon.log_text().contains("reload rejected"));
    let before = frames("keep");
    wait_until("old config still running", Duration::from_secs(30), || {
        frames("keep") > before
    });

    // Add one pipeline, remove another, over HTTP; the untouched one is never restarted.
    let added = camera("added", 1, "2");
    daemon.rewrite(&config.with_pipelines(&[keep, added]));
    let mut samples = vec![(Instant::now(), frames("keep"))];
    let reply = daemon.post("/reload", None);
    assert_eq!(reply.code, 200, "{}", reply.body);
    let report: serde_json::Value = serde_json::from_str(&reply.body).expect("report json");
    assert_eq!(report["added"], serde_json::json!(["added"]));
    assert_eq!(report["removed"], serde_json::json!(["gone"]));
    wait_until("the added pipeline writes", Duration::from_secs(60), || {
        samples.push((Instant::now(), frames("keep")));
        frames("added") >= 1.0
    });
    let body = daemon.metrics();
    assert!(
        !body.contains("pipeline=\"gone\""),
        "removed pipeline still reported"
    );
    assert_eq!(
        metric(&body, "tclseg_reconnects_total", "pipeline=\"keep\""),
        0.0,
        "keep was restarted"
    );
    assert!(
        samples.last().expect("samples").1 > samples[0].1,
        "keep's counter stalled during the reload"
    );

    // A bad method is refused.
    assert_eq!(daemon.get("/reload").code, 405);
}
