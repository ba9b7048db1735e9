//! Model swap without a restart: a reload that changes `[model]` loads the new bundle beside the running one while
//! a folder pipeline keeps receiving images, then swaps it in; frames flow before, during and after, the sidecars
//! written after the swap and `/status` name the new model, and a reload to a broken bundle keeps the old model
//! and says why; `/metrics` counts each swap by outcome and labels the serving model (`tclseg_model_info`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::config::{Config, Pipeline};
use common::daemon::Daemon;
use common::{fixture_bundle, wait_until, write_png};

/// A copy of the tiny fixture bundle under another name: model.toml hashes the graphs, not itself, so the copy
/// loads, and its manifest (hence its sha256) differs from the original's.
fn renamed_bundle(dir: &Path) -> PathBuf {
    let copy = copy_bundle(dir, "tiny-renamed");
    let manifest = copy.join("model.toml");
    let text = std::fs::read_to_string(&manifest).expect("model.toml");
    assert!(text.contains("name = \"tiny-random\""), "{text}");
    std::fs::write(
        &manifest,
        text.replace("name = \"tiny-random\"", "name = \"tiny-renamed\""),
    )
    .expect("write model.toml");
    copy
}

/// A copy of the fixture bundle with one graph changed after the fact: its sha256 no longer matches model.toml.
fn corrupted_bundle(dir: &Path) -> PathBuf {
    let copy = copy_bundle(dir, "tiny-corrupted");
    let graph = copy.join("mask_head.onnx");
    let mut bytes = std::fs::read(&graph).expect("graph");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&graph, bytes).expect("write graph");
    copy
}

fn copy_bundle(dir: &Path, name: &str) -> PathBuf {
    let copy = dir.join(name);
    std::fs::create_dir_all(&copy).expect("mkdir bundle");
    for entry in std::fs::read_dir(fixture_bundle()).expect("fixture bundle") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, copy.join(path.file_name().expect("name"))).expect("copy");
    }
    copy
}

/// `config` (same port, same pipelines) on another bundle.
fn on_bundle(config: &Config, bundle: &Path) -> Config {
    config
        .clone()
        .model(&format!("path = {:?}", bundle.display().to_string()))
}

/// The model `/status` names now: (name, manifest sha256).
fn serving(daemon: &Daemon) -> (String, String) {
    let status: serde_json::Value =
        serde_json::from_str(&daemon.get("/status").body).expect("status json");
    let model = &status["daemon"]["model"];
    // The precision the engine runs, why, the CPU flags and kernels behind it (the config asks for fp32).
    assert_eq!(model["precision"], "fp32", "{model}");
    assert_eq!(model["precision_reason"], "asked for", "{model}");
    assert!(model["cpu_flags"].is_array(), "{model}");
    assert!(
        model["kernels"]
            .as_str()
            .is_some_and(|k| k.starts_with("MLAS")),
        "{model}"
    );
    (
        model["name"].as_str().expect("model name").to_string(),
        model["manifest_sha256"]
            .as_str()
            .expect("model sha256")
            .to_string(),
    )
}

/// `/metrics`' model series: swaps (ok, failed), and the (sha256, name) of every `tclseg_model_info` series at 1.
fn model_metrics(daemon: &Daemon) -> ((f64, f64), Vec<(String, String)>) {
    let metrics = daemon.metrics();
    let swaps = (
        common::daemon::metric(&metrics, "tclseg_model_swaps_total", "outcome=\"ok\""),
        common::daemon::metric(&metrics, "tclseg_model_swaps_total", "outcome=\"failed\""),
    );
    let info = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("tclseg_model_info{sha256=\""))
        .filter(|l| l.ends_with("} 1"))
        .filter_map(|l| {
            let (sha, rest) = l.split_once("\",name=\"")?;
            let (name, _) = rest.split_once("\"}")?;
            Some((sha.to_string(), name.to_string()))
        })
        .collect();
    (swaps, info)
}

/// The model sha256 of each sidecar line in `jsonl`, in the order the frames were written.
fn sidecar_models(jsonl: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(jsonl).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["model"]["manifest_sha256"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_reload_swaps_the_model_while_frames_keep_flowing_and_a_broken_bundle_keeps_the_old_one() {
    let dir = tempfile::tempdir().expect("tmp");
    let inbox = dir.path().join("inbox");
    let out = dir.path().join("out");
    let pipeline = Pipeline::folder("door", &inbox, &out)
        .with("folder_settle_s = 0.2")
        .output("jsonl = true");
    let renamed = renamed_bundle(dir.path());
    let config = Config::new().pipeline(pipeline);
    let daemon = Daemon::start(dir.path(), &config);
    daemon.wait_ready();
    let (old_name, old_sha) = serving(&daemon);
    assert_eq!(old_name, "tiny-random");
    assert_eq!(
        model_metrics(&daemon),
        ((0.0, 0.0), vec![(old_sha.clone(), old_name.clone())])
    );

    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // Images arrive before, during and after each reload; written aside, then renamed in whole.
        s.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 400 {
                let aside = dir.path().join("aside.png");
                write_png(&aside, 96, 64);
                std::fs::rename(&aside, inbox.join(format!("frame-{n:04}.png"))).expect("rename");
                n += 1;
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        let frames = || daemon.frames_out("door");
        wait_until("frames before the swap", Duration::from_secs(60), || {
            frames() >= 2.0
        });

        // Swap to the renamed bundle.
        daemon.rewrite(&on_bundle(&config, &renamed));
        let reply = daemon.post("/reload", None);
        assert_eq!(reply.code, 200, "{}", reply.body);
        let report: serde_json::Value = serde_json::from_str(&reply.body).expect("report json");
        assert_eq!(report["model_error"], serde_json::Value::Null, "{report}");
        assert_eq!(report["needs_restart"], serde_json::json!([]), "{report}");
        let new_sha = report["model_swapped"]
            .as_str()
            .unwrap_or_else(|| panic!("no model_swapped in {report}"))
            .to_string();
        assert_ne!(new_sha, old_sha);
        assert_eq!(
            serving(&daemon),
            ("tiny-renamed".to_string(), new_sha.clone())
        );
        assert_eq!(
            model_metrics(&daemon),
            (
                (1.0, 0.0),
                vec![(new_sha.clone(), "tiny-renamed".to_string())]
            ),
            "one swap, one model serving"
        );
        let at_swap = frames();
        wait_until(
            "frames written by the new model",
            Duration::from_secs(60),
            || {
                frames() >= at_swap + 2.0
                    && sidecar_models(&out.join("door.jsonl")).contains(&new_sha)
            },
        );
        // Each frame names the model that produced it: the old one until the swap, the new one after, never
        // the old one again.
        let models = sidecar_models(&out.join("door.jsonl"));
        assert_eq!(models.first(), Some(&old_sha), "{models:?}");
        let first_new = models
            .iter()
            .position(|m| m == &new_sha)
            .expect("new model");
        assert!(
            models[first_new..].iter().all(|m| m == &new_sha),
            "{models:?}"
        );
        assert!(models.iter().all(|m| m == &old_sha || m == &new_sha));

        // A path that is no bundle folder is refused with the config; the model stays.
        daemon.rewrite(&on_bundle(&config, &dir.path().join("no-such-bundle")));
        let reply = daemon.post("/reload", None);
        assert_eq!(reply.code, 400, "{}", reply.body);
        assert!(reply.body.contains("no-such-bundle"), "{}", reply.body);
        assert_eq!(
            serving(&daemon),
            ("tiny-renamed".to_string(), new_sha.clone())
        );

        // A bundle that fails to load (a graph's hash) keeps the new model serving, says why, and frames keep
        // flowing.
        daemon.rewrite(&on_bundle(&config, &corrupted_bundle(dir.path())));
        let reply = daemon.post("/reload", None);
        assert_eq!(reply.code, 200, "{}", reply.body);
        let report: serde_json::Value = serde_json::from_str(&reply.body).expect("report json");
        assert_eq!(report["model_swapped"], serde_json::Value::Null, "{report}");
        let why = report["model_error"]
            .as_str()
            .unwrap_or_else(|| panic!("no model_error in {report}"));
        assert!(
            why.contains("tiny-corrupted") && why.contains("mask_head.onnx"),
            "{why}"
        );
        assert_eq!(
            serving(&daemon),
            ("tiny-renamed".to_string(), new_sha.clone())
        );
        assert!(daemon.log_text().contains("the model was not swapped"));
        // The failed load is counted; the model serving, still the renamed one, keeps its series (the config
        // refused at validation above was no swap at all).
        assert_eq!(
            model_metrics(&daemon),
            (
                (1.0, 1.0),
                vec![(new_sha.clone(), "tiny-renamed".to_string())]
            )
        );
        let status: serde_json::Value =
            serde_json::from_str(&daemon.get("/status").body).expect("status json");
        assert_eq!(
            status["model_swaps"],
            serde_json::json!({ "ok": 1, "failed": 1 })
        );
        let after_failure = frames();
        wait_until(
            "frames after the failed swap",
            Duration::from_secs(60),
            || frames() >= after_failure + 2.0,
        );
        stop.store(true, Ordering::Relaxed);
        assert!(sidecar_models(&out.join("door.jsonl"))
            .iter()
            .skip(first_new)
            .all(|m| m == &new_sha));
    });
}
