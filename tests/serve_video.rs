//! `tclseg serve` on video that is not a camera: an HTTP stream and a video file are segmented, the file
//! losslessly, and a SIGKILL leaves only whole files behind (the overlay video included).

mod common;

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::config::{Config, Pipeline};
use common::daemon::{metric, Daemon};
use common::video::{count_video_frames, write_video};
use common::{files_with_suffix, free_port, image_size, wait_until};

fn config() -> Config {
    Config::new().inference("max_batch = 4\nmax_wait_ms = 20")
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
    let source = format!("http://127.0.0.1:{port}/clip.mkv");
    let web = Pipeline::new("web", &source, &out).retrying(3.0);
    let daemon = Daemon::start(dir.path(), &config().pipeline(web));
    daemon.wait_ready();
    wait_until(
        "frames from the HTTP stream",
        Duration::from_secs(60),
        || daemon.frames_out("web") >= 3.0,
    );
    let labels = files_with_suffix(&out, ".labels.png");
    assert_eq!(image_size(&labels[0]), (160, 120));
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn video_file_is_lossless_and_sigkill_leaves_only_whole_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let video = dir.path().join("clip.mp4");
    write_video(&video, 12);
    let out = dir.path().join("out");
    let clip = Pipeline::new("clip", &format!("file://{}", video.display()), &out)
        .retrying(3.0)
        .output("video = \"overlay.mkv\"");
    let mut daemon = Daemon::start(dir.path(), &config().pipeline(clip));
    daemon.wait_ready();
    wait_until("every frame of the file", Duration::from_secs(90), || {
        daemon.frames_out("clip") >= 12.0
    });
    let body = daemon.metrics();
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
    daemon.signal("KILL");
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
