//! Combining the reports of a sharded `segment` (`tclseg merge-reports DIR`): the totals of the whole set, and
//! which shards are missing, did not finish, or left images undone, so whoever runs the job engine knows which
//! indexes to run again (a rerun resumes: the images already done are skipped).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::run::{Outcome, Summary};
use crate::shard::Shard;

/// What the shard reports of one split say together.
#[derive(Debug, Default)]
pub struct Merged {
    /// The number of shards of the split.
    pub count: u32,
    /// The shards whose finished report was read.
    pub finished: Vec<u32>,
    /// Shards without a report: never run, or still starting.
    pub missing: Vec<u32>,
    /// Shards whose report says they started but never says they ended: killed, or still running.
    pub unfinished: Vec<u32>,
    /// Shards that finished with images failed or not attempted: (index, failed, not attempted).
    pub incomplete: Vec<(u32, usize, usize)>,
    /// Reports that could not be read, with why.
    pub unreadable: Vec<(u32, String)>,
    /// Sums over the finished shards.
    pub done: usize,
    pub skipped: usize,
    pub failed: usize,
    pub not_attempted: usize,
    pub images: usize,
    /// The sizes of the whole input set the shards saw: one value when they all expanded the same inputs.
    pub all_images: BTreeSet<usize>,
    pub failures: Vec<Outcome>,
}

impl Merged {
    /// Every shard finished and left nothing undone.
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
            && self.unfinished.is_empty()
            && self.incomplete.is_empty()
            && self.unreadable.is_empty()
    }
}

/// Reads the shard reports (`segment-report.<I>-of-<N>.json`) in `dir`. `count`: which split, when the folder
/// holds reports of several (else the one found).
pub fn merge_reports(dir: &Path, count: Option<u32>) -> Result<Merged> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the folder {}", dir.display()))?;
    let mut by_count: BTreeMap<u32, BTreeMap<u32, PathBuf>> = BTreeMap::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read the folder {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(shard) = parse_report_name(&name) {
            by_count
                .entry(shard.count)
                .or_default()
                .insert(shard.index, entry.path());
        }
    }
    let counts: Vec<u32> = by_count.keys().copied().collect();
    let count = match (count, counts.as_slice()) {
        (Some(n), _) => n,
        (None, []) => bail!(
            "no shard reports (segment-report.<I>-of-<N>.json) in {}: is it the --out of a `segment --shard` run?",
            dir.display()
        ),
        (None, [n]) => *n,
        (None, many) => bail!(
            "{} holds the reports of splits into {} shards: say which with --shards N",
            dir.display(),
            many.iter().map(u32::to_string).collect::<Vec<_>>().join(" and ")
        ),
    };
    if count == 0 {
        bail!("--shards 0: a split has at least 1 shard");
    }
    let reports = by_count.remove(&count).unwrap_or_default();
    let mut merged = Merged {
        count,
        ..Merged::default()
    };
    for index in 0..count {
        let Some(path) = reports.get(&index) else {
            merged.missing.push(index);
            continue;
        };
        let summary = match read_report(path, Shard { index, count }) {
            Ok(s) => s,
            Err(e) => {
                merged.unreadable.push((index, format!("{e:#}")));
                continue;
            }
        };
        if !summary.finished {
            merged.unfinished.push(index);
            continue;
        }
        merged.finished.push(index);
        if summary.failed > 0 || summary.not_attempted > 0 {
            merged
                .incomplete
                .push((index, summary.failed, summary.not_attempted));
        }
        merged.done += summary.done;
        merged.skipped += summary.skipped;
        merged.failed += summary.failed;
        merged.not_attempted += summary.not_attempted;
        merged.images += summary.images;
        merged.all_images.insert(summary.all_images);
        merged.failures.extend(summary.failures);
    }
    Ok(merged)
}

/// `segment-report.<I>-of-<N>.json` → shard I of N.
fn parse_report_name(name: &str) -> Option<Shard> {
    let tag = name
        .strip_prefix("segment-report.")?
        .strip_suffix(".json")?;
    let (i, n) = tag.split_once("-of-")?;
    Shard::new(i.parse().ok()?, n.parse().ok()?).ok()
}

fn read_report(path: &Path, shard: Shard) -> Result<Summary> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let summary: Summary = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a segment report", path.display()))?;
    if summary.shard != Some(shard) {
        bail!(
            "{} is named for shard {shard} but says it is {}",
            path.display(),
            summary
                .shard
                .map_or("no shard".to_string(), |s| format!("shard {s}"))
        );
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(dir: &Path, shard: Shard, finished: bool, done: usize, failed: usize) {
        let summary = Summary {
            shard: Some(shard),
            finished,
            all_images: 10,
            images: done + failed,
            done,
            skipped: 0,
            failed,
            not_attempted: 0,
            seconds: 1.0,
            images_per_second: 1.0,
            failures: Vec::new(),
            report: None,
        };
        let name = super::super::run::report_name(Some(&shard));
        std::fs::write(dir.join(name), serde_json::to_vec(&summary).unwrap()).unwrap();
    }

    #[test]
    fn names_missing_unfinished_failed_and_unreadable_shards() {
        let dir = tempfile::tempdir().unwrap();
        let s = |i| Shard::new(i, 5).unwrap();
        report(dir.path(), s(0), true, 3, 0);
        report(dir.path(), s(1), false, 0, 0);
        report(dir.path(), s(2), true, 2, 1);
        std::fs::write(dir.path().join("segment-report.3-of-5.json"), b"{ not json").unwrap();
        // Another split's report and an unsharded one are not this split's.
        report(dir.path(), Shard::new(0, 2).unwrap(), true, 9, 0);
        std::fs::write(dir.path().join("segment-report.json"), b"{}").unwrap();
        let m = merge_reports(dir.path(), Some(5)).unwrap();
        assert_eq!(m.finished, vec![0, 2]);
        assert_eq!(m.unfinished, vec![1]);
        assert_eq!(m.incomplete, vec![(2, 1, 0)]);
        assert_eq!(m.missing, vec![4]);
        assert_eq!(m.unreadable.len(), 1);
        assert_eq!(m.unreadable[0].0, 3);
        assert_eq!((m.done, m.failed), (5, 1));
        assert!(!m.complete());
        // Two splits in one folder: the count must be named.
        let err = format!("{:#}", merge_reports(dir.path(), None).unwrap_err());
        assert!(err.contains("2 and 5") && err.contains("--shards"), "{err}");
    }

    #[test]
    fn a_report_under_another_shards_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        report(dir.path(), Shard::new(0, 2).unwrap(), true, 1, 0);
        std::fs::rename(
            dir.path().join("segment-report.0-of-2.json"),
            dir.path().join("segment-report.1-of-2.json"),
        )
        .unwrap();
        let m = merge_reports(dir.path(), None).unwrap();
        assert_eq!(m.missing, vec![0]);
        assert!(
            m.unreadable[0].1.contains("says it is shard 0/2"),
            "{:?}",
            m.unreadable
        );
    }

    #[test]
    fn an_empty_folder_says_what_it_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!("{:#}", merge_reports(dir.path(), None).unwrap_err());
        assert!(err.contains("segment-report.<I>-of-<N>.json"), "{err}");
        let m = merge_reports(dir.path(), Some(2)).unwrap();
        assert_eq!(m.missing, vec![0, 1]);
    }
}
