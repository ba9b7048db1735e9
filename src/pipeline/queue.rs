//! A pipeline's frame queue between its source thread and the inference worker, with a named policy:
//! `Latest` holds one frame and a newer one replaces it (counted as `superseded`), so latency stays bounded when
//! inference is slower than the camera; `Lossless` holds a few and makes the source wait, so files and folders
//! lose nothing. Pushing rings the inference worker's doorbell.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::config::QueuePolicy;
use crate::source::Frame;
use crate::telemetry::{DropReason, PipelineMetrics};

/// Wakes the inference worker when any pipeline has a frame.
#[derive(Debug, Default)]
pub struct Doorbell {
    rung: Mutex<u64>,
    cv: Condvar,
}

impl Doorbell {
    pub fn ring(&self) {
        let mut n = self.rung.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.wrapping_add(1);
        self.cv.notify_all();
    }

    /// Waits until rung after `seen` or the timeout; returns the current count.
    pub fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        let n = self.rung.lock().unwrap_or_else(|e| e.into_inner());
        let (n, _) = self
            .cv
            .wait_timeout_while(n, timeout, |n| *n == seen)
            .unwrap_or_else(|e| e.into_inner());
        *n
    }

    pub fn count(&self) -> u64 {
        *self.rung.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct FrameQueue {
    policy: QueuePolicy,
    capacity: usize,
    frames: Mutex<VecDeque<Frame>>,
    space: Condvar,
    closed: AtomicBool,
    doorbell: Arc<Doorbell>,
    metrics: Arc<PipelineMetrics>,
}

/// Frames a lossless queue holds before its source waits.
pub const LOSSLESS_DEPTH: usize = 4;

impl FrameQueue {
    pub fn new(
        policy: QueuePolicy,
        doorbell: Arc<Doorbell>,
        metrics: Arc<PipelineMetrics>,
    ) -> FrameQueue {
        FrameQueue {
            policy,
            capacity: match policy {
                QueuePolicy::Latest => 1,
                QueuePolicy::Lossless => LOSSLESS_DEPTH,
            },
            frames: Mutex::new(VecDeque::new()),
            space: Condvar::new(),
            closed: AtomicBool::new(false),
            doorbell,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Frame>> {
        self.frames.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a frame per the policy. False once the queue is closed (the frame is dropped).
    pub fn push(&self, frame: Frame) -> bool {
        let mut q = self.lock();
        match self.policy {
            QueuePolicy::Latest => {
                let replaced = q.len() as u64;
                q.clear();
                if replaced > 0 {
                    self.metrics.drop_frames(DropReason::Superseded, replaced);
                }
            }
            QueuePolicy::Lossless => {
                while q.len() >= self.capacity && !self.closed.load(Ordering::Relaxed) {
                    q = self
                        .space
                        .wait_timeout(q, Duration::from_millis(100))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        if self.closed.load(Ordering::Relaxed) {
            self.metrics.drop_frames(DropReason::Shutdown, 1);
            return false;
        }
        q.push_back(frame);
        self.metrics
            .queue_depth
            .store(q.len() as u64, Ordering::Relaxed);
        drop(q);
        self.doorbell.ring();
        true
    }

    pub fn pop(&self) -> Option<Frame> {
        let mut q = self.lock();
        let frame = q.pop_front();
        self.metrics
            .queue_depth
            .store(q.len() as u64, Ordering::Relaxed);
        drop(q);
        self.space.notify_all();
        frame
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Refuses further frames and wakes a waiting source.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.space.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Drops every queued frame (counted as `shutdown`).
    pub fn discard(&self) {
        let mut q = self.lock();
        let n = q.len() as u64;
        q.clear();
        self.metrics.queue_depth.store(0, Ordering::Relaxed);
        if n > 0 {
            self.metrics.drop_frames(DropReason::Shutdown, n);
        }
        self.space.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn frame(sequence: u64) -> Frame {
        Frame {
            image: image::RgbImage::new(2, 2),
            sequence,
            pts_ns: None,
            captured: Instant::now(),
            received: Instant::now(),
            wall_ms: 0,
            file: None,
        }
    }

    #[test]
    fn latest_keeps_the_freshest_and_counts_the_rest() {
        let metrics = Arc::new(PipelineMetrics::default());
        let q = FrameQueue::new(QueuePolicy::Latest, Arc::default(), Arc::clone(&metrics));
        for i in 0..5 {
            assert!(q.push(frame(i)));
        }
        assert_eq!(q.pop().map(|f| f.sequence), Some(4));
        assert!(q.pop().is_none());
        assert_eq!(metrics.drops(DropReason::Superseded), 4);
    }

    #[test]
    fn lossless_blocks_the_producer_until_there_is_room() {
        let metrics = Arc::new(PipelineMetrics::default());
        let q = Arc::new(FrameQueue::new(
            QueuePolicy::Lossless,
            Arc::default(),
            metrics,
        ));
        for i in 0..LOSSLESS_DEPTH as u64 {
            assert!(q.push(frame(i)));
        }
        let producer = {
            let q = Arc::clone(&q);
            std::thread::spawn(move || q.push(frame(99)))
        };
        std::thread::sleep(Duration::from_millis(150));
        assert!(
            !producer.is_finished(),
            "a full lossless queue must hold the source back"
        );
        assert_eq!(q.pop().map(|f| f.sequence), Some(0));
        assert!(producer.join().expect("join"));
        let order: Vec<u64> = std::iter::from_fn(|| q.pop().map(|f| f.sequence)).collect();
        assert_eq!(order, [1, 2, 3, 99]);
    }

    #[test]
    fn closing_releases_a_waiting_source() {
        let metrics = Arc::new(PipelineMetrics::default());
        let q = Arc::new(FrameQueue::new(
            QueuePolicy::Lossless,
            Arc::default(),
            Arc::clone(&metrics),
        ));
        for i in 0..LOSSLESS_DEPTH as u64 {
            q.push(frame(i));
        }
        let producer = {
            let q = Arc::clone(&q);
            std::thread::spawn(move || q.push(frame(9)))
        };
        q.close();
        assert!(!producer.join().expect("join"));
        q.discard();
        assert_eq!(
            metrics.drops(DropReason::Shutdown),
            1 + LOSSLESS_DEPTH as u64
        );
    }
}
