//! RTSP transports against the project's RTSP test server set to refuse one of them (as VLC's server and many
//! cameras refuse TCP): `rtsp_transport = auto` falls back, a forced transport the server refuses is an error
//! that names the cause and the key; and `config check` refuses transports and passwords it cannot use.

mod common;

use std::time::Duration;

use common::config::{Config, Pipeline};
use common::daemon::{Daemon, RtspServer};
use common::{config_check, lines_with, stderr, stdout, tclseg, wait_until};

/// The test server at 160x120, accepting only `protocols` (`tcp` or `udp`).
fn only(protocols: &'static str) -> RtspServer {
    RtspServer::options()
        .size("160x120")
        .protocols(protocols)
        .start()
}

#[test]
fn auto_falls_back_and_a_refused_transport_names_the_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let udp_only = only("udp");
    let tcp_only = only("tcp");
    let out = |name: &str| dir.path().join(name);
    let config = [
        ("udp_auto", &udp_only, ""),
        ("udp_tcp", &udp_only, "rtsp_transport = \"tcp\""),
        ("tcp_auto", &tcp_only, "rtsp_transport = \"auto\""),
        ("tcp_udp", &tcp_only, "rtsp_transport = \"udp\""),
    ]
    .iter()
    .fold(Config::new(), |config, (name, server, extra)| {
        config.pipeline(
            Pipeline::new(name, &server.url(0), &out(name))
                .retrying(5.0)
                .with(&format!("max_fps = 5\n{extra}")),
        )
    });
    let daemon = Daemon::start(dir.path(), &config);
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
    let front = Pipeline::new("front", "rtsp://127.0.0.1:8554/s", &dir.path().join("a"))
        .retrying(5.0)
        .with("rtsp_transport = \"quic\"");
    let back = Pipeline::new(
        "back",
        "rtsp://admin:Sup3r@cret@127.0.0.1:8554/s",
        &dir.path().join("b"),
    )
    .retrying(5.0);
    Config::bare().pipeline(front).pipeline(back).write(&config);
    let out = config_check(&config);
    let err = stderr(&out);
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
    let udp_only = only("udp");
    let out = tclseg(&["probe", &udp_only.url(0)]);
    let text = stdout(&out);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(text.contains("video/x-h264"), "{text}");
    assert!(!text.contains("hunter2") && !err.contains("hunter2"));
}
