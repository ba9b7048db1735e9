//! What a `tclseg serve` run with zero hysteresis (`min_area = 0`, `on_s = off_s = update_s = 0`) must deliver,
//! worked out from the JSON sidecars it wrote rather than from the daemon's own state: a query seen in a frame
//! (pixel fraction > 0) starts a presence or updates it, a query unseen in a frame ends the presence it had. The
//! serve-level event tests compare what a broker or a receiver got against this.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use tclseg::events::{Event, EventKind};

/// The `[events]` thresholds that make every frame count: `expected` assumes them.
pub const ZERO_HYSTERESIS: &str = "min_area = 0.0\non_s = 0\noff_s = 0\nupdate_s = 0\n";

/// One frame as its sidecar tells it.
#[derive(Debug, Clone)]
pub struct SidecarFrame {
    /// The sidecar's path: events name it in `outputs`.
    pub path: String,
    pub sequence: u64,
    /// Every query (label ≠ 0) and whether it covers any pixel.
    pub seen: Vec<(String, bool)>,
}

/// What an event must say, without what only the daemon knows (ids, times).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Expected {
    pub outputs: Option<String>,
    pub query: String,
    pub kind: String,
}

impl Expected {
    pub fn of(e: &Event) -> Expected {
        Expected {
            outputs: e.outputs.clone(),
            query: e.query.clone(),
            kind: format!("{:?}", e.kind),
        }
    }
}

fn sidecar_paths(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sidecar_paths(&path, found);
        } else if path.extension().is_some_and(|e| e == "json")
            && !path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            found.push(path);
        }
    }
}

/// The frames whose sidecars are under `dir`, in pipeline order (their frame sequence).
pub fn sidecar_frames(dir: &Path) -> Vec<SidecarFrame> {
    let mut paths = Vec::new();
    sidecar_paths(dir, &mut paths);
    let mut frames: Vec<SidecarFrame> = paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read sidecar");
            let v: serde_json::Value = serde_json::from_str(&text).expect("sidecar JSON");
            let seen = v["classes"]
                .as_array()
                .expect("classes")
                .iter()
                .filter(|c| c["label"] != 0)
                .map(|c| {
                    let name = c["name"].as_str().expect("name").to_string();
                    (name, c["pixel_fraction"].as_f64().expect("fraction") > 0.0)
                })
                .collect();
            SidecarFrame {
                path: p.display().to_string(),
                sequence: v["frame"]["sequence"].as_u64().expect("frame.sequence"),
                seen,
            }
        })
        .collect();
    frames.sort_by_key(|f| f.sequence);
    frames
}

/// The events `frames` (one pipeline's, in order) must make under [`ZERO_HYSTERESIS`], in order.
pub fn expected(frames: &[SidecarFrame]) -> Vec<Expected> {
    let mut present: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    for f in frames {
        for (query, seen) in &f.seen {
            let kind = match (*seen, present.contains(query)) {
                (true, false) => EventKind::Start,
                (true, true) => EventKind::Update,
                (false, true) => EventKind::End,
                (false, false) => continue,
            };
            if *seen {
                present.insert(query.clone());
            } else {
                present.remove(query);
            }
            out.push(Expected {
                outputs: Some(f.path.clone()),
                query: query.clone(),
                kind: format!("{kind:?}"),
            });
        }
    }
    out
}

/// `got` without repeats, in order of first arrival; a repeat must carry the very same event as the first copy.
pub fn dedup(got: &[Event]) -> Vec<Event> {
    let mut first: BTreeMap<&str, &Event> = BTreeMap::new();
    let mut out = Vec::new();
    for e in got {
        match first.get(e.id.as_str()) {
            Some(seen) => assert_eq!(*seen, e, "two different events share the id {}", e.id),
            None => {
                first.insert(&e.id, e);
                out.push(e.clone());
            }
        }
    }
    out
}

/// The events of `pipeline` in `got` (deduplicated, in arrival order).
pub fn of_pipeline(got: &[Event], pipeline: &str) -> Vec<Event> {
    got.iter()
        .filter(|e| e.pipeline == pipeline)
        .cloned()
        .collect()
}

/// One pipeline's deduplicated events arrived in the order it made them: each presence's messages numbered 0, 1,
/// 2, … with no gap (a start first, an end only last), and frames (by `sequence_of` their outputs, else by
/// frame time) never going backwards.
pub fn assert_in_order(events: &[Event], sequence_of: &BTreeMap<String, u64>) {
    let mut next: BTreeMap<&str, u64> = BTreeMap::new();
    let mut ended: HashSet<&str> = HashSet::new();
    let mut last: Option<u64> = None;
    for e in events {
        let n: u64 =
            e.id.strip_prefix(&format!("{}#", e.event))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("id {} is not <event>#<n>", e.id));
        let want = next.entry(&e.event).or_insert(0);
        assert_eq!(
            n, *want,
            "message {} of presence {} out of order or missing",
            n, e.event
        );
        *want += 1;
        assert_eq!(
            n == 0,
            e.kind == EventKind::Start,
            "{}: only a presence's first message is its start",
            e.id
        );
        assert!(
            !ended.contains(e.event.as_str()),
            "{} came after its presence ended",
            e.id
        );
        if e.kind == EventKind::End {
            ended.insert(&e.event);
        }
        // A pipeline writes sidecars for all its frames or for none.
        let frame = e.outputs.as_ref().and_then(|o| sequence_of.get(o)).copied();
        let key = frame.unwrap_or(e.at_ms);
        if let Some(prev) = last {
            assert!(
                prev <= key,
                "{} is from an earlier frame than the event before it",
                e.id
            );
        }
        last = Some(key);
    }
}

/// Frame sequence by sidecar path, for [`assert_in_order`].
pub fn sequences(frames: &[SidecarFrame]) -> BTreeMap<String, u64> {
    frames
        .iter()
        .map(|f| (f.path.clone(), f.sequence))
        .collect()
}

/// The same multiset: every expected event delivered, nothing else.
pub fn assert_same_events(got: &[Event], want: &[Expected]) {
    let mut g: Vec<Expected> = got.iter().map(Expected::of).collect();
    let mut w = want.to_vec();
    g.sort();
    w.sort();
    assert_eq!(
        g, w,
        "delivered events differ from those the sidecars call for"
    );
}
