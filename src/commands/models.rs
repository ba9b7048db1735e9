//! `tclseg models list | verify | export` (`bench` lives in `bench.rs`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};

use tclseg::model::bundle::{Bundle, MANIFEST_FILE};
use tclseg::model::verify;
use tclseg::model::{Precision, Runtime};
use tclseg::trainer;

use crate::cli::{ExportArgs, ModelsCommand, PrecisionArg};

pub fn run(cmd: ModelsCommand) -> Result<ExitCode> {
    match cmd {
        ModelsCommand::List { dirs } => list(dirs),
        ModelsCommand::Verify {
            dir,
            precision,
            threads,
        } => verify(&dir, precision, threads),
        ModelsCommand::Export(args) => export(args),
        ModelsCommand::Bench(args) => super::bench::run(args),
    }
}

fn list(dirs: Vec<PathBuf>) -> Result<ExitCode> {
    let dirs = if dirs.is_empty() {
        default_model_dirs()
    } else {
        dirs
    };
    let mut found = 0;
    for root in &dirs {
        let Ok(entries) = std::fs::read_dir(root) else {
            tracing::debug!(dir = %root.display(), "model folder not readable; skipped");
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths
            .into_iter()
            .filter(|p| p.join(MANIFEST_FILE).is_file())
        {
            match Bundle::open_unverified(&path) {
                Ok(bundle) => {
                    found += 1;
                    let m = bundle.manifest();
                    let source = m
                        .provenance
                        .get("source")
                        .and_then(|v| v.as_str())
                        .unwrap_or("unknown");
                    let precisions: Vec<&str> = m
                        .graphs
                        .get("image_trunk")
                        .map(|p| p.keys().map(String::as_str).collect())
                        .unwrap_or_default();
                    println!(
                        "{:<24} v{:<6} {:<10} {:<10} {:<16} {:>9.1} MB  {}",
                        m.name,
                        m.version,
                        source,
                        precisions.join(","),
                        m.head_names().join(","),
                        bundle.total_bytes() as f64 / 1e6,
                        path.display()
                    );
                }
                Err(err) => tracing::warn!("{err}"),
            }
        }
    }
    if found == 0 {
        let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        tracing::info!(
            "no model bundles found in {}; create one with `tclseg models export`",
            searched.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn default_model_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("TCLSEG_MODELS")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    dirs.push(PathBuf::from("models"));
    dirs
}

pub(super) fn verify(dir: &Path, precision: PrecisionArg, threads: usize) -> Result<ExitCode> {
    let start = Instant::now();
    let bundle = Bundle::open(dir)?;
    let m = bundle.manifest();
    tracing::info!(
        "{}: manifest ok, {} files match their sha256 ({:.1} MB) in {:.1} s",
        dir.display(),
        m.files.len(),
        bundle.total_bytes() as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    let runtime = Runtime::get()?;
    tracing::info!("ONNX Runtime from {}", runtime.library().display());
    let loaded = verify::load_all_graphs(&bundle, threads)?;
    tracing::info!("all {loaded} graphs load");

    let has_fp16 = m.graphs.values().any(|p| p.contains_key("fp16"));
    let precisions: Vec<Precision> = match precision {
        PrecisionArg::Fp32 => vec![Precision::Fp32],
        PrecisionArg::Fp16 if !has_fp16 => bail!("bundle {} has no fp16 graphs", dir.display()),
        PrecisionArg::Fp16 => vec![Precision::Fp16],
        PrecisionArg::All if has_fp16 => vec![Precision::Fp32, Precision::Fp16],
        PrecisionArg::All => vec![Precision::Fp32],
    };
    for p in precisions {
        for run in verify::run_one_crop(&bundle, p, threads)? {
            let outputs: Vec<String> = run
                .outputs
                .iter()
                .map(|(name, shape)| format!("{name} {shape:?}"))
                .collect();
            println!(
                "{:<5} {:<13} {:<5} load {:>8.1} ms  run {:>8.1} ms  {}",
                p.key(),
                run.role,
                run.precision.key(),
                run.load_ms,
                run.run_ms,
                outputs.join(", ")
            );
        }
    }
    println!(
        "ok: {} (v{}) verified in {:.1} s",
        m.name,
        m.version,
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn export(args: ExportArgs) -> Result<ExitCode> {
    let mut py: Vec<String> = Vec::new();
    if let Some(size) = &args.random {
        py.extend([
            "--random".into(),
            size.clone(),
            "--seed".into(),
            args.seed.to_string(),
        ]);
    }
    if let Some(clip) = &args.clip {
        py.extend(["--clip".into(), path_arg(clip)]);
        if let Some(tcl) = &args.tcl {
            py.extend(["--tcl".into(), path_arg(tcl)]);
        }
        if args.allow_unverified_clip {
            py.push("--allow-unverified-clip".into());
        }
    }
    if let Some(ckpt) = &args.checkpoint {
        py.extend(["--checkpoint".into(), path_arg(ckpt)]);
    }
    py.extend([
        "--out".into(),
        path_arg(&args.out),
        "--precision".into(),
        args.precision.clone(),
    ]);
    if let Some(heads) = &args.heads {
        py.extend(["--heads".into(), heads.clone()]);
    }
    if let Some(name) = &args.name {
        py.extend(["--name".into(), name.clone()]);
    }
    if args.force {
        py.push("--force".into());
    }
    let code = trainer::run_module("export", &py)?;
    if code != 0 {
        tracing::error!(
            "export did not complete (the trainer exited with status {code}); nothing was written"
        );
        return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
    }
    Ok(ExitCode::SUCCESS)
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
