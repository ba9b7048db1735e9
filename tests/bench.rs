//! `tclseg models bench` on the tiny fixture bundle: one JSON line per batch size with sound numbers, label maps
//! equal to `segment`'s, and bad arguments refused by name.

mod common;

use std::fs;
use std::path::Path;
use std::process::Output;

use common::{arg, assert_ok, fixture_bundle, stderr, tclseg, write_png};

fn bench(images: &Path, extra: &[&str]) -> Output {
    let bundle = fixture_bundle();
    let mut args = vec![
        "models",
        "bench",
        "--model",
        arg(&bundle),
        "--images",
        arg(images),
        "--device",
        "cpu",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    tclseg(&args)
}

#[test]
fn one_json_line_per_batch_size_and_labels_equal_segment() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let images = tmp.path().join("in");
    fs::create_dir_all(&images).expect("mkdir");
    // After the short-side rescale to 448: a.png stays one 448x448 crop, b.png becomes 448x607, two crops.
    write_png(&images.join("a.png"), 32, 32);
    write_png(&images.join("b.png"), 61, 45);
    let labels = tmp.path().join("labels");
    let run = bench(
        &images,
        &[
            "--batch",
            "1,2",
            "--iterations",
            "2",
            "--warmup",
            "1",
            "--save-labels",
            arg(&labels),
        ],
    );
    assert_ok(&run);
    let stdout = String::from_utf8(run.stdout.clone()).expect("utf-8");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");

    // Batch 1 is a.png alone; batch 2 is a.png and b.png.
    for (line, (batch, crops, size)) in lines.iter().zip([
        (1, 1, serde_json::json!([32, 32])),
        (2, 3, serde_json::json!("mixed")),
    ]) {
        assert_eq!(line["batch"], batch, "{line}");
        assert_eq!(line["images_per_call"], batch, "{line}");
        assert_eq!(line["crops_per_call"], crops, "{line}");
        assert_eq!(line["calls"], 2, "{line}");
        assert_eq!(line["image_size"], size, "{line}");
        assert_eq!(line["device"], "cpu");
        assert_eq!(line["precision"], "fp32");
        assert_eq!(line["precision_reason"], "asked for", "{line}");
        assert!(line["cpu_flags"].is_array(), "{line}");
        assert!(
            line["kernels"].as_str().is_some_and(|k| !k.is_empty()),
            "{line}"
        );
        assert_eq!(line["pamr"], true);
        assert_eq!(line["queries"], 3, "the default queries");
        assert_eq!(line["model_sha256"].as_str().expect("sha").len(), 64);
        let lat = &line["latency_ms"];
        let f = |v: &serde_json::Value| v.as_f64().expect("number");
        let (p50, p95, min, max, mean) = (
            f(&lat["p50"]),
            f(&lat["p95"]),
            f(&lat["min"]),
            f(&lat["max"]),
            f(&lat["mean"]),
        );
        assert!(min > 0.0, "{line}");
        assert!(min <= p50 && p50 <= p95 && p95 <= max, "{line}");
        assert!(min <= mean && mean <= max, "{line}");
        // Throughput is the timed calls' work over their summed latency.
        let images_per_s = f(&line["images_per_s"]);
        let want = 1e3 * batch as f64 / mean;
        assert!(
            (images_per_s - want).abs() < 1e-6 * want,
            "{images_per_s} vs {want}"
        );
        let crops_per_s = f(&line["crops_per_s"]);
        assert!(
            (crops_per_s - images_per_s * crops as f64 / batch as f64).abs() < 1e-6 * crops_per_s
        );
    }

    // The saved label maps are the ones `segment` writes for the same images.
    let out = tmp.path().join("segment-out");
    let seg = common::segment(
        &[&images],
        &out,
        &["red square", "blue circle", "green triangle"],
        &["--format", "labels"],
    );
    assert_ok(&seg);
    for batch in ["b1", "b2"] {
        for (name, size) in [("a", (32, 32)), ("b", (61, 45))] {
            let saved_path = labels.join(batch).join(format!("{name}.png"));
            let saved = image::open(&saved_path).expect("saved label map");
            assert_eq!((saved.width(), saved.height()), size);
            // Both are `label_png::encode` of the same labels with the same palette: byte-identical files.
            let want =
                fs::read(out.join(format!("{name}.labels.png"))).expect("segment's label map");
            assert!(
                fs::read(&saved_path).expect("read") == want,
                "{batch}/{name} differs from segment's"
            );
        }
    }
}

#[test]
fn bad_batch_lists_and_missing_images_are_refused_by_name() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let images = tmp.path().join("in");
    fs::create_dir_all(&images).expect("mkdir");
    for bad in ["0", "x", "1,0", "2,,4"] {
        let run = bench(&images, &["--batch", bad]);
        assert_eq!(run.status.code(), Some(1), "--batch {bad}");
        let err = stderr(&run);
        assert!(err.contains("--batch"), "{bad}: {err}");
        assert!(err.contains(bad), "{bad}: {err}");
    }
    // An empty folder: nothing to time.
    let run = bench(&images, &[]);
    assert_eq!(run.status.code(), Some(1));
    assert!(stderr(&run).contains("no images found"), "{}", stderr(&run));
    assert!(stderr(&run).contains("--images"), "{}", stderr(&run));
    let run = bench(&images, &["--iterations", "0"]);
    assert_eq!(run.status.code(), Some(1));
    assert!(stderr(&run).contains("--iterations"), "{}", stderr(&run));
}
