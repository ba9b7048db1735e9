//! A test event shared by the events tests (outbox, MQTT, webhooks), the MQTT broker harness, a log capture, a
//! webhook receiver (plain or TLS), the TLS tests' certificates, and what a serve run's sidecars call for (`expect`).
// Each test crate compiles its own copy.
#![allow(dead_code)]

pub mod broker;
pub mod expect;
pub mod logs;
pub mod pki;
pub mod receiver;

use tclseg::events::{Event, EventKind};

/// Event `n` of `pipeline`: id `<pipeline>:t:<n>#0`, frame time `n` ms, a quarter of the frame.
pub fn event(pipeline: &str, n: u64, kind: EventKind) -> Event {
    Event {
        id: format!("{pipeline}:t:{n}#0"),
        event: format!("{pipeline}:t:{n}"),
        kind,
        pipeline: pipeline.into(),
        query: "person".into(),
        zone: None,
        start_ms: n,
        end_ms: None,
        at_ms: n,
        area: 0.25,
        max_area: 0.25,
        bbox: Some([1, 2, 3, 4]),
        mean_score: Some(0.9),
        model: "hash".into(),
        head: Some("tcl".into()),
        outputs: None,
    }
}

/// Events of pipelines `a` and `b` (as [`event`] makes them) arrived in the order they were made, per pipeline.
pub fn assert_in_order_per_pipeline(events: &[Event]) {
    for p in ["a", "b"] {
        let times: Vec<u64> = events
            .iter()
            .filter(|e| e.pipeline == p)
            .map(|e| e.at_ms)
            .collect();
        assert!(
            times.windows(2).all(|w| w[0] < w[1]),
            "pipeline {p} out of order: {times:?}"
        );
    }
}
