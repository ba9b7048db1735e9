//! Images segmented on request (`POST /v1/segment`), outside any pipeline: they wait in one small bounded queue
//! that the inference worker serves as one more participant of its round robin, so a burst of requests takes
//! its turn beside the streams instead of ahead of them. A full queue refuses at once (the caller answers 429)
//! rather than making a client wait behind a backlog.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use image::RgbImage;
use tokio::sync::oneshot;

use super::queue::Doorbell;
use super::PipelineQueries;
use crate::model::{Engine, Segmentation, SettingsOverrides};
use crate::queries::QuerySet;

/// The queries a request is segmented with.
pub enum RequestQueries {
    /// A running pipeline's, embedded already.
    Pipeline(Arc<PipelineQueries>),
    /// Given with the request: embedded by the worker (the engine caches embeddings), on its thread.
    Given(QuerySet, SettingsOverrides),
}

impl RequestQueries {
    /// The embedded queries; embedding runs the text model, so only the worker calls this.
    pub(super) fn prepare(&self, engine: &Engine) -> anyhow::Result<Arc<PipelineQueries>> {
        match self {
            RequestQueries::Pipeline(prepared) => Ok(Arc::clone(prepared)),
            RequestQueries::Given(queries, overrides) => Ok(Arc::new(PipelineQueries::embed(
                engine, queries, *overrides,
            )?)),
        }
    }
}

/// What the worker answers: the segmentation with the image and queries it belongs to, or why it failed.
pub type SegmentAnswer = Result<SegmentReply, String>;

/// One image to segment and where to send the answer.
pub struct SegmentRequest {
    pub image: RgbImage,
    pub queries: RequestQueries,
    /// When the request was queued (its queue wait ends when the worker takes it).
    pub received: Instant,
    pub reply: oneshot::Sender<SegmentAnswer>,
}

/// A segmented request.
pub struct SegmentReply {
    pub image: RgbImage,
    pub segmentation: Segmentation,
    pub queries: Arc<PipelineQueries>,
    /// The engine that segmented it (the model its sidecar names).
    pub engine: Arc<Engine>,
    /// How long it waited for the worker, and its share of its batch's inference time.
    pub queued: Duration,
    pub infer: Duration,
}

/// A request refused because the queue was full (the caller answers 429).
#[derive(Debug)]
pub struct QueueFull;

/// The bounded queue of requests waiting for the worker.
pub struct RequestQueue {
    waiting: Mutex<VecDeque<SegmentRequest>>,
    capacity: usize,
    doorbell: Arc<Doorbell>,
}

impl RequestQueue {
    pub fn new(capacity: usize, doorbell: Arc<Doorbell>) -> RequestQueue {
        RequestQueue {
            waiting: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            doorbell,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<SegmentRequest>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `request` and wakes the worker; refuses it (dropped) when the queue is full.
    pub fn try_push(&self, request: SegmentRequest) -> Result<(), QueueFull> {
        let mut waiting = self.lock();
        if waiting.len() >= self.capacity {
            return Err(QueueFull);
        }
        waiting.push_back(request);
        drop(waiting);
        self.doorbell.ring();
        Ok(())
    }

    /// The oldest request whose client still waits; those given up on (the connection closed) are dropped.
    pub(super) fn pop(&self) -> Option<SegmentRequest> {
        let mut waiting = self.lock();
        while let Some(request) = waiting.pop_front() {
            if !request.reply.is_closed() {
                return Some(request);
            }
        }
        None
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Drops every waiting request: their clients see the daemon stopping.
    pub(super) fn discard(&self) {
        self.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> (SegmentRequest, oneshot::Receiver<SegmentAnswer>) {
        let (reply, answer) = oneshot::channel();
        let queries = QuerySet::from_names(&["cat".to_string()]).expect("queries");
        (
            SegmentRequest {
                image: RgbImage::new(2, 2),
                queries: RequestQueries::Given(queries, SettingsOverrides::default()),
                received: Instant::now(),
                reply,
            },
            answer,
        )
    }

    #[test]
    fn a_full_queue_refuses_and_abandoned_requests_are_skipped() {
        let doorbell = Arc::new(Doorbell::default());
        let queue = RequestQueue::new(2, Arc::clone(&doorbell));
        let (first, first_answer) = request();
        let (second, _second_answer) = request();
        let (third, _) = request();
        assert!(queue.try_push(first).is_ok());
        assert!(queue.try_push(second).is_ok());
        assert!(queue.try_push(third).is_err(), "over capacity");
        assert_eq!(doorbell.count(), 2, "each queued request wakes the worker");
        drop(first_answer);
        let taken = queue.pop().expect("the second is still wanted");
        assert!(!taken.reply.is_closed());
        assert!(queue.pop().is_none() && queue.is_empty());
    }
}
