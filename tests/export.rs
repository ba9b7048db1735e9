//! `tclseg models export` drives the Python trainer and `tclseg models verify` accepts what it wrote.
//! Needs the setup's `.venv` (scripts/test runs scripts/setup first).

use std::process::Command;

fn tclseg(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tclseg"))
        .args(args)
        .output()
        .expect("run tclseg")
}

#[test]
fn export_random_tiny_then_verify_and_list() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let out_dir = tmp.path().join("tiny");
    let out_str = out_dir.to_str().expect("utf-8 path");

    let out = tclseg(&[
        "models", "export", "--random", "tiny", "--seed", "3", "--out", out_str,
    ]);
    assert!(
        out.status.success(),
        "export failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out_dir.join("model.toml").is_file());

    let out = tclseg(&["models", "verify", out_str]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "verify failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("fp16"), "both precisions ran: {stdout}");

    // A second export to the same place without --force is refused and leaves the bundle intact.
    let before = std::fs::read(out_dir.join("model.toml")).expect("manifest");
    let out = tclseg(&[
        "models", "export", "--random", "tiny", "--seed", "4", "--out", out_str,
    ]);
    assert!(!out.status.success());
    assert_eq!(
        std::fs::read(out_dir.join("model.toml")).expect("manifest"),
        before
    );

    let out = tclseg(&[
        "models",
        "list",
        "--dir",
        tmp.path().to_str().expect("utf-8 path"),
    ]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("random"),
        "listed"
    );
}

#[test]
fn export_with_a_missing_checkpoint_names_it_and_writes_nothing() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let out_dir = tmp.path().join("b");
    let out = tclseg(&[
        "models",
        "export",
        "--checkpoint",
        "/nonexistent/ckpt.pt",
        "--out",
        out_dir.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ckpt.pt"));
    assert!(!out_dir.exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).expect("read").collect();
    assert!(leftovers.is_empty(), "no temp folders left behind");
}

#[test]
fn export_needs_exactly_one_source() {
    let out = tclseg(&["models", "export", "--out", "/tmp/x"]);
    assert_eq!(out.status.code(), Some(2));
    let out = tclseg(&["models", "export", "--clip", "a.pt", "--out", "/tmp/x"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--clip without --tcl is a usage error"
    );
}
