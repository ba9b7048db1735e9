//! Terminal tables for evaluation reports: per class for one dataset, and the paper's summary row for a suite.

use std::fmt::Write as _;

use super::datasets::{spec, PAPER_SUITE, PAPER_TCL_PAMR};
use super::run::EvalReport;

fn cell(v: Option<f64>) -> String {
    v.map_or("   n/a".into(), |v| format!("{v:6.2}"))
}

/// Per-class IoU and accuracy, then mIoU and pixel accuracy.
pub fn class_table(report: &EvalReport) -> String {
    let width = report
        .classes
        .iter()
        .map(|c| c.name.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = String::new();
    let _ = writeln!(out, "{:<width$}  {:>6}  {:>6}", "class", "IoU", "Acc");
    for c in &report.classes {
        let _ = writeln!(
            out,
            "{:<width$}  {}  {}",
            c.name,
            cell(c.iou),
            cell(c.accuracy)
        );
    }
    let _ = writeln!(
        out,
        "{}: {} images, mIoU {:.2}, pixel accuracy {:.2}",
        report.dataset, report.images, report.miou, report.pixel_accuracy
    );
    out
}

/// The paper's table: one row of mIoU per dataset in the paper's column order, the average, and the paper's
/// TCL (PAMR) numbers for comparison.
pub fn suite_table(reports: &[EvalReport]) -> String {
    let titles: Vec<&str> = PAPER_SUITE
        .iter()
        .map(|k| spec(k).map_or(*k, |s| s.title))
        .collect();
    let mut out = String::new();
    let _ = write!(out, "{:<12}", "");
    for t in &titles {
        let _ = write!(out, "{t:>10}");
    }
    let _ = writeln!(out, "{:>10}", "Avg");
    let _ = write!(out, "{:<12}", "this model");
    let mut sum = 0.0;
    let mut n = 0;
    for key in PAPER_SUITE {
        match reports.iter().find(|r| r.dataset == key) {
            Some(r) => {
                let _ = write!(out, "{:>10.1}", r.miou);
                sum += r.miou;
                n += 1;
            }
            None => {
                let _ = write!(out, "{:>10}", "-");
            }
        }
    }
    if n == PAPER_SUITE.len() {
        let _ = writeln!(out, "{:>10.1}", sum / n as f64);
    } else {
        let _ = writeln!(out, "{:>10}", "-");
    }
    let _ = write!(out, "{:<12}", "paper (TCL)");
    for v in PAPER_TCL_PAMR {
        let _ = write!(out, "{v:>10.1}");
    }
    let _ = writeln!(out);
    out
}
