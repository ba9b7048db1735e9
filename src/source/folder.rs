//! The image-folder source: every image under a folder (recursively), in path order; in watch mode, then every
//! image that appears later. Names starting with '.' (temp files) are ignored; symlinked folders are not
//! followed.
//!
//! When an image has **arrived** (watch mode): its size and modification time have both held still for the
//! settle time (`folder_settle_s`, default 2 s) across scans. A copy that pauses for less than that is never read
//! half-written. One that pauses for longer may be read early; then it fails to decode (a cut PNG or JPEG is an
//! error, see `decode`), the failure is logged once and counted, and the file is read again once its size or
//! time changes and holds still again, up to `MAX_ATTEMPTS` times. An empty file is treated the same way, so a
//! file created empty and filled later is taken once filled. A file that cannot even be looked at (a symlink
//! loop, a dangling link, no permission) is reported once and looked at again on every scan.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use super::decode::{decode, DEFAULT_MAX_PIXELS};
use super::inputs;
use super::sequence::FrameSequence;
use super::stream::RunEnd;
use super::{FolderMode, Frame, FrameIntake};
use crate::telemetry::{DropReason, PipelineMetrics};

/// How often a watched folder is scanned.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How long a file's size and modification time must hold still before it is read (per pipeline:
/// `folder_settle_s`). Two seconds outlasts the pauses of ordinary copies (network shares, `scp`, cameras
/// writing over FTP) while keeping an inbox responsive.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(2);

/// Reads of one file before it is given up (each after the file changed). Five covers a copy that stalls a few
/// times; a file rewritten forever with bad data is not read forever.
pub const MAX_ATTEMPTS: u32 = 5;

/// What identifies a version of a file: a change in either means it is still being written, or was replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    modified: Option<SystemTime>,
}

/// A file seen but not taken yet (still settling, or failed and waiting for a change).
#[derive(Debug)]
struct Candidate {
    stamp: Stamp,
    /// When `stamp` was first seen.
    since: Instant,
    /// Reads that failed so far.
    attempts: u32,
    /// The version that failed last: it is not read again until the file changes.
    failed: Option<Stamp>,
}

/// What a folder source remembers across attempts (a restart never reprocesses an image).
#[derive(Debug, Default)]
pub struct FolderState {
    done: HashSet<PathBuf>,
    candidates: HashMap<PathBuf, Candidate>,
    /// Whether the previous scan found no images (None before the first), so an empty folder is reported once
    /// per change, not once per scan.
    was_empty: Option<bool>,
    /// Paths whose problem (unreadable file or folder) has been logged, so each is logged once while it lasts.
    reported: HashSet<PathBuf>,
}

pub fn run(
    dir: &Path,
    mode: FolderMode,
    settle: Duration,
    state: &mut FolderState,
    intake: &dyn FrameIntake,
    metrics: &PipelineMetrics,
    sequence: &FrameSequence,
) -> RunEnd {
    loop {
        if intake.stopping() {
            return RunEnd::Stopped;
        }
        if !dir.is_dir() {
            return RunEnd::Failed(format!("folder {} does not exist", dir.display()));
        }
        let found = match scan(dir, &mut state.reported) {
            Ok(found) => found,
            Err(e) => return RunEnd::Failed(format!("cannot list folder {}: {e}", dir.display())),
        };
        metrics.connected.store(true, Ordering::Relaxed);
        state.note_emptiness(dir, found.is_empty());
        let ready = state.observe(found, mode, settle, Instant::now());
        if !ready.is_empty() {
            // The folder's own expansion names the outputs, exactly as `segment` would for this folder.
            let images = match inputs::expand(&[dir.display().to_string()]) {
                Ok(images) => images,
                Err(e) => return RunEnd::Failed(format!("{e:#}")),
            };
            for image in images {
                let Some(&stamp) = ready.get(&image.path) else {
                    continue;
                };
                if intake.stopping() {
                    return RunEnd::Stopped;
                }
                let received = Instant::now();
                metrics.frame_in();
                match decode(&image.path, DEFAULT_MAX_PIXELS) {
                    Ok(rgb) => {
                        state.candidates.remove(&image.path);
                        state.done.insert(image.path.clone());
                        let frame = Frame {
                            image: rgb,
                            sequence: sequence.next(),
                            pts_ns: None,
                            captured: received,
                            received,
                            wall_ms: crate::telemetry::unix_ms(),
                            file: Some((image.name.clone(), image.path.clone())),
                        };
                        if !intake.push(frame) {
                            return RunEnd::Stopped;
                        }
                    }
                    Err(e) => {
                        metrics.drop_frames(DropReason::DecodeError, 1);
                        state.failed(&image.path, stamp, mode, &e);
                    }
                }
            }
        }
        if mode == FolderMode::Once {
            return RunEnd::Finished;
        }
        let until = Instant::now() + POLL_INTERVAL;
        while Instant::now() < until {
            if intake.stopping() {
                return RunEnd::Stopped;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl FolderState {
    fn note_emptiness(&mut self, dir: &Path, empty: bool) {
        if empty && self.was_empty != Some(true) {
            tracing::warn!(
                "folder {} holds no images ({}); watching for new ones",
                dir.display(),
                inputs::IMAGE_EXTENSIONS.join(", ")
            );
        }
        self.was_empty = Some(empty);
    }

    /// Updates what is known about each file found and returns those to read now, with the version read.
    fn observe(
        &mut self,
        found: Vec<(PathBuf, Stamp)>,
        mode: FolderMode,
        settle: Duration,
        now: Instant,
    ) -> HashMap<PathBuf, Stamp> {
        let present: HashSet<&PathBuf> = found.iter().map(|(path, _)| path).collect();
        // A file that went away starts afresh if it comes back.
        self.candidates.retain(|path, _| present.contains(path));
        let mut ready = HashMap::new();
        for (path, stamp) in found {
            if self.done.contains(&path) {
                continue;
            }
            let candidate = self
                .candidates
                .entry(path.clone())
                .or_insert_with(|| Candidate {
                    stamp,
                    since: now,
                    attempts: 0,
                    failed: None,
                });
            if candidate.stamp != stamp {
                candidate.stamp = stamp;
                candidate.since = now;
            }
            let settled = mode == FolderMode::Once || now.duration_since(candidate.since) >= settle;
            let changed_since_failure = candidate.failed != Some(stamp);
            if settled && changed_since_failure && candidate.attempts < MAX_ATTEMPTS {
                ready.insert(path, stamp);
            }
        }
        ready
    }

    /// Records a failed read: logged at WARN the first time and when giving up, at DEBUG in between.
    fn failed(
        &mut self,
        path: &Path,
        stamp: Stamp,
        mode: FolderMode,
        error: &dyn std::fmt::Display,
    ) {
        let Some(candidate) = self.candidates.get_mut(path) else {
            return;
        };
        candidate.attempts += 1;
        candidate.failed = Some(stamp);
        let attempts = candidate.attempts;
        if mode == FolderMode::Once {
            tracing::warn!("skipped: {error}");
        } else if attempts >= MAX_ATTEMPTS {
            tracing::warn!("skipped for good after {attempts} attempts: {error}");
        } else if attempts == 1 {
            tracing::warn!(
                "skipped for now: {error}; it is read again if the file changes (at most {MAX_ATTEMPTS} attempts)"
            );
        } else {
            tracing::debug!("attempt {attempts} failed: {error}");
        }
    }
}

/// Every image under `root` (not hidden, not under a symlinked folder) with its current stamp. A file or folder
/// that cannot be read is logged once (until it can be read again) and left out.
fn scan(root: &Path, reported: &mut HashSet<PathBuf>) -> std::io::Result<Vec<(PathBuf, Stamp)>> {
    let mut found = Vec::new();
    let mut folders = vec![root.to_path_buf()];
    let mut problems_seen = HashSet::new();
    while let Some(folder) = folders.pop() {
        let entries = match std::fs::read_dir(&folder) {
            Ok(entries) => entries,
            Err(e) if folder == root => return Err(e),
            Err(e) => {
                report_once(reported, &mut problems_seen, &folder, || {
                    format!(
                        "cannot list folder {}: {e}; its images are skipped",
                        folder.display()
                    )
                });
                continue;
            }
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                folders.push(path);
                continue;
            }
            if !inputs::is_image(&path) {
                continue;
            }
            // Follows a symlinked file to its target: that is what will be read.
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() => found.push((
                    path,
                    Stamp {
                        size: meta.len(),
                        modified: meta.modified().ok(),
                    },
                )),
                Ok(_) => {}
                Err(e) => report_once(reported, &mut problems_seen, &path, || {
                    format!(
                        "{}: cannot read it ({e}){}; skipped until that changes",
                        path.display(),
                        if kind.is_symlink() {
                            ": a dangling symlink or a symlink loop"
                        } else {
                            ""
                        }
                    )
                }),
            }
        }
    }
    // A problem that went away may be reported again if it comes back.
    reported.retain(|path| problems_seen.contains(path));
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

fn report_once(
    reported: &mut HashSet<PathBuf>,
    seen: &mut HashSet<PathBuf>,
    path: &Path,
    message: impl FnOnce() -> String,
) {
    seen.insert(path.to_path_buf());
    if reported.insert(path.to_path_buf()) {
        tracing::warn!("{}", message());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(size: u64) -> Stamp {
        Stamp {
            size,
            modified: None,
        }
    }

    #[test]
    fn a_file_is_ready_only_after_holding_still_for_the_settle_time() {
        let mut state = FolderState::default();
        let settle = Duration::from_secs(2);
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let a = PathBuf::from("/in/a.png");
        let seen = |size| vec![(a.clone(), stamp(size))];
        assert!(state
            .observe(seen(10), FolderMode::Watch, settle, at(0.0))
            .is_empty());
        assert!(state
            .observe(seen(20), FolderMode::Watch, settle, at(1.5))
            .is_empty());
        // Still growing at 1.5 s: the clock restarts there.
        assert!(state
            .observe(seen(20), FolderMode::Watch, settle, at(3.0))
            .is_empty());
        let ready = state.observe(seen(20), FolderMode::Watch, settle, at(3.6));
        assert_eq!(ready.get(&a), Some(&stamp(20)));
        // One-shot folders take what is there at once.
        let mut once = FolderState::default();
        assert_eq!(once.observe(seen(5), FolderMode::Once, settle, t0).len(), 1);
    }

    #[test]
    fn a_failed_file_is_read_again_only_after_it_changes_and_at_most_max_attempts_times() {
        let mut state = FolderState::default();
        let settle = Duration::ZERO;
        let now = Instant::now();
        let a = PathBuf::from("/in/a.jpg");
        let seen = |size| vec![(a.clone(), stamp(size))];
        for attempt in 0..MAX_ATTEMPTS as u64 {
            let ready = state.observe(seen(attempt), FolderMode::Watch, settle, now);
            assert_eq!(ready.len(), 1, "attempt {attempt}");
            state.failed(&a, stamp(attempt), FolderMode::Watch, &"bad");
            assert!(
                state
                    .observe(seen(attempt), FolderMode::Watch, settle, now)
                    .is_empty(),
                "unchanged after failing: not read again"
            );
        }
        assert!(
            state
                .observe(seen(99), FolderMode::Watch, settle, now)
                .is_empty(),
            "gave up"
        );
        // Deleted and written anew: a new file.
        assert!(state
            .observe(Vec::new(), FolderMode::Watch, settle, now)
            .is_empty());
        assert_eq!(
            state.observe(seen(7), FolderMode::Watch, settle, now).len(),
            1
        );
    }
}
