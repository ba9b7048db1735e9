//! `tclseg train` runs real training steps through torchrun, evaluates, exports and verifies a bundle, and
//! resumes. Needs the setup's `.venv` (scripts/test runs scripts/setup first).

use std::path::Path;
use std::process::Command;

fn tclseg(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tclseg"))
        .args(args)
        .env("TCLSEG_TRAIN_DEVICE", "cpu")
        .env("TCLSEG_TRAIN_THREADS", "1")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("run tclseg")
}

fn python(args: &[&str]) {
    let root = env!("CARGO_MANIFEST_DIR");
    let status = Command::new(Path::new(root).join(".venv/bin/python"))
        .args(args)
        .env("PYTHONPATH", Path::new(root).join("trainer"))
        .status()
        .expect("run python");
    assert!(status.success(), "python {args:?}");
}

fn write_config(dir: &Path, steps: u32) -> std::path::PathBuf {
    let config = dir.join("train.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[model]
size = "tiny"
[data]
train = "world/train"
batch_size = 4
image_size = 64
workers = 0
shuffle_buffer = 8
resume = "fast-forward"
[optim]
steps = {steps}
warmup_steps = 1
unfreeze_step = 2
amp = "none"
[checkpoint]
dir = "run"
every = 2
keep_last = 2
[eval]
data = "world/eval"
every = 3
short_side = 64
crop = 64
[log]
every = 1
"#
        ),
    )
    .expect("write config");
    config
}

#[test]
fn train_a_few_steps_export_verify_and_resume() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let world = tmp.path().join("world");
    python(&[
        "-m",
        "tclseg_trainer.synthetic",
        "generate",
        "--out",
        world.to_str().unwrap(),
        "--train",
        "24",
        "--eval",
        "2",
    ]);
    let config = write_config(tmp.path(), 3);
    let out = tclseg(&["train", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "train failed: {stderr}");
    assert!(
        stderr.contains("training") && stderr.contains("step=3"),
        "{stderr}"
    );
    assert!(stderr.contains("evaluation"), "{stderr}");
    let run = tmp.path().join("run");
    assert!(run.join("best.pt").is_file());
    assert!(run.join("ckpt-00000003.pt").is_file());
    assert!(run.join("bundle/model.toml").is_file());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("verified"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // a longer schedule resumes from step 3
    let config = write_config(tmp.path(), 4);
    let out = tclseg(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--resume",
        "--no-export",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "resume failed: {stderr}");
    assert!(stderr.contains("step=4"), "{stderr}");
    assert!(run.join("ckpt-00000004.pt").is_file());
}

#[test]
fn bad_config_is_refused_with_its_key() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = tmp.path().join("bad.toml");
    std::fs::write(&config, "[data]\ntrain = \"x\"\nbatch = 3\n").expect("write");
    let out = tclseg(&["train", "--config", config.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("data.batch"), "{stderr}");
    let out = tclseg(&["train", "--config", "/nonexistent/train.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/train.toml"));
}
