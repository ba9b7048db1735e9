//! Presence hysteresis, update cadence, zones and the event JSON, driven by frame timestamps.

use tclseg::events::{EventKind, EventsConfig, FrameStats, PipelineState, QueryStats};

fn frame(at_ms: u64, fraction: f64) -> FrameStats {
    FrameStats {
        pipeline: "door".into(),
        at_ms,
        width: 4,
        height: 4,
        labels: Vec::new(),
        queries: vec![QueryStats {
            label: 1,
            name: "person".into(),
            fraction,
            bbox: (fraction > 0.0).then_some([0, 0, 2, 2]),
            mean_score: (fraction > 0.0).then_some(0.8),
        }],
        model: "abc123".into(),
        head: Some("naclip".into()),
        outputs: Some("/out/door/000001.json".into()),
    }
}

fn state() -> PipelineState {
    EventsConfig::default().pipeline_state("door", "b00t")
}

#[test]
fn defaults_work_untuned_and_unknown_keys_are_refused() {
    let c: EventsConfig = toml::from_str("").expect("empty section");
    assert_eq!(c, EventsConfig::default());
    assert!(
        (c.min_area - 0.01).abs() < 1e-12 && c.on_s == 1.0 && c.off_s == 5.0 && c.update_s == 10.0
    );
    let c: EventsConfig =
        toml::from_str("min_area = 0.2\n[zones.door]\nstep = [[0, 0], [4, 0], [4, 4]]\n")
            .expect("zones");
    assert_eq!(c.zones["door"]["step"].len(), 3);
    assert!(toml::from_str::<EventsConfig>("min_aera = 0.2").is_err());
}

#[test]
fn a_flicker_shorter_than_on_s_starts_nothing() {
    let mut s = state();
    let mut events = Vec::new();
    // Seen for 0.5 s, gone, seen again for 0.9 s: never a full second.
    for (t, f) in [
        (0, 0.1),
        (500, 0.1),
        (600, 0.0),
        (700, 0.1),
        (1600, 0.1),
        (1700, 0.0),
    ] {
        events.extend(s.observe(&frame(t, f)));
    }
    assert!(events.is_empty(), "{events:?}");
    // Below min_area does not count as seen.
    for t in (2000..5000).step_by(100) {
        events.extend(s.observe(&frame(t, 0.005)));
    }
    assert!(events.is_empty(), "{events:?}");
}

#[test]
fn start_updates_and_end_follow_frame_time() {
    let mut s = state();
    let mut events = Vec::new();
    // Present from 0 to 30 s at 10 fps, then absent for 10 s.
    for t in (0..=30_000).step_by(100) {
        events.extend(s.observe(&frame(t, 0.2)));
    }
    for t in (30_100..=40_000).step_by(100) {
        events.extend(s.observe(&frame(t, 0.0)));
    }
    let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Start,
            EventKind::Update,
            EventKind::Update,
            EventKind::End
        ],
        "{events:?}"
    );
    let start = &events[0];
    assert_eq!(
        (start.start_ms, start.at_ms),
        (0, 1000),
        "start dates back to the first sighting"
    );
    assert_eq!(events[1].at_ms, 11_000);
    assert_eq!(events[2].at_ms, 21_000);
    let end = &events[3];
    assert_eq!(end.end_ms, Some(30_100), "end is the first unseen frame");
    assert_eq!(end.at_ms, 35_100, "after off_s of absence");
    assert!(events
        .iter()
        .all(|e| e.event == start.event && e.start_ms == 0));
    let ids: std::collections::HashSet<_> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), 4, "every message has its own id");
    assert!(start.event.starts_with("door:b00t:"));
    // A second presence gets a new event id.
    let mut again = Vec::new();
    for t in (50_000..=52_000).step_by(100) {
        again.extend(s.observe(&frame(t, 0.2)));
    }
    assert_eq!(again.len(), 1);
    assert_ne!(again[0].event, start.event);
    // Closing the pipeline ends what is present.
    let closed = s.close(60_000, "abc123");
    assert_eq!(closed.len(), 1);
    assert_eq!(
        (closed[0].kind, closed[0].end_ms),
        (EventKind::End, Some(60_000))
    );
    assert_eq!(
        closed[0].head.as_deref(),
        Some("naclip"),
        "the last frame's head"
    );
}

#[test]
fn a_short_gap_shorter_than_off_s_does_not_end_the_presence() {
    let mut s = state();
    let mut events = Vec::new();
    for (t, f) in [
        (0, 0.2),
        (1000, 0.2),
        (2000, 0.0),
        (6000, 0.0),
        (6500, 0.2),
        (9000, 0.0),
    ] {
        events.extend(s.observe(&frame(t, f)));
    }
    assert_eq!(events.len(), 1, "{events:?}");
    events.extend(s.observe(&frame(14_000, 0.0)));
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].end_ms, Some(9000));
}

#[test]
fn zones_make_their_own_presence() {
    let config: EventsConfig = toml::from_str(
        "on_s = 0\n[zones.door]\nleft = [[0, 0], [2, 0], [2, 4], [0, 4]]\nright = [[2, 0], [4, 0], [4, 4], [2, 4]]\n",
    )
    .expect("config");
    let mut s = config.pipeline_state("door", "b");
    let mut f = frame(0, 0.25);
    // Label 1 fills the left column pair's top two rows: 4 of 8 left pixels, none of the right.
    f.labels = vec![0; 16];
    for i in [0, 1, 4, 5] {
        f.labels[i] = 1;
    }
    let events = s.observe(&f);
    let zones: Vec<_> = events.iter().map(|e| (e.zone.clone(), e.area)).collect();
    assert_eq!(
        zones,
        [(None, 0.25), (Some("left".to_string()), 0.5)],
        "{events:?}"
    );
    assert_eq!(events[1].bbox, Some([0, 0, 2, 2]));
    assert_eq!(events[1].mean_score, None);
}

#[test]
fn the_event_json_has_what_a_consumer_needs() {
    let mut s = EventsConfig {
        on_s: 0.0,
        ..EventsConfig::default()
    }
    .pipeline_state("door", "b");
    let events = s.observe(&frame(1_700_000_000_000, 0.3));
    let v: serde_json::Value = serde_json::from_slice(&events[0].to_json()).expect("json");
    for key in [
        "id",
        "event",
        "kind",
        "pipeline",
        "query",
        "start_ms",
        "at_ms",
        "area",
        "bbox",
        "mean_score",
        "model",
        "head",
        "outputs",
    ] {
        assert!(v.get(key).is_some(), "{key} missing in {v}");
    }
    assert_eq!(v["kind"], "start");
    assert_eq!(v["head"], "naclip", "the frame's head");
    assert_eq!(v["bbox"], serde_json::json!([0, 0, 2, 2]));
    assert!(v.get("zone").is_none() && v.get("end_ms").is_none());
    let back: tclseg::events::Event = serde_json::from_value(v).expect("round trip");
    assert_eq!(back, events[0]);
}

#[test]
fn validation_reports_every_bad_key_with_its_path() {
    let c: EventsConfig = toml::from_str(
        "min_area = 2\noff_s = -1\noutbox = { capacity = 0 }\n[zones.door]\nline = [[0, 0], [1, 1]]\n\
         [[webhooks]]\nname = \"a\"\nurl = \"ftp://x\"\n[[webhooks]]\nname = \"a\"\nurl = \"http://x\"\n",
    )
    .expect("parses");
    let paths: Vec<String> = c.validate().into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        paths,
        [
            "min_area",
            "off_s",
            "zones.door.line",
            "outbox.capacity",
            "webhooks[0].url",
            "webhooks[1].name"
        ]
    );
    assert!(EventsConfig::default().validate().is_empty());
}

#[test]
fn a_query_removed_on_reload_ends_after_off_s() {
    let mut s = state();
    let mut events = Vec::new();
    for t in (0..=2000).step_by(500) {
        events.extend(s.observe(&frame(t, 0.3)));
    }
    assert_eq!(events.len(), 1);
    // The query set changed: "person" is no longer in the frames.
    for t in (2500..=8000).step_by(500) {
        let mut f = frame(t, 0.0);
        f.queries[0].name = "dog".into();
        events.extend(s.observe(&f));
    }
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(
        (events[1].query.as_str(), events[1].kind, events[1].end_ms),
        ("person", EventKind::End, Some(2500))
    );
    assert!(!EventsConfig::default().needs_labels("door"));
}
