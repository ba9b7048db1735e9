//! Per-query presence for one pipeline: hysteresis on frame time, and the events its changes make.
//!
//! A query is *seen* in a frame when its pixel fraction (of the frame, or of a zone) is at least `min_area`. It
//! becomes *present* once it has been seen continuously for `on_s`, and absent again once it has been unseen for
//! `off_s`, so a mask that flickers for a frame neither starts nor ends anything. While present, an update goes
//! out at most every `update_s`. Times come from the frames, so tests (and replayed files) are deterministic.

use std::collections::BTreeMap;

use super::event::{Event, EventKind, FrameStats};
use super::zones::Zones;
use super::StateConfig;

/// Where one (query, zone) stands.
#[derive(Debug, Clone)]
enum Presence {
    /// Not present; `seen_since` is the first frame of the current run of sightings, if any.
    Absent { seen_since: Option<u64> },
    Present {
        event: String,
        start_ms: u64,
        messages: u64,
        last_sent_ms: u64,
        max_area: f64,
        /// The first frame of the current run of non-sightings, if any.
        unseen_since: Option<u64>,
    },
}

/// The presence state of every query (and zone) of one pipeline.
pub struct PipelineState {
    pipeline: String,
    config: StateConfig,
    zones: Zones,
    /// Distinguishes event ids of this process from those of an earlier run (ids must stay unique across restarts,
    /// since the outbox outlives the process).
    boot: String,
    next_event: u64,
    states: BTreeMap<(String, Option<String>), Presence>,
    /// The head of the last frame observed: the `end` events of `close` name it, as that frame's events did.
    head: Option<String>,
}

/// One (query, zone) measurement of a frame.
struct Sighting {
    area: f64,
    bbox: Option<[usize; 4]>,
    mean_score: Option<f64>,
}

impl PipelineState {
    /// `boot` should differ between runs of the daemon (e.g. the start time in ms); see [`boot_id`].
    pub fn new(
        pipeline: &str,
        config: StateConfig,
        zones: BTreeMap<String, Vec<[f64; 2]>>,
        boot: &str,
    ) -> PipelineState {
        PipelineState {
            pipeline: pipeline.to_string(),
            config,
            zones: Zones::new(zones),
            boot: boot.to_string(),
            next_event: 0,
            states: BTreeMap::new(),
            head: None,
        }
    }

    /// Feed one segmented frame; returns the events it makes, in order.
    pub fn observe(&mut self, frame: &FrameStats) -> Vec<Event> {
        self.head.clone_from(&frame.head);
        let mut measured: Vec<((String, Option<String>), Sighting)> = frame
            .queries
            .iter()
            .map(|q| {
                let s = Sighting {
                    area: q.fraction,
                    bbox: q.bbox,
                    mean_score: q.mean_score,
                };
                ((q.name.clone(), None), s)
            })
            .collect();
        if !self.zones.is_empty() {
            let labels: Vec<u16> = frame.queries.iter().map(|q| q.label).collect();
            let by_zone = self
                .zones
                .measure(&frame.labels, frame.width, frame.height, &labels);
            for (zone, areas) in by_zone {
                for q in &frame.queries {
                    if let Some(a) = areas.get(&q.label) {
                        let s = Sighting {
                            area: a.fraction,
                            bbox: a.bbox,
                            mean_score: None,
                        };
                        measured.push(((q.name.clone(), Some(zone.clone())), s));
                    }
                }
            }
        }
        // A query (or zone) that left the pipeline on a reload counts as unseen, so its presence ends after
        // `off_s` like any other instead of staying on forever; absent ones are forgotten.
        let current: std::collections::BTreeSet<_> =
            measured.iter().map(|(k, _)| k.clone()).collect();
        self.states
            .retain(|k, p| current.contains(k) || matches!(p, Presence::Present { .. }));
        let gone: Vec<_> = self
            .states
            .keys()
            .filter(|k| !current.contains(*k))
            .cloned()
            .collect();
        let unseen = gone.into_iter().map(|k| {
            let s = Sighting {
                area: 0.0,
                bbox: None,
                mean_score: None,
            };
            (k, s)
        });
        let mut events = Vec::new();
        for (key, sighting) in measured.into_iter().chain(unseen) {
            if let Some(e) = self.step(key, &sighting, frame) {
                events.push(e);
            }
        }
        events
    }

    /// End every present query (the pipeline is going away or its queries changed): an `end` at `at_ms`.
    pub fn close(&mut self, at_ms: u64, model: &str) -> Vec<Event> {
        let frame = FrameStats {
            pipeline: self.pipeline.clone(),
            at_ms,
            model: model.to_string(),
            head: self.head.clone(),
            ..FrameStats::default()
        };
        let keys: Vec<_> = self.states.keys().cloned().collect();
        let mut events = Vec::new();
        for key in keys {
            if let Some(Presence::Present { .. }) = self.states.get(&key) {
                let e = self.end(key, at_ms, &frame);
                events.push(e);
            }
        }
        self.states.clear();
        events
    }

    fn step(
        &mut self,
        key: (String, Option<String>),
        s: &Sighting,
        frame: &FrameStats,
    ) -> Option<Event> {
        let seen = s.area >= self.config.min_area && s.area > 0.0;
        let on_ms = secs_to_ms(self.config.on_s);
        let off_ms = secs_to_ms(self.config.off_s);
        let update_ms = secs_to_ms(self.config.update_s);
        let at = frame.at_ms;
        let state = self
            .states
            .entry(key.clone())
            .or_insert(Presence::Absent { seen_since: None });
        match state {
            Presence::Absent { seen_since } => {
                if !seen {
                    *seen_since = None;
                    return None;
                }
                let since = *seen_since.get_or_insert(at);
                if at.saturating_sub(since) < on_ms {
                    return None;
                }
                let event = format!("{}:{}:{}", self.pipeline, self.boot, self.next_event);
                self.next_event += 1;
                *state = Presence::Present {
                    event,
                    start_ms: since,
                    messages: 0,
                    last_sent_ms: at,
                    max_area: s.area,
                    unseen_since: None,
                };
                Some(self.message(&key, EventKind::Start, s, frame))
            }
            Presence::Present {
                unseen_since,
                last_sent_ms,
                max_area,
                ..
            } => {
                if seen {
                    *unseen_since = None;
                    *max_area = max_area.max(s.area);
                    if at.saturating_sub(*last_sent_ms) >= update_ms {
                        *last_sent_ms = at;
                        return Some(self.message(&key, EventKind::Update, s, frame));
                    }
                    return None;
                }
                let since = *unseen_since.get_or_insert(at);
                if at.saturating_sub(since) < off_ms {
                    return None;
                }
                Some(self.end(key, since, frame))
            }
        }
    }

    fn end(&mut self, key: (String, Option<String>), end_ms: u64, frame: &FrameStats) -> Event {
        let s = Sighting {
            area: 0.0,
            bbox: None,
            mean_score: None,
        };
        let mut e = self.message(&key, EventKind::End, &s, frame);
        e.end_ms = Some(end_ms);
        self.states
            .insert(key, Presence::Absent { seen_since: None });
        e
    }

    /// The message for `key`'s current presence (which must be `Present`).
    fn message(
        &mut self,
        key: &(String, Option<String>),
        kind: EventKind,
        s: &Sighting,
        frame: &FrameStats,
    ) -> Event {
        let (event, start_ms, n, max_area) = match self.states.get_mut(key) {
            Some(Presence::Present {
                event,
                start_ms,
                messages,
                max_area,
                ..
            }) => {
                *messages += 1;
                (event.clone(), *start_ms, *messages - 1, *max_area)
            }
            _ => (String::new(), frame.at_ms, 0, s.area),
        };
        Event {
            id: format!("{event}#{n}"),
            event,
            kind,
            pipeline: self.pipeline.clone(),
            query: key.0.clone(),
            zone: key.1.clone(),
            start_ms,
            end_ms: None,
            at_ms: frame.at_ms,
            area: s.area,
            max_area,
            bbox: s.bbox,
            mean_score: s.mean_score,
            model: frame.model.clone(),
            head: frame.head.clone(),
            outputs: frame.outputs.clone(),
        }
    }
}

/// A run identifier for event ids: the wall-clock start in ms, in hex. Two runs of one daemon in the same
/// millisecond are not a case worth more.
pub fn boot_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{ms:x}")
}

fn secs_to_ms(s: f64) -> u64 {
    if s.is_finite() && s > 0.0 {
        (s * 1000.0).round() as u64
    } else {
        0
    }
}
