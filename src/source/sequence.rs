//! Frame numbers that never repeat for one pipeline's outputs, across restarts of the daemon and the pipeline.
//!
//! A frame's number is its `{frame}` in output paths, and the default template is `{date}/{frame}`. Numbers that
//! started at 0 on every start would give the first frames after a restart (or after a reload that restarts the
//! pipeline) the names of that day's earlier frames, and replace them. So numbers are handed out in blocks that
//! are reserved first (`sink::frame_numbers` keeps the reservation in the output folder): a start continues after
//! the last reservation, and a crash costs at most the unused rest of one block, as a gap, never a repeat. The
//! reservation is a callback so that sources know nothing of output folders.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Frame numbers reserved per reservation: one small write per this many frames.
pub const BLOCK: u64 = 1000;

/// Records that every number below its argument may have been handed out.
pub type Reserve = Box<dyn Fn(u64) -> anyhow::Result<()> + Send + Sync>;

/// Hands out increasing frame numbers.
pub struct FrameSequence {
    next: AtomicU64,
    /// The reservation callback and the first number not yet reserved. None: numbers from 0, in memory only.
    reserved: Option<(Reserve, Mutex<u64>)>,
}

impl std::fmt::Debug for FrameSequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSequence")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl FrameSequence {
    /// Numbers from 0, kept in memory (a pipeline whose numbers name no files, tests).
    pub fn in_memory() -> FrameSequence {
        FrameSequence {
            next: AtomicU64::new(0),
            reserved: None,
        }
    }

    /// Numbers from `start` (the first number no earlier run reserved), reserving a block at a time through
    /// `reserve`. Fails when the first block cannot be reserved: a pipeline that cannot write there could not
    /// write its outputs either.
    pub fn reserving(start: u64, reserve: Reserve) -> anyhow::Result<FrameSequence> {
        let end = start.saturating_add(BLOCK);
        reserve(end)?;
        Ok(FrameSequence {
            next: AtomicU64::new(start),
            reserved: Some((reserve, Mutex::new(end))),
        })
    }

    /// The next frame number. When it leaves the reserved block, the next block is reserved first; should that
    /// fail, numbering goes on (frames keep flowing) and the failure is logged.
    pub fn next(&self) -> u64 {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some((reserve, end)) = &self.reserved {
            let mut end = end.lock().unwrap_or_else(|p| p.into_inner());
            if n >= *end {
                let new_end = n.saturating_add(BLOCK);
                match reserve(new_end) {
                    Ok(()) => *end = new_end,
                    Err(e) => tracing::warn!(
                        "cannot reserve frame numbers from {n}: {e:#}; numbering goes on, but after a restart \
                         numbers from {n} may name files again"
                    ),
                }
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn reserves_a_block_ahead_and_continues_from_the_reservation() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&log);
        let s = FrameSequence::reserving(
            5000,
            Box::new(move |end| {
                seen.lock().expect("log").push(end);
                Ok(())
            }),
        )
        .expect("reserve");
        let numbers: Vec<u64> = (0..BLOCK + 2).map(|_| s.next()).collect();
        assert_eq!(numbers[0], 5000);
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1));
        // One reservation at the start, one when the first block ran out; none per frame.
        assert_eq!(
            *log.lock().expect("log"),
            vec![5000 + BLOCK, 5000 + 2 * BLOCK]
        );
    }

    #[test]
    fn a_first_reservation_that_fails_is_an_error() {
        let failing: Reserve = Box::new(|_| Err(anyhow::anyhow!("read-only")));
        assert!(FrameSequence::reserving(0, failing).is_err());
    }

    #[test]
    fn in_memory_numbers_start_at_zero() {
        let s = FrameSequence::in_memory();
        assert_eq!((s.next(), s.next()), (0, 1));
    }
}
