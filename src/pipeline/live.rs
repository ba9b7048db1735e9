//! What a pipeline shows the live page (issue 18): its latest overlay as a JPEG, and per query one area sample
//! per second over the last ten minutes. The output thread feeds both (`observe`, one call per frame written);
//! the daemon's HTTP side (`daemon/live.rs`) reads them.
//!
//! The overlay is rendered and JPEG-encoded only while someone watches: the frames go through a tokio `watch`
//! channel, and `observe` encodes only when it has receivers. A watch keeps only the latest value, so a slow
//! viewer skips frames instead of holding them back, and the output thread never waits for a viewer. `close`
//! (the pipeline's end: removed by a reload, or the daemon's shutdown) drops the sender, which ends every
//! viewer's stream.
//!
//! The history is bounded: `HISTORY_SECONDS` samples per query, and only the queries the pipeline runs now (a
//! query renamed or removed by a reload loses its series at the next frame).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::Segmented;
use crate::sink::encode::OVERLAY_ALPHA;
use crate::sink::overlay::{self, OverlayFormat};

/// How far back the per-query history goes, in one-second samples.
pub const HISTORY_SECONDS: u64 = 600;

/// One overlay, encoded.
#[derive(Debug)]
pub struct LiveFrame {
    /// The frame's sequence number in its pipeline: distinct per frame.
    pub sequence: u64,
    /// When the frame was received, ms since the Unix epoch.
    pub wall_ms: u64,
    pub jpeg: Vec<u8>,
}

/// The latest overlay, shared with every viewer; None before the first frame watched.
pub type LiveFrames = watch::Receiver<Option<Arc<LiveFrame>>>;

/// One query's samples: (unix second, largest area fraction seen in it), oldest first.
type Series = VecDeque<(u64, f32)>;

/// A pipeline's live overlay and query history.
pub struct LiveTap {
    /// None once the pipeline has ended: no new viewer subscribes, and the streams of the old ones end.
    frames: Mutex<Option<watch::Sender<Option<Arc<LiveFrame>>>>>,
    history: Mutex<BTreeMap<String, Series>>,
}

/// One query's history as the HTTP side reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryHistory {
    /// Unix ms of the start of each second sampled.
    pub t_ms: Vec<u64>,
    /// The largest area fraction (0..1) of that second's frames.
    pub area: Vec<f32>,
}

impl Default for LiveTap {
    fn default() -> Self {
        LiveTap {
            frames: Mutex::new(Some(watch::Sender::new(None))),
            history: Mutex::new(BTreeMap::new()),
        }
    }
}

impl LiveTap {
    /// A viewer's receiver of the latest overlays; None when the pipeline has ended. Holding it is what makes
    /// the output thread encode them.
    pub fn subscribe(&self) -> Option<LiveFrames> {
        self.frames
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(watch::Sender::subscribe)
    }

    /// Ends every viewer's stream: the pipeline has stopped.
    pub fn close(&self) {
        self.frames.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// The per-query history of the last `seconds` (at most `HISTORY_SECONDS`) before `now_ms`.
    pub fn history(&self, seconds: u64, now_ms: u64) -> BTreeMap<String, QueryHistory> {
        let since = (now_ms / 1000).saturating_sub(seconds.min(HISTORY_SECONDS));
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        history
            .iter()
            .map(|(name, series)| {
                let kept = series.iter().filter(|(s, _)| *s > since);
                (
                    name.clone(),
                    QueryHistory {
                        t_ms: kept.clone().map(|(s, _)| s * 1000).collect(),
                        area: kept.map(|(_, a)| *a).collect(),
                    },
                )
            })
            .collect()
    }

    /// One segmented frame: its per-query areas into the history, and its overlay to the viewers if any.
    pub fn observe(&self, item: &Segmented) {
        let queries = &item.queries.queries;
        let seg = &item.segmentation;
        let labels = queries.output_labels(seg, item.queries.settings.background.is_some());
        let mut counts = vec![0u64; queries.label_count()];
        for &label in &labels {
            if let Some(c) = counts.get_mut(label as usize) {
                *c += 1;
            }
        }
        let pixels = labels.len().max(1) as f64;
        let areas: Vec<(String, f32)> = queries
            .specs
            .iter()
            .zip(&queries.labels)
            .filter(|(spec, &label)| !spec.background && label != 0)
            .map(|(spec, &label)| {
                let count = counts.get(label as usize).copied().unwrap_or(0);
                (spec.name.trim().to_string(), (count as f64 / pixels) as f32)
            })
            .collect();
        self.record(item.frame.wall_ms / 1000, &areas);
        let sender = self
            .frames
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(sender) = sender else { return };
        if sender.receiver_count() == 0 {
            return;
        }
        let image = overlay::render(&item.frame.image, &labels, &queries.palette, OVERLAY_ALPHA);
        match overlay::encode(&image, OverlayFormat::Jpeg) {
            Ok(jpeg) => {
                sender.send_replace(Some(Arc::new(LiveFrame {
                    sequence: item.frame.sequence,
                    wall_ms: item.frame.wall_ms,
                    jpeg,
                })));
            }
            Err(e) => tracing::debug!("live overlay not encoded: {e:#}"),
        }
    }

    /// Adds one frame's areas at unix second `second`: the largest of a second's frames is its sample. Series of
    /// queries not in `areas` (renamed or removed) are dropped, and samples older than `HISTORY_SECONDS`.
    fn record(&self, second: u64, areas: &[(String, f32)]) {
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        history.retain(|name, _| areas.iter().any(|(n, _)| n == name));
        for (name, area) in areas {
            let series = history.entry(name.clone()).or_default();
            match series.back_mut() {
                Some((s, max)) if *s == second => *max = max.max(*area),
                // A clock stepped back: keep the series ordered by starting again from here.
                Some((s, _)) if *s > second => {
                    series.clear();
                    series.push_back((second, *area));
                }
                _ => series.push_back((second, *area)),
            }
            while series
                .front()
                .is_some_and(|(s, _)| *s + HISTORY_SECONDS <= second)
            {
                series.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_sample_per_second_holds_the_largest_area_and_old_ones_go() {
        let tap = LiveTap::default();
        tap.record(1000, &[("cat".into(), 0.2)]);
        tap.record(1000, &[("cat".into(), 0.5)]);
        tap.record(1000, &[("cat".into(), 0.1)]);
        tap.record(1001, &[("cat".into(), 0.0)]);
        let h = tap.history(600, 1_001_500);
        assert_eq!(h["cat"].t_ms, vec![1_000_000, 1_001_000]);
        assert_eq!(h["cat"].area, vec![0.5, 0.0]);
        // Ten minutes later the first samples are gone; the series never grows past HISTORY_SECONDS.
        for s in 1002..1002 + 2 * HISTORY_SECONDS {
            tap.record(s, &[("cat".into(), 0.3)]);
        }
        let h = tap.history(HISTORY_SECONDS, (1001 + 2 * HISTORY_SECONDS) * 1000);
        assert_eq!(h["cat"].t_ms.len() as u64, HISTORY_SECONDS);
        assert!(h["cat"].t_ms[0] > 1_001_000);
        // `seconds` narrows the window.
        let h = tap.history(10, (1001 + 2 * HISTORY_SECONDS) * 1000);
        assert_eq!(h["cat"].t_ms.len(), 10);
    }

    #[test]
    fn a_query_renamed_or_removed_loses_its_series() {
        let tap = LiveTap::default();
        tap.record(5, &[("cat".into(), 0.2), ("dog".into(), 0.1)]);
        tap.record(6, &[("kitten".into(), 0.3), ("dog".into(), 0.4)]);
        let h = tap.history(600, 7000);
        assert_eq!(h.keys().collect::<Vec<_>>(), vec!["dog", "kitten"]);
        assert_eq!(h["dog"].area, vec![0.1, 0.4]);
    }

    #[test]
    fn closing_ends_the_viewers_and_refuses_new_ones() {
        let tap = LiveTap::default();
        let mut viewer = tap.subscribe().expect("open");
        tap.close();
        assert!(tap.subscribe().is_none());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert!(runtime.block_on(viewer.changed()).is_err());
    }
}
