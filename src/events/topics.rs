//! MQTT topics and Home Assistant discovery payloads: pure functions, so the schema is tested without a broker.
//!
//! Topics: `<prefix>/availability` (`online`/`offline`, retained, the last will), `<prefix>/events` (one JSON
//! object per start/update/end), `<prefix>/<pipeline>/<query>` (`ON`/`OFF`, retained) and `…/area` (percent of the
//! frame, retained); zones add `…/zone/<zone>` under the query. Discovery follows Home Assistant's documented
//! layout `<discovery_prefix>/<component>/<object_id>/config` with `object_id` = `unique_id`, retained, one
//! binary_sensor (present) and one sensor (area %) per pipeline × query, all tied to one device.

use serde_json::{json, Value};

use super::event::{Event, EventKind};

/// A topic level: MQTT forbids wildcards in published topics, and a `/` would add a level.
pub fn level(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '/' | '+' | '#' | '\0' => '_',
            c => c,
        })
        .collect()
}

/// Home Assistant ids allow only `[a-zA-Z0-9_-]`.
pub fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub fn availability(prefix: &str) -> String {
    format!("{prefix}/availability")
}

pub fn events(prefix: &str) -> String {
    format!("{prefix}/events")
}

/// The retained state topic of a query (and zone) of a pipeline.
pub fn state(prefix: &str, pipeline: &str, query: &str, zone: Option<&str>) -> String {
    let base = format!("{prefix}/{}/{}", level(pipeline), level(query));
    match zone {
        Some(z) => format!("{base}/zone/{}", level(z)),
        None => base,
    }
}

/// What an event means for the retained state topics: (topic, payload) pairs, published before the event itself.
pub fn state_messages(prefix: &str, e: &Event) -> Vec<(String, String)> {
    let topic = state(prefix, &e.pipeline, &e.query, e.zone.as_deref());
    let area = format!("{:.2}", e.area * 100.0);
    match e.kind {
        EventKind::Start => vec![
            (topic.clone(), "ON".into()),
            (format!("{topic}/area"), area),
        ],
        EventKind::Update => vec![(format!("{topic}/area"), area)],
        EventKind::End => vec![
            (topic.clone(), "OFF".into()),
            (format!("{topic}/area"), "0.00".into()),
        ],
    }
}

/// Names Home Assistant shows and the ids it keys entities by.
pub struct Discovery<'a> {
    pub discovery_prefix: &'a str,
    pub prefix: &'a str,
    /// Identifies this daemon (the MQTT client id): two daemons on one broker make two devices.
    pub node: &'a str,
    pub device_name: &'a str,
}

impl Discovery<'_> {
    fn unique_id(&self, pipeline: &str, query: &str, what: &str) -> String {
        slug(&format!("tclseg_{}_{pipeline}_{query}_{what}", self.node))
    }

    fn device(&self) -> Value {
        json!({
            "identifiers": [slug(&format!("tclseg_{}", self.node))],
            "name": self.device_name,
            "manufacturer": "tclseg",
            "model": "open-vocabulary segmentation",
            "sw_version": env!("CARGO_PKG_VERSION"),
        })
    }

    /// The config topics and payloads of one pipeline × query: a binary_sensor and a sensor.
    pub fn messages(&self, pipeline: &str, query: &str) -> Vec<(String, Value)> {
        let state = state(self.prefix, pipeline, query, None);
        let common = |what: &str, name: &str| {
            let id = self.unique_id(pipeline, query, what);
            let v = json!({
                "name": name,
                "unique_id": id,
                "availability_topic": availability(self.prefix),
                "payload_available": "online",
                "payload_not_available": "offline",
                "device": self.device(),
            });
            (id, v)
        };
        let (pid, mut present) = common("present", &format!("{pipeline} {query}"));
        present["state_topic"] = json!(state);
        present["payload_on"] = json!("ON");
        present["payload_off"] = json!("OFF");
        let (aid, mut area) = common("area", &format!("{pipeline} {query} area"));
        area["state_topic"] = json!(format!("{state}/area"));
        area["unit_of_measurement"] = json!("%");
        area["state_class"] = json!("measurement");
        vec![
            (self.config_topic("binary_sensor", &pid), present),
            (self.config_topic("sensor", &aid), area),
        ]
    }

    pub fn config_topic(&self, component: &str, unique_id: &str) -> String {
        format!("{}/{component}/{unique_id}/config", self.discovery_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_levels_cannot_smuggle_wildcards_or_levels() {
        assert_eq!(
            state("p", "gate/1", "car+#", Some("lane a")),
            "p/gate_1/car__/zone/lane a"
        );
        assert_eq!(slug("tclseg_cam 1_red car"), "tclseg_cam_1_red_car");
    }
}
