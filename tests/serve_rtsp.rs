//! `tclseg serve` on RTSP cameras: the real binary against a real RTSP server process (examples/rtsp_server.rs,
//! built by `cargo test`). One camera beside one that is unreachable: what /metrics, /status and the outputs
//! show, that the password shows nowhere, and a clean stop (notify messages, a whole overlay video). Faults are
//! real too: the server is SIGKILLed and restarted, SIGSTOPped and continued.

mod common;

use std::path::Path;
use std::time::Duration;

use common::config::{Config, Pipeline};
use common::daemon::{metric, Daemon, RtspServer};
use common::video::count_video_frames;
use common::{files_with_suffix, free_port, image_size, wait_until};

/// A ready daemon with two cameras: "cam" on the server (10 fps capped at 5, every output kind, into `out`) and
/// "dead", whose port nothing listens on. Returns once "cam" has written 5 frames.
fn camera_beside_a_dead_one(dir: &Path, server: &RtspServer, out: &Path) -> Daemon {
    let cam = Pipeline::new("cam", &server.url(0), out)
        .retrying(3.0)
        .with("max_fps = 5")
        .output("jsonl = true\noverlay = \"jpg\"\nvideo = \"overlay.mkv\"");
    let dead = format!("rtsp://127.0.0.1:{}/none", free_port());
    let config = Config::new()
        .inference("max_batch = 4\nmax_wait_ms = 20")
        .pipeline(cam)
        .pipeline(Pipeline::new("dead", &dead, &dir.join("out-dead")).retrying(3.0));
    let daemon = Daemon::start(dir, &config);
    daemon.wait_ready();
    wait_until("5 frames written", Duration::from_secs(60), || {
        daemon.frames_out("cam") >= 5.0
    });
    daemon
}

#[test]
fn a_camera_beside_an_unreachable_one_is_measured_served_and_written() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = RtspServer::start();
    let out = dir.path().join("out-cam");
    let daemon = camera_beside_a_dead_one(dir.path(), &server, &out);
    let (metrics, status) = metrics_and_http(&daemon);
    let jsonl = outputs(&out);
    // Credentials never reach logs, metrics, status or outputs.
    for text in [daemon.log_text(), metrics, status, jsonl] {
        assert!(!text.contains("hunter2"), "credential leaked: {text}");
    }
}

#[test]
fn sigterm_notifies_stops_cleanly_and_the_camera_video_holds_every_frame_written() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = RtspServer::start();
    let out = dir.path().join("out-cam");
    let mut daemon = camera_beside_a_dead_one(dir.path(), &server, &out);
    let written_before_stop = daemon.frames_out("cam");
    let exit = daemon.terminate(Duration::from_secs(30));
    assert!(
        exit.success(),
        "exit status {exit:?}\n{}",
        daemon.log_text()
    );
    let notes = daemon.notifications().join("\n");
    assert!(notes.contains("READY=1"), "{notes}");
    assert!(notes.contains("WATCHDOG=1"), "{notes}");
    assert!(notes.contains("STOPPING=1"), "{notes}");
    let videos = files_with_suffix(&out, ".mkv");
    assert_eq!(videos.len(), 1, "{videos:?}");
    let frames = count_video_frames(&videos[0]);
    assert!(
        frames as f64 >= written_before_stop,
        "video has {frames} frames, {written_before_stop} written"
    );
}

/// The unreachable camera is retried without holding up the other; rates, latencies and batches are counted;
/// the HTTP endpoints answer. Returns the /metrics and /status texts.
fn metrics_and_http(daemon: &Daemon) -> (String, String) {
    wait_until(
        "reconnect attempts on the dead source",
        Duration::from_secs(30),
        || daemon.metric("tclseg_reconnects_total", "pipeline=\"dead\"") >= 1.0,
    );
    assert_eq!(daemon.frames_out("dead"), 0.0);
    let body = daemon.metrics();
    assert!(
        metric(
            &body,
            "tclseg_frames_dropped_total",
            "pipeline=\"cam\",reason=\"rate_cap\""
        ) > 0.0,
        "10 fps capped at 5"
    );
    assert!(
        metric(
            &body,
            "tclseg_stage_latency_seconds_count",
            "pipeline=\"cam\",stage=\"total\""
        ) >= 5.0
    );
    assert!(metric(&body, "tclseg_batch_size_count", "") >= 1.0);
    assert_eq!(daemon.get("/livez").code, 200);
    assert_eq!(daemon.get("/nope").code, 404);
    let reply = daemon.get("/status");
    assert_eq!(reply.code, 200);
    let status: serde_json::Value = serde_json::from_str(&reply.body).expect("status json");
    assert_eq!(status["ready"], true);
    assert_eq!(status["pipelines"]["cam"]["connected"], true);
    assert_eq!(status["daemon"]["model"]["name"], "tiny-random");
    (body, status.to_string())
}

/// A label map at the frame size, a sidecar naming the frame, an overlay and a JSON line per frame, in
/// sequence. Returns the JSON lines.
fn outputs(out: &Path) -> String {
    let labels = files_with_suffix(out, ".labels.png");
    assert!(labels.len() >= 5, "{labels:?}");
    assert_eq!(image_size(&labels[0]), (320, 240));
    let json_path = labels[0].to_string_lossy().replace(".labels.png", ".json");
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("sidecar")).expect("json");
    assert_eq!(sidecar["frame"]["pipeline"], "cam");
    assert_eq!(sidecar["classes"][1]["name"], "red square");
    assert!(files_with_suffix(out, ".overlay.jpg").len() >= 5);
    let jsonl = std::fs::read_to_string(out.join("cam.jsonl")).expect("jsonl");
    assert!(jsonl.lines().count() >= 5);
    let sequences: Vec<u64> = jsonl
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("line")["frame"]["sequence"]
                .as_u64()
                .expect("seq")
        })
        .collect();
    assert!(
        sequences.windows(2).all(|w| w[0] < w[1]),
        "sequences increase: {sequences:?}"
    );
    jsonl
}

/// A ready daemon with one pipeline, "cam", on the server's first stream at 5 fps, its watchdog at 3 s.
fn camera_daemon(dir: &Path, server: &RtspServer) -> Daemon {
    let pipeline = Pipeline::new("cam", &server.url(0), &dir.join("out"))
        .retrying(3.0)
        .with("max_fps = 5");
    let config = Config::new()
        .inference("max_batch = 4\nmax_wait_ms = 20")
        .pipeline(pipeline);
    let daemon = Daemon::start(dir, &config);
    daemon.wait_ready();
    daemon
}

#[test]
fn rtsp_server_killed_and_restarted_is_reconnected() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut server = RtspServer::start();
    let port = server.port;
    let daemon = camera_daemon(dir.path(), &server);
    let frames = || daemon.frames_out("cam");
    wait_until("frames before the kill", Duration::from_secs(60), || {
        frames() >= 3.0
    });
    server.kill();
    std::thread::sleep(Duration::from_secs(2));
    let before = frames();
    let _server = RtspServer::options().port(port).start();
    wait_until("reconnect counted", Duration::from_secs(30), || {
        daemon.metric("tclseg_reconnects_total", "pipeline=\"cam\"") >= 1.0
    });
    wait_until("frames after the restart", Duration::from_secs(60), || {
        frames() >= before + 3.0
    });
    assert!(daemon.log_text().contains("starting source"));
}

#[test]
fn frozen_rtsp_server_trips_the_watchdog_and_recovers() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = RtspServer::start();
    let daemon = camera_daemon(dir.path(), &server);
    let frames = || daemon.frames_out("cam");
    wait_until("frames before the freeze", Duration::from_secs(60), || {
        frames() >= 3.0
    });
    common::signal(server.child.id(), "STOP");
    // A hung server sends nothing at all: only the watchdog (3 s here) notices.
    wait_until(
        "the no-frame watchdog fired",
        Duration::from_secs(30),
        || daemon.metric("tclseg_stalls_total", "pipeline=\"cam\"") >= 1.0,
    );
    let before = frames();
    common::signal(server.child.id(), "CONT");
    wait_until("frames after SIGCONT", Duration::from_secs(60), || {
        frames() >= before + 3.0
    });
    assert!(daemon.log_text().contains("no frame for"));
}
