//! `tclseg serve` end to end: the real binary, a real RTSP server process (examples/rtsp_server.rs, built by
//! `cargo test`), real files, signals and a NOTIFY_SOCKET made here. Faults are real too: the server is
//! SIGKILLed and restarted, SIGSTOPped and continued.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_tclseg"))
        .parent()
        .expect("bin dir")
        .to_path_buf()
}

fn fixture_bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bundles/tiny-random")
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

/// The RTSP test server as a child process, so it can be killed and frozen.
struct RtspServer {
    child: Child,
    port: u16,
}

impl RtspServer {
    fn start(port: u16, streams: usize) -> RtspServer {
        let mut child = Command::new(bin_dir().join("examples/rtsp_server"))
            .args([
                "--port",
                &port.to_string(),
                "--streams",
                &streams.to_string(),
                "--size",
                "320x240",
                "--fps",
                "10",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start examples/rtsp_server (built by cargo test)");
        let mut out = child.stdout.take().expect("stdout");
        let mut text = String::new();
        let mut byte = [0u8; 1];
        while !text.ends_with('\n') {
            match out.read(&mut byte) {
                Ok(1) => text.push(byte[0] as char),
                _ => panic!("rtsp_server exited before printing its port: {text}"),
            }
        }
        let port = text
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("bad rtsp_server banner: {text}"));
        RtspServer { child, port }
    }

    fn url(&self, stream: usize) -> String {
        format!(
            "rtsp://viewer:hunter2@127.0.0.1:{}/stream{stream}",
            self.port
        )
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        self.kill();
    }
}

/// The daemon under test, with its HTTP port, the notify messages it sent and its log file.
struct Daemon {
    child: Child,
    http: u16,
    /// Filled by a thread that reads the notify socket as systemd does, all the time: a receiver that only reads
    /// at the end would let the socket's short queue (10 datagrams by default) fill, and the daemon drops what
    /// does not fit.
    notify: Arc<Mutex<Vec<String>>>,
    log: PathBuf,
    config: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A config: the global part (tiny fixture model, one thread, HTTP port) and the given pipeline tables.
fn config_text(http: u16, pipelines: &str) -> String {
    format!(
        "[model]\npath = \"{}\"\ndevice = \"cpu\"\nthreads = 1\n[inference]\nmax_batch = 4\nmax_wait_ms = 20\n[http]\nlisten = \"127.0.0.1:{http}\"\n{pipelines}",
        fixture_bundle().display()
    )
}

impl Daemon {
    fn start(dir: &Path, pipelines: &str) -> Daemon {
        Daemon::start_with_env(dir, pipelines, &[])
    }

    fn start_with_env(dir: &Path, pipelines: &str, extra_env: &[(&str, &str)]) -> Daemon {
        let http = free_port();
        let config = dir.join("serve.toml");
        std::fs::write(&config, config_text(http, pipelines)).expect("write config");
        let socket = dir.join("notify.sock");
        let socket_reader = UnixDatagram::bind(&socket).expect("bind notify socket");
        let notify = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::clone(&notify);
        socket_reader
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        // Ends once the `Daemon` (the other owner of the message list) is gone.
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while Arc::strong_count(&received) > 1 {
                if let Ok(n) = socket_reader.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    received.lock().expect("notify log").push(text);
                }
            }
        });
        let log = dir.join("serve.log");
        let child = Command::new(env!("CARGO_BIN_EXE_tclseg"))
            .args(["serve", "--config", config.to_str().expect("utf-8")])
            .envs(extra_env.iter().copied())
            .env("NOTIFY_SOCKET", &socket)
            .env("WATCHDOG_USEC", "2000000")
            .env_remove("WATCHDOG_PID")
            .env("TCLSEG_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start tclseg serve");
        Daemon {
            child,
            http,
            notify,
            log,
            config,
        }
    }

    /// Notify messages received so far.
    fn notifications(&self) -> Vec<String> {
        // The reader thread may still be taking the last datagrams off the socket.
        std::thread::sleep(Duration::from_millis(200));
        self.notify.lock().expect("notify log").clone()
    }

    fn get(&self, path: &str) -> (u16, String) {
        http(self.http, "GET", path)
    }

    fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = self.get("/metrics");
        metric(&body, name, labels)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&self) {
        wait_until("/readyz 200", Duration::from_secs(60), || {
            self.get("/readyz").0 == 200
        });
    }

    /// SIGTERM, then the exit status (panics after `timeout`).
    fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        signal(self.child.id(), "TERM");
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "no exit within {timeout:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
    );
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// The value of `name{labels}` in a Prometheus text (0 when absent).
fn metric(body: &str, name: &str, labels: &str) -> f64 {
    let key = if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{labels}}}")
    };
    body.lines()
        .find_map(|l| l.strip_prefix(&key).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn pipeline_toml(name: &str, source: &str, out: &Path, extra: &str) -> String {
    format!(
        "[[pipeline]]\nname = \"{name}\"\nsource = \"{source}\"\nqueries = [\"red square\", \"blue circle\"]\nwatchdog_s = 3\nbackoff_initial_s = 0.2\nbackoff_max_s = 1\n{extra}\n[pipeline.output]\ndir = \"{}\"\n",
        out.display()
    )
}

fn files_with_suffix(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                found.push(p);
            }
        }
    }
    found.sort();
    found
}

/// Frames a video file decodes to (GStreamer, as any player would read it).
fn count_video_frames(path: &Path) -> usize {
    gst::init().expect("gst init");
    let uri = gst::glib::filename_to_uri(path, None).expect("uri");
    let pipeline = gst::parse::launch(&format!(
        "uridecodebin uri={uri} ! videoconvert ! video/x-raw,format=RGB ! appsink name=sink sync=false"
    ))
    .expect("decode pipeline")
    .downcast::<gst::Pipeline>()
    .expect("pipeline");
    let sink = pipeline
        .by_name("sink")
        .expect("sink")
        .downcast::<gst_app::AppSink>()
        .expect("appsink");
    pipeline.set_state(gst::State::Playing).expect("play");
    let mut frames = 0;
    while sink
        .try_pull_sample(gst::ClockTime::from_seconds(5))
        .is_some()
    {
        frames += 1;
    }
    let _ = pipeline.set_state(gst::State::Null);
    frames
}

/// A small H.264 video made with GStreamer: `frames` frames of a moving ball, in MP4 or (`.mkv`) Matroska.
fn write_video(path: &Path, frames: u32) {
    gst::init().expect("gst init");
    let mux = if path.extension().is_some_and(|e| e == "mkv") {
        "matroskamux"
    } else {
        "mp4mux"
    };
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc num-buffers={frames} pattern=ball ! video/x-raw,width=160,height=120,framerate=10/1 ! videoconvert ! x264enc speed-preset=ultrafast ! {mux} ! filesink location={}",
        path.display()
    ))
    .expect("encode pipeline");
    pipeline.set_state(gst::State::Playing).expect("play");
    let bus = pipeline.bus().expect("bus");
    let msg = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(30),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("encode finished");
    assert!(
        matches!(msg.view(), gst::MessageView::Eos(_)),
        "encode failed"
    );
    let _ = pipeline.set_state(gst::State::Null);
}

#[test]
fn rtsp_end_to_end_with_notify_metrics_video_and_clean_stop() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = RtspServer::start(0, 1);
    let out = dir.path().join("out-cam");
    let dead_port = free_port();
    let pipelines = format!(
        "{}{}",
        pipeline_toml("cam", &server.url(0), &out, "max_fps = 5",).replace(
            "[pipeline.output]\n",
            "[pipeline.output]\njsonl = true\noverlay = \"jpg\"\nvideo = \"overlay.mkv\"\n"
        ),
        pipeline_toml(
            "dead",
            &format!("rtsp://127.0.0.1:{dead_port}/none"),
            &dir.path().join("out-dead"),
            ""
        )
    );
    let mut daemon = Daemon::start(dir.path(), &pipelines);
    daemon.wait_ready();
    wait_until("5 frames written", Duration::from_secs(60), || {
        daemon.metric("tclseg_frames_out_total", "pipeline=\"cam\"") >= 5.0
    });
    // The unreachable camera is retried, and did not hold up the other.
    wait_until(
        "reconnect attempts on the dead source",
        Duration::from_secs(30),
        || daemon.metric("tclseg_reconnects_total", "pipeline=\"dead\"") >= 1.0,
    );
    assert_eq!(
        daemon.metric("tclseg_frames_out_total", "pipeline=\"dead\""),
        0.0
    );
    let (_, body) = daemon.get("/metrics");
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
    assert_eq!(daemon.get("/livez").0, 200);
    assert_eq!(daemon.get("/nope").0, 404);
    let (code, status) = daemon.get("/status");
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).expect("status json");
    assert_eq!(status["ready"], true);
    assert_eq!(status["pipelines"]["cam"]["connected"], true);
    assert_eq!(status["daemon"]["model"]["name"], "tiny-random");

    // Outputs: label map at the frame size, a sidecar naming the frame, a JSON line per frame.
    let labels = files_with_suffix(&out, ".labels.png");
    assert!(labels.len() >= 5, "{labels:?}");
    let img = image::open(&labels[0]).expect("label png decodes");
    assert_eq!((img.width(), img.height()), (320, 240));
    let json_path = labels[0].to_string_lossy().replace(".labels.png", ".json");
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("sidecar")).expect("json");
    assert_eq!(sidecar["frame"]["pipeline"], "cam");
    assert_eq!(sidecar["classes"][1]["name"], "red square");
    assert!(files_with_suffix(&out, ".overlay.jpg").len() >= 5);
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

    // Credentials never reach logs, metrics, status or outputs.
    for text in [daemon.log_text(), body, status.to_string(), jsonl] {
        assert!(!text.contains("hunter2"), "credential leaked: {text}");
    }
    let written_before_stop = daemon.metric("tclseg_frames_out_total", "pipeline=\"cam\"");
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

/// A ready daemon with one pipeline, "cam", on the server's first stream at 5 fps.
fn camera_daemon(dir: &Path, server: &RtspServer) -> Daemon {
    let pipelines = pipeline_toml("cam", &server.url(0), &dir.join("out"), "max_fps = 5");
    let daemon = Daemon::start(dir, &pipelines);
    daemon.wait_ready();
    daemon
}

#[test]
fn rtsp_server_killed_and_restarted_is_reconnected() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut server = RtspServer::start(0, 1);
    let port = server.port;
    let daemon = camera_daemon(dir.path(), &server);
    let frames = || daemon.metric("tclseg_frames_out_total", "pipeline=\"cam\"");
    wait_until("frames before the kill", Duration::from_secs(60), || {
        frames() >= 3.0
    });
    server.kill();
    std::thread::sleep(Duration::from_secs(2));
    let before = frames();
    let _server = RtspServer::start(port, 1);
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
    let server = RtspServer::start(0, 1);
    let daemon = camera_daemon(dir.path(), &server);
    let frames = || daemon.metric("tclseg_frames_out_total", "pipeline=\"cam\"");
    wait_until("frames before the freeze", Duration::from_secs(60), || {
        frames() >= 3.0
    });
    signal(server.child.id(), "STOP");
    // A hung server sends nothing at all: only the watchdog (3 s here) notices.
    wait_until(
        "the no-frame watchdog fired",
        Duration::from_secs(30),
        || daemon.metric("tclseg_stalls_total", "pipeline=\"cam\"") >= 1.0,
    );
    let before = frames();
    signal(server.child.id(), "CONT");
    wait_until("frames after SIGCONT", Duration::from_secs(60), || {
        frames() >= before + 3.0
    });
    assert!(daemon.log_text().contains("no frame for"));
}

#[test]
fn watched_folder_skips_bad_images_and_takes_new_ones() {
    let dir = tempfile::tempdir().expect("tmp");
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(inbox.join("sub")).expect("mkdir");
    let good = |path: &Path| {
        image::RgbImage::from_fn(96, 64, |x, _| image::Rgb([(x * 2) as u8, 40, 200]))
            .save(path)
            .expect("save");
    };
    good(&inbox.join("a.png"));
    good(&inbox.join("sub/b.png"));
    std::fs::write(inbox.join("corrupt.jpg"), b"this is not a jpeg").expect("write");
    std::fs::write(inbox.join("empty.png"), b"").expect("write");
    let mut truncated = std::fs::read(inbox.join("a.png")).expect("read");
    truncated.truncate(truncated.len() / 2);
    std::fs::write(inbox.join("truncated.png"), truncated).expect("write");
    let out = dir.path().join("out");
    let pipelines = pipeline_toml("inbox", &format!("folder://{}", inbox.display()), &out, "")
        .replace(
            "[pipeline.output]\n",
            "[pipeline.output]\npath = \"{name}\"\n",
        );
    let daemon = Daemon::start_with_env(dir.path(), &pipelines, &[("TCLSEG_LOG_FORMAT", "json")]);
    daemon.wait_ready();
    let m = |name: &str, labels: &str| daemon.metric(name, labels);
    wait_until(
        "2 good images written, 3 bad ones skipped",
        Duration::from_secs(60),
        || {
            m("tclseg_frames_out_total", "pipeline=\"inbox\"") >= 2.0
                && m(
                    "tclseg_frames_dropped_total",
                    "pipeline=\"inbox\",reason=\"decode_error\"",
                ) >= 3.0
        },
    );
    assert!(out.join("a.png.labels.png").is_file() && out.join("sub/b.png.labels.png").is_file());
    let log = daemon.log_text();
    for name in ["corrupt.jpg", "empty.png", "truncated.png"] {
        assert!(log.contains(name), "no reason logged for {name}:\n{log}");
    }
    good(&inbox.join("c.png"));
    wait_until("a new image is picked up", Duration::from_secs(30), || {
        out.join("c.png.labels.png").is_file()
    });
    assert_eq!(m("tclseg_frames_out_total", "pipeline=\"inbox\""), 3.0);
    // --log-format json: every log line is one JSON object.
    for line in daemon.log_text().lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}

#[test]
fn http_stream_source_is_segmented() {
    let dir = tempfile::tempdir().expect("tmp");
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).expect("mkdir");
    write_video(&site.join("clip.mkv"), 30);
    let port = free_port();
    let mut server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(&site)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 http.server");
    wait_until("the HTTP server listens", Duration::from_secs(20), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let out = dir.path().join("out");
    let pipelines = pipeline_toml(
        "web",
        &format!("http://127.0.0.1:{port}/clip.mkv"),
        &out,
        "",
    );
    let daemon = Daemon::start(dir.path(), &pipelines);
    daemon.wait_ready();
    wait_until(
        "frames from the HTTP stream",
        Duration::from_secs(60),
        || daemon.metric("tclseg_frames_out_total", "pipeline=\"web\"") >= 3.0,
    );
    let labels = files_with_suffix(&out, ".labels.png");
    let img = image::open(&labels[0]).expect("label png");
    assert_eq!((img.width(), img.height()), (160, 120));
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn video_file_is_lossless_and_sigkill_leaves_only_whole_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let video = dir.path().join("clip.mp4");
    write_video(&video, 12);
    let out = dir.path().join("out");
    let pipelines = pipeline_toml("clip", &format!("file://{}", video.display()), &out, "")
        .replace(
            "[pipeline.output]\n",
            "[pipeline.output]\nvideo = \"overlay.mkv\"\n",
        );
    let mut daemon = Daemon::start(dir.path(), &pipelines);
    daemon.wait_ready();
    wait_until("every frame of the file", Duration::from_secs(90), || {
        daemon.metric("tclseg_frames_out_total", "pipeline=\"clip\"") >= 12.0
    });
    let (_, body) = daemon.get("/metrics");
    for reason in ["superseded", "rate_cap", "sink_backlog"] {
        let labels = format!("pipeline=\"clip\",reason=\"{reason}\"");
        assert_eq!(
            metric(&body, "tclseg_frames_dropped_total", &labels),
            0.0,
            "{reason}"
        );
    }
    assert_eq!(
        metric(&body, "tclseg_frames_out_total", "pipeline=\"clip\""),
        12.0
    );
    // Killed without warning: every visible output is whole, and the Matroska video still plays.
    signal(daemon.child.id(), "KILL");
    let _ = daemon.child.wait();
    for png in files_with_suffix(&out, ".png") {
        let name = png.file_name().expect("name").to_string_lossy().to_string();
        if !name.starts_with('.') {
            image::open(&png).unwrap_or_else(|e| panic!("{} is partial: {e}", png.display()));
        }
    }
    for json in files_with_suffix(&out, ".json") {
        let text = std::fs::read_to_string(&json).expect("read");
        serde_json::from_str::<serde_json::Value>(&text)
            .unwrap_or_else(|e| panic!("{} is partial: {e}", json.display()));
    }
    let videos = files_with_suffix(&out, ".mkv");
    assert_eq!(videos.len(), 1);
    assert!(
        count_video_frames(&videos[0]) > 0,
        "the crash-safe video must stay readable"
    );
}

#[test]
fn reload_applies_the_diff_and_rejects_a_broken_config() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = RtspServer::start(0, 2);
    let keep = pipeline_toml(
        "keep",
        &server.url(0),
        &dir.path().join("out-keep"),
        "max_fps = 5",
    );
    let gone = pipeline_toml(
        "gone",
        &server.url(1),
        &dir.path().join("out-gone"),
        "max_fps = 2",
    );
    let daemon = Daemon::start(dir.path(), &format!("{keep}{gone}"));
    daemon.wait_ready();
    let frames = |p: &str| daemon.metric("tclseg_frames_out_total", &format!("pipeline=\"{p}\""));
    wait_until("both pipelines run", Duration::from_secs(60), || {
        frames("keep") >= 2.0 && frames("gone") >= 1.0
    });

    // A broken config is rejected, logged, and the old one keeps running.
    let good_config = std::fs::read_to_string(&daemon.config).expect("read");
    std::fs::write(
        &daemon.config,
        good_config.replace("max_fps = 2", "max_fps = \"fast\""),
    )
    .expect("write");
    signal(daemon.child.id(), "HUP");
    wait_until("reload rejected", Duration::from_secs(30), || {
        daemon.metric("tclseg_reload_failures_total", "") >= 1.0
    });
    assert!(daemon.log_text().contains("reload rejected"));
    let before = frames("keep");
    wait_until("old config still running", Duration::from_secs(30), || {
        frames("keep") > before
    });

    // Add one pipeline, remove another, over HTTP; the untouched one is never restarted.
    let added = pipeline_toml(
        "added",
        &server.url(1),
        &dir.path().join("out-added"),
        "max_fps = 2",
    );
    std::fs::write(
        &daemon.config,
        config_text(daemon.http, &format!("{keep}{added}")),
    )
    .expect("write");
    let mut samples = vec![(Instant::now(), frames("keep"))];
    let (code, report) = http(daemon.http, "POST", "/reload");
    assert_eq!(code, 200, "{report}");
    let report: serde_json::Value = serde_json::from_str(&report).expect("report json");
    assert_eq!(report["added"], serde_json::json!(["added"]));
    assert_eq!(report["removed"], serde_json::json!(["gone"]));
    wait_until("the added pipeline writes", Duration::from_secs(60), || {
        samples.push((Instant::now(), frames("keep")));
        frames("added") >= 1.0
    });
    let (_, body) = daemon.get("/metrics");
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
    assert_eq!(daemon.get("/reload").0, 405);
}

#[test]
fn config_check_lists_every_problem_and_accepts_the_examples() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[model]\ndevice = \"tpu\"\n[[pipeline]]\nname = \"a\"\nsource = \"gopher://x\"\nqueries = []\n[pipeline.output]\ndir = \"/tmp/a\"\npath = \"../x\"\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_tclseg"))
        .args(["config", "check", bad.to_str().expect("utf-8")])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "bad.toml has 4 problems",
        "model.device",
        "pipeline[0] 'a'.source",
        "pipeline[0] 'a'.queries",
        "output.path",
    ] {
        assert!(err.contains(needle), "{needle} missing in:\n{err}");
    }
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut checked = 0;
    for entry in std::fs::read_dir(&examples).expect("pipelines/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(env!("CARGO_BIN_EXE_tclseg"))
                .args(["config", "check", path.to_str().expect("utf-8")])
                .output()
                .expect("run");
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 3, "pipelines/ has {checked} example configs");
}

#[test]
fn probe_names_the_codec_and_size_and_refuses_a_dead_source() {
    let server = RtspServer::start(0, 1);
    let out = Command::new(env!("CARGO_BIN_EXE_tclseg"))
        .args(["probe", &server.url(0)])
        .output()
        .expect("run probe");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("video/x-h264") && text.contains("width=(int)320"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    let dead = format!("rtsp://127.0.0.1:{}/none", free_port());
    let out = Command::new(env!("CARGO_BIN_EXE_tclseg"))
        .args(["probe", &dead, "--timeout", "5"])
        .output()
        .expect("run probe");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.1"));
}

#[test]
fn systemd_units_verify() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let dir = tempfile::tempdir().expect("tmp");
    // verify wants ExecStart to exist: point it at the binary under test.
    for (src, dst) in [
        ("tclseg.service", "tclseg.service"),
        ("tclseg@.service", "tclseg@gpu0.service"),
    ] {
        let text = std::fs::read_to_string(units.join(src)).expect("unit");
        assert!(
            text.contains("Type=notify")
                && text.contains("WatchdogSec=")
                && text.contains("NoNewPrivileges=yes")
        );
        std::fs::write(
            dir.path().join(dst),
            text.replace("/usr/local/bin/tclseg", env!("CARGO_BIN_EXE_tclseg")),
        )
        .expect("write unit");
    }
    let Ok(out) = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(dir.path().join("tclseg.service"))
        .arg(dir.path().join("tclseg@gpu0.service"))
        .output()
    else {
        eprintln!("systemd-analyze is not installed: unit syntax not verified here");
        return;
    };
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify:\n{complaints}"
    );
}
