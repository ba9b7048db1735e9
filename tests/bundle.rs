//! Model bundles: the committed tiny fixture verifies and runs one crop through real ONNX Runtime; missing,
//! truncated, corrupted and malformed bundles are refused with errors that name the file.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use common::{arg, fixture_bundle as fixture, tclseg};
use tclseg::model::bundle::{Bundle, BundleError, Precision};
use tclseg::model::verify;

/// A private copy of the fixture bundle that a test may damage.
fn fixture_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dst = tmp.path().join("bundle");
    fs::create_dir(&dst).expect("create bundle dir");
    for entry in fs::read_dir(fixture())
        .expect("fixture bundle exists (see trainer/tclseg_trainer/tools/fixtures.py)")
    {
        let entry = entry.expect("dir entry");
        fs::copy(entry.path(), dst.join(entry.file_name())).expect("copy fixture file");
    }
    (tmp, dst)
}

#[test]
fn fixture_bundle_opens_and_lists_all_graphs() {
    let bundle = Bundle::open(&fixture()).expect("fixture bundle verifies");
    let m = bundle.manifest();
    assert_eq!(m.format_version, 1);
    for role in [
        "text_encoder",
        "image_trunk",
        "tcl_head",
        "mask_head",
        "pamr",
    ] {
        let path = bundle
            .graph(role, Precision::Fp32)
            .expect("fp32 graph listed");
        assert!(path.is_file(), "{role} graph file exists");
    }
    assert!(bundle.vocabulary().is_file());
    assert_eq!(m.input.crop_size % m.architecture.patch_size, 0);
}

#[test]
fn fixture_bundle_runs_one_crop_with_the_promised_shapes() {
    let bundle = Bundle::open(&fixture()).expect("fixture bundle verifies");
    let m = bundle.manifest();
    let runs = verify::run_one_crop(&bundle, Precision::Fp32, 1).expect("one crop runs");
    let roles: Vec<&str> = runs.iter().map(|r| r.role.as_str()).collect();
    assert_eq!(
        roles,
        [
            "text_encoder",
            "image_trunk",
            "tcl_head",
            "mask_head",
            "pamr"
        ]
    );
    let side = m.input.crop_size / m.architecture.mask_stride;
    let pamr = runs.last().expect("pamr ran");
    assert_eq!(
        pamr.outputs,
        vec![("refined".to_string(), vec![1, 1, side, side])]
    );
}

#[test]
fn verify_command_succeeds_on_the_fixture() {
    let out = tclseg(&["models", "verify", arg(&fixture())]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok: tiny-random"), "{stdout}");
    assert!(stdout.contains("pamr"), "{stdout}");
}

#[test]
fn missing_file_is_named() {
    let (_tmp, dir) = fixture_copy();
    fs::remove_file(dir.join("pamr.onnx")).expect("remove");
    match Bundle::open(&dir) {
        Err(BundleError::MissingFile { file, .. }) => assert_eq!(file, "pamr.onnx"),
        other => panic!("expected MissingFile, got {other:?}"),
    }
    let out = tclseg(&["models", "verify", arg(&dir)]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pamr.onnx") && stderr.contains("missing"),
        "{stderr}"
    );
}

#[test]
fn truncated_file_is_refused_by_size() {
    let (_tmp, dir) = fixture_copy();
    let path = dir.join("mask_head.onnx");
    let bytes = fs::read(&path).expect("read");
    fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
    match Bundle::open(&dir) {
        Err(BundleError::SizeMismatch {
            file,
            expected,
            found,
            ..
        }) => {
            assert_eq!(file, "mask_head.onnx");
            assert_eq!(expected as usize, bytes.len());
            assert_eq!(found as usize, bytes.len() / 2);
        }
        other => panic!("expected SizeMismatch, got {other:?}"),
    }
}

#[test]
fn corrupted_file_is_refused_by_hash() {
    let (_tmp, dir) = fixture_copy();
    let path = dir.join("text_encoder.onnx");
    let mut bytes = fs::read(&path).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&path, &bytes).expect("corrupt");
    let err = Bundle::open(&dir).expect_err("corruption detected");
    assert!(matches!(&err, BundleError::HashMismatch { file, .. } if file == "text_encoder.onnx"));
    assert!(err.to_string().contains("text_encoder.onnx"), "{err}");
}

#[test]
fn malformed_manifest_says_where() {
    let (_tmp, dir) = fixture_copy();
    let manifest = dir.join("model.toml");
    let text = fs::read_to_string(&manifest).expect("read manifest");

    fs::write(
        &manifest,
        text.replace("format_version = 1", "format_version = 99"),
    )
    .expect("write");
    let err = Bundle::open(&dir)
        .expect_err("future format refused")
        .to_string();
    assert!(err.contains("format_version is 99"), "{err}");

    fs::write(&manifest, text.replacen("[mask]", "[mask\n", 1)).expect("write");
    let err = Bundle::open(&dir)
        .expect_err("syntax error refused")
        .to_string();
    assert!(
        err.contains("model.toml is malformed") && err.contains("line"),
        "{err}"
    );

    let escaped = text.replacen("path = \"pamr.onnx\"", "path = \"../pamr.onnx\"", 1);
    assert_ne!(escaped, text, "fixture manifest lists pamr.onnx");
    fs::write(&manifest, escaped).expect("write");
    let err = Bundle::open(&dir)
        .expect_err("escaping path refused")
        .to_string();
    assert!(err.contains("../pamr.onnx"), "{err}");
}

#[test]
fn calibrated_query_thresholds_are_read_and_checked() {
    let (_tmp, dir) = fixture_copy();
    let manifest = dir.join("model.toml");
    let text = fs::read_to_string(&manifest).expect("read manifest");
    let bundle = Bundle::open(&dir).expect("fixture opens");
    assert!(bundle.manifest().mask.query_thresholds.is_empty());

    fs::write(
        &manifest,
        format!("{text}\n[mask.query_thresholds]\ngreen = 0.55\n"),
    )
    .expect("write");
    let bundle = Bundle::open(&dir).expect("calibrated bundle opens");
    assert_eq!(
        bundle.manifest().mask.query_thresholds.get("green"),
        Some(&0.55)
    );

    fs::write(
        &manifest,
        format!("{text}\n[mask.query_thresholds]\ngreen = 1.5\n"),
    )
    .expect("write");
    let err = Bundle::open(&dir)
        .expect_err("threshold out of range refused")
        .to_string();
    assert!(
        err.contains("query_thresholds") && err.contains("'green' = 1.5"),
        "{err}"
    );
}

#[test]
fn not_a_bundle_directory() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let err = Bundle::open(&tmp.path().join("nope")).expect_err("no dir");
    assert!(matches!(err, BundleError::NotADirectory { .. }));
    let err = Bundle::open(tmp.path())
        .expect_err("no manifest")
        .to_string();
    assert!(err.contains("model.toml"), "{err}");
}

#[test]
fn missing_onnx_runtime_is_an_error_not_a_panic() {
    let out = Command::new(common::tclseg_bin())
        .args(["models", "verify", arg(&fixture())])
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .output()
        .expect("run tclseg");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ONNX Runtime library not found"),
        "{stderr}"
    );
    assert!(stderr.contains("scripts/setup"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn manifests_take_int8_graphs_and_refuse_run_modes_as_graph_precisions() {
    let text = fs::read_to_string(fixture().join("model.toml")).expect("fixture manifest");
    let trunk =
        r#"image_trunk = { fp32 = "image_trunk.fp32.onnx", fp16 = "image_trunk.fp16.onnx" }"#;
    assert!(text.contains(trunk), "the fixture's trunk line");
    let with = |extra: &str| {
        text.replace(
            trunk,
            &format!(
                r#"image_trunk = {{ fp32 = "image_trunk.fp32.onnx", {extra} = "image_trunk.fp16.onnx" }}"#
            ),
        )
    };
    // int8 is a graph precision (here pointed at a listed file: the manifest check is about names and listing).
    let parsed = tclseg::model::Manifest::parse(&with("int8")).expect("int8 graphs are accepted");
    assert_eq!(
        parsed.graphs["image_trunk"]["int8"],
        "image_trunk.fp16.onnx"
    );
    // bf16 and auto are run modes, never files.
    for mode in ["bf16", "auto"] {
        let err = tclseg::model::Manifest::parse(&with(mode)).expect_err(mode);
        assert!(
            err.contains(&format!("precision '{mode}'")) && err.contains("int8"),
            "{err}"
        );
    }
    // bf16 runs the fp32 graphs; an unresolved auto would too.
    let (_tmp, dir) = fixture_copy();
    let bundle = Bundle::open(&dir).expect("fixture opens");
    assert_eq!(
        bundle.graph("image_trunk", Precision::Bf16),
        bundle.graph("image_trunk", Precision::Fp32)
    );
    assert_eq!(bundle.graph("image_trunk", Precision::Int8), None);
}
