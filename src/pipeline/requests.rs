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

/// `queries` with the thresholds a request gives by query name (as `threshold` in a `[[query]]` table: pixels
/// of that query scoring under it become background). Refuses a name that is no query of the set, and a
/// background query (its pixels are background already). The values were range-checked by the caller.
pub fn with_thresholds(
    queries: &QuerySet,
    thresholds: &[(String, f32)],
) -> Result<QuerySet, String> {
    let mut specs = queries.specs.clone();
    for (name, threshold) in thresholds {
        let wanted = name.trim().to_lowercase();
        let Some(spec) = specs
            .iter_mut()
            .find(|s| s.name.trim().to_lowercase() == wanted)
        else {
            let known: Vec<&str> = queries.specs.iter().map(|s| s.name.trim()).collect();
            return Err(format!(
                "threshold: no query is named '{name}' (the queries: {})",
                known.join(", ")
            ));
        };
        if spec.background {
            return Err(format!(
                "threshold: '{name}' is a background query; its pixels are background already"
            ));
        }
        spec.threshold = Some(*threshold);
    }
    QuerySet::new(specs).map_err(|e| format!("{e:#}"))
}

/// A running pipeline's queries with a request's settings and thresholds over them: what the request gives
/// replaces the pipeline's resolved value, the rest stays the pipeline's (so `pamr=false` alone keeps its
/// background threshold). The text embeddings are shared, not recomputed. Unchanged when nothing is given, so
/// such a request may share a batch with the pipeline's frames.
pub fn overridden(
    prepared: &Arc<PipelineQueries>,
    overrides: SettingsOverrides,
    thresholds: &[(String, f32)],
) -> Result<Arc<PipelineQueries>, String> {
    let SettingsOverrides {
        pamr,
        bg_thresh,
        kp_weight,
    } = overrides;
    if pamr.is_none() && bg_thresh.is_none() && kp_weight.is_none() && thresholds.is_empty() {
        return Ok(Arc::clone(prepared));
    }
    let mut settings = prepared.settings;
    if let Some(t) = bg_thresh {
        if settings.background.is_none() {
            return Err(
                "bg_thresh: this pipeline's background comes from its background queries, not a threshold"
                    .into(),
            );
        }
        settings.background = Some(t);
    }
    settings.pamr = pamr.unwrap_or(settings.pamr);
    settings.kp_weight = kp_weight.unwrap_or(settings.kp_weight);
    Ok(Arc::new(PipelineQueries {
        queries: with_thresholds(&prepared.queries, thresholds)?,
        text: Arc::clone(&prepared.text),
        settings,
        model_sha256: prepared.model_sha256.clone(),
    }))
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

    /// Requests waiting now (some may have been given up on by their clients).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// The most that may wait.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Drops every waiting request: their clients see the daemon stopping.
    pub(super) fn discard(&self) {
        self.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{SegmentSettings, TextEmbeddings};
    use crate::queries::QuerySpec;

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

    fn pipeline_queries(specs: Vec<QuerySpec>, background: Option<f32>) -> Arc<PipelineQueries> {
        Arc::new(PipelineQueries {
            queries: QuerySet::new(specs).expect("queries"),
            text: Arc::new(TextEmbeddings {
                rows: 0,
                dim: 0,
                data: Vec::new(),
                thresholds: Vec::new(),
            }),
            settings: SegmentSettings {
                pamr: true,
                kp_weight: 0.3,
                background,
                keep_scores: false,
                head: None,
                query_thresholds: true,
            },
            model_sha256: "abc".into(),
        })
    }

    fn spec(name: &str, background: bool) -> QuerySpec {
        QuerySpec {
            name: name.into(),
            prompts: Vec::new(),
            colour: None,
            threshold: None,
            background,
        }
    }

    #[test]
    fn thresholds_go_to_the_named_query_and_settings_over_the_pipelines() {
        let prepared = pipeline_queries(vec![spec("car", false), spec("road", false)], Some(0.4));
        let same = overridden(&prepared, SettingsOverrides::default(), &[]).expect("same");
        assert!(
            Arc::ptr_eq(&same, &prepared),
            "nothing given: the pipeline's own"
        );

        let given = SettingsOverrides {
            pamr: Some(false),
            bg_thresh: Some(0.8),
            kp_weight: None,
        };
        let changed = overridden(&prepared, given, &[("ROAD".into(), 0.6)]).expect("changed");
        assert_eq!(changed.settings.background, Some(0.8));
        assert!(!changed.settings.pamr);
        assert_eq!(changed.settings.kp_weight, 0.3, "not given: the pipeline's");
        assert_eq!(changed.queries.specs[1].threshold, Some(0.6));
        assert_eq!(changed.queries.specs[0].threshold, None);
        assert!(Arc::ptr_eq(&changed.text, &prepared.text));

        let why = overridden(
            &prepared,
            SettingsOverrides::default(),
            &[("sky".into(), 0.5)],
        )
        .expect_err("unknown query");
        assert!(why.contains("'sky'") && why.contains("car, road"), "{why}");

        let with_prompts = pipeline_queries(vec![spec("car", false), spec("sky", true)], None);
        let bg = SettingsOverrides {
            bg_thresh: Some(0.5),
            ..SettingsOverrides::default()
        };
        assert!(overridden(&with_prompts, bg, &[])
            .expect_err("no threshold background")
            .contains("bg_thresh"));
        assert!(
            with_thresholds(&with_prompts.queries, &[("sky".into(), 0.5)])
                .expect_err("background query")
                .contains("background query")
        );
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
        assert_eq!((queue.len(), queue.capacity()), (2, 2));
        assert_eq!(doorbell.count(), 2, "each queued request wakes the worker");
        drop(first_answer);
        let taken = queue.pop().expect("the second is still wanted");
        assert!(!taken.reply.is_closed());
        assert!(queue.pop().is_none() && queue.is_empty());
    }
}
