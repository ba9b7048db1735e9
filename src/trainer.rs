//! Driving the Python trainer (`trainer/`) from Rust: `tclseg models export` (and `train`, later) run its
//! modules in the Python environment that `scripts/setup` made, so there is one implementation of the model.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

const SOURCE_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// The Python interpreter: `TCLSEG_PYTHON`, else the setup's `.venv` in this source tree.
pub fn python() -> Result<PathBuf> {
    let path = match std::env::var_os("TCLSEG_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(SOURCE_DIR).join(".venv/bin/python"),
    };
    if !path.is_file() {
        bail!(
            "the trainer's Python environment is missing: {} does not exist. Run scripts/setup, or set \
             TCLSEG_PYTHON to a Python with trainer/requirements.lock installed",
            path.display()
        );
    }
    Ok(path)
}

/// The trainer package's folder: `TCLSEG_TRAINER_DIR`, else `trainer/` in this source tree.
pub fn trainer_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("TCLSEG_TRAINER_DIR") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(SOURCE_DIR).join("trainer"),
    };
    if !dir.join("tclseg_trainer").is_dir() {
        bail!(
            "the trainer package is missing: {} has no tclseg_trainer/. Set TCLSEG_TRAINER_DIR to the \
             trainer/ folder of a tclseg checkout",
            dir.display()
        );
    }
    Ok(dir)
}

/// A `python` command with the trainer package on PYTHONPATH and unbuffered output; the caller adds the arguments
/// (`-m tclseg_trainer.<module> ...` or `-m torch.distributed.run ...`).
pub fn python_command() -> Result<Command> {
    let python = python()?;
    let dir = trainer_dir()?;
    let mut pythonpath = std::ffi::OsString::from(dir.as_os_str());
    if let Some(existing) = std::env::var_os("PYTHONPATH") {
        pythonpath.push(":");
        pythonpath.push(existing);
    }
    let mut cmd = Command::new(python);
    cmd.env("PYTHONPATH", pythonpath)
        .env("PYTHONUNBUFFERED", "1");
    Ok(cmd)
}

/// Runs `python -m tclseg_trainer.<module> args...` with the terminal's stdio; the module prints its own progress
/// and errors. Returns the module's exit code (0 success, 1 failure it explained, 2 usage).
pub fn run_module(module: &str, args: &[String]) -> Result<i32> {
    let python = python()?;
    tracing::debug!(python = %python.display(), module, ?args, "running the trainer");
    let status = python_command()?
        .arg("-m")
        .arg(format!("tclseg_trainer.{module}"))
        .args(args)
        .status()
        .with_context(|| format!("cannot start {}", python.display()))?;
    match status.code() {
        Some(code) => Ok(code),
        None => bail!("the trainer (tclseg_trainer.{module}) was killed by a signal"),
    }
}
