//! A test event shared by the events tests (outbox, MQTT, webhooks), and the MQTT broker harness.
// Each test crate compiles its own copy.
#![allow(dead_code)]

pub mod broker;
pub mod expect;

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
        outputs: None,
    }
}
