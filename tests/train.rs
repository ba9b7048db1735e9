//! `tclseg train` runs real training steps through torchrun, evaluates, exports and verifies a bundle, and
//! resumes. Needs the setup's `.venv` (scripts/test runs scripts/setup first).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `tclseg ARGS` with training pinned to the CPU and one thread.
fn tclseg_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(common::tclseg_bin());
    cmd.args(args)
        .env("TCLSEG_TRAIN_DEVICE", "cpu")
        .env("TCLSEG_TRAIN_THREADS", "1")
        .env("OMP_NUM_THREADS", "1");
    cmd
}

fn tclseg(args: &[&str]) -> std::process::Output {
    tclseg_command(args).output().expect("run tclseg")
}

/// `tclseg train --resume --no-export` with a schedule of `steps`; asserts it succeeds and reaches the last step.
fn resume_to(dir: &Path, steps: u32) {
    let config = write_config(dir, steps);
    let out = tclseg(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--resume",
        "--no-export",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "resume failed: {stderr}");
    assert!(stderr.contains(&format!("step={steps}")), "{stderr}");
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

fn generate_world(dir: &Path) {
    let world = dir.join("world");
    python(&[
        "-m",
        "tclseg_trainer.tools.synthetic",
        "generate",
        "--out",
        world.to_str().unwrap(),
        "--train",
        "24",
        "--eval",
        "2",
    ]);
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
    generate_world(tmp.path());
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
    resume_to(tmp.path(), 4);
    assert!(run.join("ckpt-00000004.pt").is_file());
}

/// Ctrl-C as a terminal sends it: SIGINT to the whole process group (tclseg, torchrun and the trainer). Training
/// stops after its current step with exit status 130 and a checkpoint of that step, and `--resume` continues from it.
#[test]
fn ctrl_c_stops_with_a_checkpoint_that_resumes() {
    let tmp = tempfile::tempdir().expect("temp dir");
    generate_world(tmp.path());
    let config = write_config(tmp.path(), 100_000); // checkpoint.every = 2; eval.every = 3
    let mut child = tclseg_command(&["train", "--config", config.to_str().unwrap(), "--no-export"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start tclseg train");
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr pipe");
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // wait until a few steps have run
    let start = Instant::now();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(240).saturating_sub(start.elapsed()))
            .expect("no training progress within 240 s");
        if line.contains("training") && line.contains("step=5") {
            break;
        }
    }
    let pgid = format!("-{}", child.id());
    let status = Command::new("kill")
        .args(["-INT", "--", &pgid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -INT -- {pgid}");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "tclseg train did not stop within 120 s of Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = reader.join().expect("stderr reader");
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    let mut steps: Vec<u32> = std::fs::read_dir(tmp.path().join("run"))
        .expect("checkpoint dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_prefix("ckpt-")?.strip_suffix(".pt")?.parse().ok())
        .collect();
    steps.sort();
    let last = *steps.last().expect("a checkpoint after Ctrl-C");
    assert!(
        (5..100_000).contains(&last),
        "checkpoint step {last}: {stderr}"
    );

    // the newest checkpoint resumes: one more step
    resume_to(tmp.path(), last + 1);
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
