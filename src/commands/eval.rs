//! `tclseg eval`: one dataset or the paper's suite; per-class tables on stdout, a JSON report, a progress bar.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};

use tclseg::eval::datasets::{self, Dataset, PAPER_SUITE};
use tclseg::eval::report;
use tclseg::eval::run::{evaluate, EvalJob, EvalProgress, EvalReport, Predictor};
use tclseg::model::bundle::TCL_PROTOCOL;

use crate::cli::EvalArgs;

pub fn run(args: EvalArgs) -> Result<ExitCode> {
    let shard = super::segment::batch_shard(&args.shard)?;
    if shard.is_some() && args.save_predictions.is_none() && args.predictions.is_none() {
        tracing::warn!(
            "--shard without --save-predictions: this shard's mIoU is of its share only, and the shards' scores \
             cannot be combined; save every shard's predictions in one folder, then score them together with \
             `tclseg eval --predictions DIR`"
        );
    }
    let keys: Vec<String> = match (&args.dataset, &args.suite) {
        (Some(d), None) => vec![d.clone()],
        (None, Some(s)) if s == "paper" => PAPER_SUITE.iter().map(|k| k.to_string()).collect(),
        (None, Some(s)) => bail!("--suite {s}: the only suite is `paper`"),
        _ => bail!("give --dataset NAME or --suite paper"),
    };
    // Open every dataset first: a missing folder is reported before any model is loaded.
    let mut sets: Vec<Dataset> = Vec::new();
    for key in &keys {
        sets.push(open(key, &args.root)?);
    }
    // A method's protocol has settings per dataset (its short side, logit scale, threshold): one engine per
    // dataset then, else one for all.
    let engine_per_dataset =
        args.refine.protocol.as_deref().unwrap_or(TCL_PROTOCOL) != TCL_PROTOCOL && keys.len() > 1;
    let open_engine = |dataset: Option<&str>| {
        super::segment::open_engine(args.model.clone(), &args.engine, &args.refine, dataset)
    };
    let shared = match &args.predictions {
        Some(_) => None,
        None if engine_per_dataset => None,
        None => Some(open_engine(keys.first().map(String::as_str))?),
    };
    let mut reports: Vec<EvalReport> = Vec::new();
    for (key, ds) in keys.iter().zip(&sets) {
        let own = match (&args.predictions, engine_per_dataset) {
            (None, true) => Some(open_engine(Some(key))?),
            _ => None,
        };
        let engine = own.as_ref().or(shared.as_ref());
        let predictor = match (engine, &args.predictions) {
            (Some(engine), _) => Predictor::Engine {
                engine,
                pamr: args.refine.pamr_override(),
                bg_thresh: args.refine.bg_thresh,
                head: args.refine.head.clone(),
            },
            (None, Some(dir)) => Predictor::Files(per_dataset(dir, key, keys.len())),
            (None, None) => bail!("no predictor"),
        };
        let job = EvalJob {
            dataset: ds,
            predictor,
            limit: args.limit,
            save_predictions: args
                .save_predictions
                .as_ref()
                .map(|d| per_dataset(d, key, keys.len())),
            jobs: args.jobs,
            shard,
        };
        let bar = Bar::new(key);
        let report = evaluate(&job, &bar)?;
        bar.finish();
        println!("{}", report::class_table(&report));
        reports.push(report);
    }
    if keys.len() > 1 {
        println!("{}", report::suite_table(&reports));
    }
    if let Some(out) = &args.out {
        let json = if reports.len() == 1 {
            serde_json::to_vec_pretty(&reports[0])?
        } else {
            serde_json::to_vec_pretty(&serde_json::json!({ "suite": "paper", "reports": reports }))?
        };
        tclseg::sink::write_atomic(out, &json)?;
        println!("report: {}", out.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn open(key: &str, root: &std::path::Path) -> Result<Dataset> {
    if key == "folder" {
        return datasets::open_folder(root);
    }
    match datasets::spec(key) {
        Some(spec) => spec.open(root),
        None => bail!(
            "unknown dataset '{key}' (known: {}, folder)",
            datasets::DATASETS.map(|d| d.key).join(", ")
        ),
    }
}

/// A suite keeps each dataset's predictions in its own sub-folder.
fn per_dataset(dir: &std::path::Path, key: &str, count: usize) -> PathBuf {
    if count > 1 {
        dir.join(key)
    } else {
        dir.to_path_buf()
    }
}

/// An indicatif bar on a terminal; otherwise a log line per 10 % done.
struct Bar {
    key: String,
    bar: std::sync::OnceLock<ProgressBar>,
    done: std::sync::atomic::AtomicUsize,
    total: std::sync::atomic::AtomicUsize,
}

impl Bar {
    fn new(key: &str) -> Bar {
        Bar {
            key: key.to_string(),
            bar: std::sync::OnceLock::new(),
            done: Default::default(),
            total: Default::default(),
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.get() {
            bar.finish_and_clear();
        }
    }
}

impl EvalProgress for Bar {
    fn start(&self, total: usize) {
        use std::sync::atomic::Ordering;
        self.total.store(total, Ordering::Relaxed);
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} {per_sec} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_message(self.key.clone());
            bar.enable_steady_tick(Duration::from_millis(250));
            let _ = self.bar.set(bar);
        } else {
            tracing::info!("{}: scoring {total} images", self.key);
        }
    }

    fn image_done(&self) {
        use std::sync::atomic::Ordering;
        if let Some(bar) = self.bar.get() {
            bar.inc(1);
            return;
        }
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        let total = self.total.load(Ordering::Relaxed).max(1);
        if done * 10 / total != (done - 1) * 10 / total {
            tracing::info!("{}: {done}/{total} images", self.key);
        }
    }
}
