//! `tclseg models export` drives the Python trainer and `tclseg models verify` accepts what it wrote.
//! Needs the setup's `.venv` (scripts/test runs scripts/setup first).

mod common;

use common::tclseg;

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
    let out = tclseg(&["models", "export", "--tcl", "t.pth", "--out", "/tmp/x"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--tcl without --clip is a usage error"
    );
    // --clip alone gives the training-free heads; asking for TCL's head then needs --tcl.
    let out = tclseg(&[
        "models", "export", "--clip", "a.pt", "--heads", "tcl", "--out", "/tmp/x",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "the tcl head without --tcl is a usage error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("the tcl head needs --tcl"));
}

/// A --clip file that is not OpenAI's ViT-B/16 (by sha256) is refused with a message naming its hash and the
/// option that accepts it; with `--allow-unverified-clip` the hash no longer stops the export, which goes on to
/// read the file (here not a checkpoint at all, so it fails there, naming the file). The full acceptance, a real
/// ViT-B/16-shaped CLIP exported and its bundle's provenance, is in scripts/test-official and
/// trainer/tests/test_export.py::test_cli_accepts_an_unverified_clip_only_when_told.
#[test]
fn export_refuses_an_unverified_clip_unless_told() {
    use sha2::{Digest, Sha256};

    let tmp = tempfile::tempdir().expect("temp dir");
    let clip = tmp.path().join("rehosted-ViT-B-16.pt");
    let tcl = tmp.path().join("tcl.pth");
    std::fs::write(&clip, b"a CLIP file that is not OpenAI's").expect("write");
    std::fs::write(&tcl, b"not read before the CLIP is").expect("write");
    let sha = hex::encode(Sha256::digest(std::fs::read(&clip).expect("read")));
    let out_dir = tmp.path().join("bundle");
    let base = [
        "models",
        "export",
        "--clip",
        clip.to_str().expect("utf-8 path"),
        "--tcl",
        tcl.to_str().expect("utf-8 path"),
        "--out",
        out_dir.to_str().expect("utf-8 path"),
    ];

    let out = tclseg(&base);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "refused: {stderr}");
    assert!(
        stderr.contains("--allow-unverified-clip")
            && stderr.contains(&sha)
            && stderr.contains("rehosted-ViT-B-16.pt"),
        "names the file, its sha256 and the option: {stderr}"
    );
    assert!(!out_dir.exists());

    let mut told = base.to_vec();
    told.push("--allow-unverified-clip");
    let out = tclseg(&told);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        !stderr.contains("pass --allow-unverified-clip"),
        "the hash no longer refuses it: {stderr}"
    );
    assert!(
        stderr.contains(&format!("sha256 {sha} is not OpenAI's"))
            && stderr.contains("using it anyway"),
        "the waiver is logged with the file's sha256: {stderr}"
    );
    assert!(
        stderr.contains("not a CLIP checkpoint"),
        "went on to read the file: {stderr}"
    );
    assert!(!out_dir.exists());

    let out = tclseg(&[
        "models",
        "export",
        "--random",
        "tiny",
        "--allow-unverified-clip",
        "--out",
        out_dir.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--allow-unverified-clip without --clip is a usage error"
    );
}
