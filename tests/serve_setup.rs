//! What an operator runs before `tclseg serve`: `config check` lists every problem and accepts the example
//! configs, `probe` names a camera's codec and size (and refuses a dead one), and the systemd units verify.

mod common;

use std::path::Path;
use std::process::Command;

use common::daemon::RtspServer;
use common::{arg, assert_ok, config_check, free_port, stderr, stdout, tclseg};

#[test]
fn config_check_lists_every_problem_and_accepts_the_examples() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[model]\ndevice = \"tpu\"\n[[pipeline]]\nname = \"a\"\nsource = \"gopher://x\"\nqueries = []\n[pipeline.output]\ndir = \"/tmp/a\"\npath = \"../x\"\n",
    )
    .expect("write");
    let out = config_check(&bad);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
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
            let out = config_check(&path);
            assert!(out.status.success(), "{}: {}", path.display(), stderr(&out));
            checked += 1;
        }
    }
    assert!(checked >= 3, "pipelines/ has {checked} example configs");
}

#[test]
fn probe_names_the_codec_and_size_and_refuses_a_dead_source() {
    let server = RtspServer::start();
    let out = tclseg(&["probe", &server.url(0)]);
    let text = stdout(&out);
    assert_ok(&out);
    assert!(
        text.contains("video/x-h264") && text.contains("width=(int)320"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    let dead = format!("rtsp://127.0.0.1:{}/none", free_port());
    let out = tclseg(&["probe", &dead, "--timeout", "5"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("127.0.0.1"));
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
            text.replace(
                "/usr/local/bin/tclseg",
                &common::tclseg_bin().to_string_lossy(),
            ),
        )
        .expect("write unit");
    }
    let Ok(out) = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(arg(&dir.path().join("tclseg.service")))
        .arg(arg(&dir.path().join("tclseg@gpu0.service")))
        .output()
    else {
        eprintln!("systemd-analyze is not installed: unit syntax not verified here");
        return;
    };
    let complaints = stderr(&out);
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify:\n{complaints}"
    );
}
