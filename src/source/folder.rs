//! The image-folder source: every image under a folder (recursively), in path order; in watch mode, then every
//! image that appears later. A file is taken only once its size has held still between two scans, so a file
//! being copied in is not read half-written; names starting with '.' (temp files) are ignored. An image that
//! cannot be decoded is skipped with its reason logged and counted; the rest go on.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::decode::{decode, DEFAULT_MAX_PIXELS};
use super::inputs;
use super::stream::RunEnd;
use super::{Frame, FrameSink};
use crate::config::FolderMode;
use crate::telemetry::{DropReason, PipelineMetrics};

/// How often a watched folder is scanned.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// What a folder source remembers across attempts (a restart never reprocesses an image).
#[derive(Debug, Default)]
pub struct FolderState {
    done: HashSet<PathBuf>,
    /// Size seen at the previous scan, for files not yet taken.
    pending: HashMap<PathBuf, u64>,
}

pub fn run(
    dir: &Path,
    mode: FolderMode,
    state: &mut FolderState,
    sink: &dyn FrameSink,
    metrics: &PipelineMetrics,
    sequence: &AtomicU64,
) -> RunEnd {
    loop {
        if sink.stopping() {
            return RunEnd::Stopped;
        }
        if !dir.is_dir() {
            return RunEnd::Failed(format!("folder {} does not exist", dir.display()));
        }
        let images = match inputs::expand(&[dir.display().to_string()]) {
            Ok(images) => images,
            Err(e) => return RunEnd::Failed(format!("{e:#}")),
        };
        metrics.connected.store(true, Ordering::Relaxed);
        for image in images {
            if state.done.contains(&image.path) || hidden(&image.path, dir) {
                continue;
            }
            if mode == FolderMode::Watch {
                let size = std::fs::metadata(&image.path).map(|m| m.len()).ok();
                let previous = state.pending.insert(image.path.clone(), size.unwrap_or(0));
                if size.is_none() || previous != size {
                    continue; // new or still growing: look again next scan
                }
            }
            state.pending.remove(&image.path);
            state.done.insert(image.path.clone());
            if sink.stopping() {
                return RunEnd::Stopped;
            }
            let received = Instant::now();
            metrics.frame_in();
            match decode(&image.path, DEFAULT_MAX_PIXELS) {
                Ok(rgb) => {
                    let frame = Frame {
                        image: rgb,
                        sequence: sequence.fetch_add(1, Ordering::Relaxed),
                        pts_ns: None,
                        captured: received,
                        received,
                        wall_ms: crate::telemetry::unix_ms(),
                        file: Some((image.name.clone(), image.path.clone())),
                    };
                    if !sink.push(frame) {
                        return RunEnd::Stopped;
                    }
                }
                Err(e) => {
                    tracing::warn!("skipped: {e}");
                    metrics.drop_frames(DropReason::DecodeError, 1);
                }
            }
        }
        if mode == FolderMode::Once && state.pending.is_empty() {
            return RunEnd::Finished;
        }
        let until = Instant::now() + POLL_INTERVAL;
        while Instant::now() < until {
            if sink.stopping() {
                return RunEnd::Stopped;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn hidden(path: &Path, root: &Path) -> bool {
    path.strip_prefix(root)
        .unwrap_or(path)
        .components()
        .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
}
