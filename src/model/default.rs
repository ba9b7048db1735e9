//! Which bundle runs when none is named: `--model` (or `model.path`), else `$TCLSEG_MODEL`, else
//! `models/default`, else the tiny bundle built into tclseg (models/synthetic-shapes, embedded by build.rs).
//! `segment`, `serve`, `eval` and `models bench` all call `resolve_bundle_dir`, so the rule is written once, in
//! the library, and the daemon needs no callback from the binary to follow it.
//!
//! The built-in bundle is unpacked on first use into the user's cache folder, keyed by the manifest's hash,
//! written to a temporary folder and renamed so a crash never leaves half of it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

mod files {
    include!(concat!(env!("OUT_DIR"), "/builtin_model.rs"));
}

/// `dir` (the `--model` flag or the config's `model.path`), else `$TCLSEG_MODEL`, else `models/default` when it
/// holds a bundle, else the built-in bundle (unpacked if it is not yet).
pub fn resolve_bundle_dir(dir: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = dir.or_else(|| std::env::var_os("TCLSEG_MODEL").map(PathBuf::from)) {
        return Ok(dir);
    }
    let default = PathBuf::from("models/default");
    if default.join("model.toml").is_file() {
        return Ok(default);
    }
    extract_builtin().context("cannot unpack the built-in model")
}

/// Unpacks the built-in bundle (if not already there) and returns its folder.
fn extract_builtin() -> Result<PathBuf> {
    let Some((_, manifest)) = files::FILES.iter().find(|(name, _)| *name == "model.toml") else {
        bail!("this build has no built-in model; pass --model DIR (create one with `tclseg models export`)");
    };
    let key = hex::encode(&Sha256::digest(manifest)[..8]);
    let cache = cache_dir().join(format!("builtin-{key}"));
    if cache.join("model.toml").is_file() {
        return Ok(cache);
    }
    let parent = cache.parent().unwrap_or(&cache).to_path_buf();
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".builtin-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a temporary folder in {}", parent.display()))?;
    for (name, bytes) in files::FILES {
        std::fs::write(tmp.path().join(name), bytes)
            .with_context(|| format!("cannot write {}", tmp.path().join(name).display()))?;
    }
    let staged = tmp.keep();
    if let Err(err) = std::fs::rename(&staged, &cache) {
        // Another process may have unpacked it first; theirs is as good as ours.
        let _ = std::fs::remove_dir_all(&staged);
        if !cache.join("model.toml").is_file() {
            return Err(err)
                .with_context(|| format!("cannot move the built-in model to {}", cache.display()));
        }
    }
    tracing::info!(
        "using the built-in model (synthetic-shapes: a small TCL trained on generated shapes; it knows colour \
         names, not the real world) unpacked at {}",
        cache.display()
    );
    Ok(cache)
}

/// `$XDG_CACHE_HOME/tclseg`, else `~/.cache/tclseg`, else a folder in the system's temporary directory.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("tclseg");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache/tclseg"),
        None => std::env::temp_dir().join("tclseg-cache"),
    }
}
