//! `tclseg train --config FILE [--gpus N] [--resume]`: validates the config with the trainer, launches torchrun,
//! turns the trainer's JSON progress lines into log lines, then exports the best (else newest) checkpoint to a
//! bundle and verifies it. Ctrl-C reaches the trainer, which finishes its step, writes a checkpoint and stops;
//! `--resume` continues from it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use tclseg::trainer;

use crate::cli::{PrecisionArg, TrainArgs};

/// Exit status after Ctrl-C: the run stopped with a resumable checkpoint.
const INTERRUPTED: u8 = 130;

pub fn run(args: TrainArgs) -> Result<ExitCode> {
    if args.gpus == 0 {
        bail!("--gpus must be at least 1");
    }
    let config = args
        .config
        .canonicalize()
        .with_context(|| format!("{}: config file not found", args.config.display()))?;
    let checked = check_config(&config)?;
    let ckpt_dir = PathBuf::from(
        checked["checkpoint"]["dir"]
            .as_str()
            .context("the trainer's config check returned no checkpoint.dir")?,
    );
    let crop = checked["eval"]["crop"].as_u64().unwrap_or(448);
    tracing::info!(config = %config.display(), checkpoints = %ckpt_dir.display(), "config ok");

    let interrupted = Arc::new(AtomicBool::new(false));
    watch_ctrl_c(interrupted.clone());
    let status = launch(&config, &args, &interrupted)?;
    if interrupted.load(Ordering::SeqCst) {
        tracing::warn!(
            "stopped by Ctrl-C; the newest checkpoint in {} resumes with --resume",
            ckpt_dir.display()
        );
        return Ok(ExitCode::from(INTERRUPTED));
    }
    if status != 0 {
        bail!("training failed (torchrun exit status {status}); see the messages above");
    }
    if args.no_export {
        return Ok(ExitCode::SUCCESS);
    }
    let checkpoint = pick_checkpoint(&ckpt_dir)?;
    let out = args
        .export
        .clone()
        .unwrap_or_else(|| ckpt_dir.join("bundle"));
    tracing::info!(checkpoint = %checkpoint.display(), bundle = %out.display(), "exporting");
    let code = trainer::run_module(
        "export",
        &[
            "--checkpoint".into(),
            checkpoint.display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "--crop-size".into(),
            crop.to_string(),
            "--force".into(),
        ],
    )?;
    if code != 0 {
        bail!(
            "exporting {} failed (exit status {code})",
            checkpoint.display()
        );
    }
    super::models::verify(&out, PrecisionArg::Fp32, 0)
}

/// `python -m tclseg_trainer.train --config F --check`: the trainer validates the config and opens the data; its
/// resolved config comes back as JSON.
fn check_config(config: &Path) -> Result<Value> {
    let output = trainer::python_command()?
        .args(["-m", "tclseg_trainer.train", "--check", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .context("cannot run the trainer's config check")?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        bail!(
            "{}: invalid training config: {}",
            config.display(),
            err.trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v: Value = serde_json::from_str(line)
        .with_context(|| format!("unexpected config check output {line:?}"))?;
    Ok(v["config"].clone())
}

fn watch_ctrl_c(flag: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            // The handler replaces the default "exit at once": the trainer (same process group) gets the signal,
            // writes a checkpoint and exits; this process waits for it.
            while tokio::signal::ctrl_c().await.is_ok() {
                flag.store(true, Ordering::SeqCst);
                tracing::warn!("Ctrl-C: the trainer finishes its step and writes a checkpoint");
            }
        });
    });
}

/// torchrun (`python -m torch.distributed.run --standalone --nproc-per-node N`) with stdout parsed line by line.
fn launch(config: &Path, args: &TrainArgs, interrupted: &AtomicBool) -> Result<i32> {
    let mut cmd = trainer::python_command()?;
    cmd.args(["-m", "torch.distributed.run", "--standalone"])
        .arg(format!("--nproc-per-node={}", args.gpus))
        .args(["-m", "tclseg_trainer.train", "--config"])
        .arg(config);
    if args.resume {
        cmd.arg("--resume");
    }
    if let Some(n) = args.max_steps {
        cmd.arg(format!("--max-steps={n}"));
    }
    tracing::info!(
        processes = args.gpus,
        resume = args.resume,
        "launching torchrun"
    );
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start torchrun")?;
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let errors = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !line.trim().is_empty() {
                tracing::warn!(target: "tclseg::trainer", "{line}");
            }
        }
    });
    let stdout = child.stdout.take().context("no stdout pipe")?;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        log_event(&line, interrupted);
    }
    let status = child.wait().context("waiting for torchrun")?;
    let _ = errors.join();
    Ok(status.code().unwrap_or(-1))
}

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

/// One trainer output line as a log line (non-JSON lines pass through as they are).
fn log_event(line: &str, interrupted: &AtomicBool) {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        if !line.trim().is_empty() {
            tracing::info!(target: "tclseg::trainer", "{line}");
        }
        return;
    };
    match v["event"].as_str().unwrap_or("") {
        "progress" => tracing::info!(
            step = v["step"].as_u64().unwrap_or(0),
            steps = v["steps"].as_u64().unwrap_or(0),
            loss = num(&v, "loss"),
            tcli = num(&v, "tcli"),
            tclf = num(&v, "tclf"),
            area_pos = num(&v, "area_pos"),
            area_neg = num(&v, "area_neg"),
            tv_emb = num(&v, "tv_emb"),
            tv_mask = num(&v, "tv_mask"),
            lr = num(&v, "lr"),
            samples_per_s = num(&v, "samples_per_s"),
            eta_s = num(&v, "eta_s"),
            skipped = v["skipped"].as_u64().unwrap_or(0),
            "training"
        ),
        "eval" => tracing::info!(
            step = v["step"].as_u64().unwrap_or(0),
            miou = num(&v, "miou"),
            "evaluation"
        ),
        "checkpoint" => tracing::info!(
            step = v["step"].as_u64().unwrap_or(0),
            path = v["path"].as_str().unwrap_or(""),
            "checkpoint"
        ),
        "interrupted" => {
            interrupted.store(true, Ordering::SeqCst);
            tracing::warn!(
                step = v["step"].as_u64().unwrap_or(0),
                "training interrupted"
            )
        }
        "done" => tracing::info!(
            step = v["step"].as_u64().unwrap_or(0),
            best_miou = num(&v, "best_miou"),
            "training done"
        ),
        other => tracing::info!(target: "tclseg::trainer", event = other, "{line}"),
    }
}

/// best.pt when an evaluation ran, else the newest periodic checkpoint.
fn pick_checkpoint(dir: &Path) -> Result<PathBuf> {
    let best = dir.join("best.pt");
    if best.is_file() {
        return Ok(best);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list the checkpoints", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ckpt-") && n.ends_with(".pt"))
        })
        .collect();
    found.sort();
    found
        .pop()
        .with_context(|| format!("{}: training ended without a checkpoint", dir.display()))
}
