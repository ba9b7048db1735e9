//! RTSP transports against the project's RTSP test server set to refuse one of them (as VLC's server and many
//! cameras refuse TCP): `rtsp_transport = auto` falls back, a forced transport the server refuses is an error
//! that names the cause and the key; and `config check` refuses transports and passwords it cannot use.

mod common;

use std::process::Command;
use std::time::Duration;

use common::daemon::{pipeline_toml, wait_until, Daemon, RtspServer};

fn lines_with<'a>(log: &'a str, needles: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}

#[test]
fn auto_falls_back_and_a_refused_transport_names_the_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let udp_only = RtspServer::start("udp");
    let tcp_only = RtspServer::start("tcp");
    let out = |name: &str| dir.path().join(name);
    let pipelines = [
        ("udp_auto", &udp_only, ""),
        ("udp_tcp", &udp_only, "rtsp_transport = \"tcp\""),
        ("tcp_auto", &tcp_only, "rtsp_transport = \"auto\""),
        ("tcp_udp", &tcp_only, "rtsp_transport = \"udp\""),
    ]
    .iter()
    .map(|(name, server, extra)| {
        pipeline_toml(
            name,
            &server.url(),
            &out(name),
            &format!("max_fps = 5\n{extra}"),
        )
    })
    .collect::<String>();
    let daemon = Daemon::start(dir.path(), &pipelines);
    daemon.wait_ready();
    wait_until(
        "frames from both servers with rtsp_transport = auto",
        Duration::from_secs(90),
        || daemon.frames_out("udp_auto") >= 2.0 && daemon.frames_out("tcp_auto") >= 2.0,
    );
    wait_until("both refusals explained", Duration::from_secs(60), || {
        let log = daemon.log_text();
        !lines_with(
            &log,
            &["refused RTP over TCP", "rtsp_transport", "'udp_tcp'"],
        )
        .is_empty()
            && !lines_with(
                &log,
                &["refused RTP over UDP", "rtsp_transport", "'tcp_udp'"],
            )
            .is_empty()
    });
    assert_eq!(daemon.frames_out("udp_tcp"), 0.0);
    assert_eq!(daemon.frames_out("tcp_udp"), 0.0);
    let log = daemon.log_text();
    assert!(
        !lines_with(&log, &["refused", "udp_auto"])
            .iter()
            .any(|l| l.contains("WARN")),
        "auto's fall-back is no failure:\n{log}"
    );
    assert!(!log.contains("missing a plug-in"), "{log}");
    assert!(!log.contains("hunter2"), "a password reached the log");
}

#[test]
fn config_check_refuses_an_unknown_transport_and_an_unencoded_password() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("cams.toml");
    let pipelines = format!(
        "{}{}",
        pipeline_toml(
            "front",
            "rtsp://127.0.0.1:8554/s",
            &dir.path().join("a"),
            "rtsp_transport = \"quic\""
        ),
        pipeline_toml(
            "back",
            "rtsp://admin:Sup3r@cret@127.0.0.1:8554/s",
            &dir.path().join("b"),
            ""
        )
    );
    std::fs::write(&config, pipelines).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_tclseg"))
        .args(["config", "check", config.to_str().expect("utf-8")])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("'front'.rtsp_transport: 'quic' is not one of auto, tcp, udp, udp-mcast"),
        "{err}"
    );
    assert!(
        lines_with(&err, &["'back'.source", "raw '@'", "percent-encode"]).len() == 1,
        "{err}"
    );
    assert!(!err.contains("Sup3r") && !err.contains("cret@"), "{err}");
}

#[test]
fn probe_falls_back_to_udp_when_the_server_refuses_tcp() {
    let udp_only = RtspServer::start("udp");
    let out = Command::new(env!("CARGO_BIN_EXE_tclseg"))
        .args(["probe", &udp_only.url()])
        .output()
        .expect("run probe");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(text.contains("video/x-h264"), "{text}");
    assert!(!text.contains("hunter2") && !err.contains("hunter2"));
}
