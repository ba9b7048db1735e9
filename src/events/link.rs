//! One MQTT connection, 3.1.1 or 5, behind the few calls the delivery loop makes.
//!
//! rumqttc's MQTT 5 client is a separate API (its own options, packets and errors) with the same shape as the
//! 3.1.1 one: a client that queues requests and an event loop that must be polled. Both are wrapped here in two
//! small enums, so `mqtt.rs` keeps a single delivery loop (outbox order, the publish window, acknowledgements,
//! replay after a reconnect) whatever the protocol, and everything protocol-specific stays in this file.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use serde::Deserialize;

/// The MQTT protocol version spoken to the broker (`[events.mqtt] protocol`). An unknown value is kept, so config
/// validation can list it with the other problems and name the values allowed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Protocol {
    /// MQTT 3.1.1, which every broker speaks.
    #[default]
    V311,
    /// MQTT 5: the broker says why it refuses a publish (reason codes) instead of dropping it silently.
    V5,
    Unknown(String),
}

impl Protocol {
    /// The values `protocol` accepts, as written in the config.
    pub const CHOICES: [&'static str; 2] = ["3.1.1", "5"];
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5",
            Protocol::Unknown(text) => text,
        })
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(match text.as_str() {
            "3.1.1" => Protocol::V311,
            "5" => Protocol::V5,
            _ => Protocol::Unknown(text),
        })
    }
}

/// What one connection is opened with.
pub struct Settings {
    pub protocol: Protocol,
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub keep_alive: Duration,
    /// Publishes in flight at most (the broker may lower it in MQTT 5).
    pub inflight: u16,
    /// Retained QoS 1 `payload` the broker publishes on `topic` if the connection dies without a DISCONNECT.
    pub will: (String, &'static str),
    pub credentials: Option<(String, String)>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Requests the client may queue before `publish` fails.
    pub requests: usize,
}

/// What the event loop reports, in the terms the delivery loop cares about.
#[derive(Debug)]
pub enum Happened {
    /// The broker accepted the connection.
    Connected,
    /// A publish went out with this packet id (in the order they were handed to [`Publisher::publish`]).
    Sent(u16),
    /// The broker acknowledged the publish with this packet id.
    Acked(u16),
    /// The broker acknowledged the publish but refused it (MQTT 5 reason code ≥ 0x80).
    Refused {
        pkid: u16,
        reason: String,
    },
    /// Our DISCONNECT went out.
    Closed,
    Other,
}

/// A connection or client error of either protocol; its sources reach the TLS error, for [`super::tls::hint`].
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    // Boxed: rumqttc's errors are large and this travels up every call of the session.
    #[error("{0}")]
    Connection(#[source] Box<rumqttc::ConnectionError>),
    #[error("{0}")]
    Connection5(#[source] Box<rumqttc::v5::ConnectionError>),
    #[error("{0}")]
    Client(#[source] Box<rumqttc::ClientError>),
    #[error("{0}")]
    Client5(#[source] Box<rumqttc::v5::ClientError>),
}

impl LinkError {
    /// Whether the connection failed in its TLS handshake (rather than in TCP or MQTT).
    pub fn in_tls_handshake(&self) -> bool {
        match self {
            LinkError::Connection(e) => matches!(**e, rumqttc::ConnectionError::Tls(_)),
            LinkError::Connection5(e) => matches!(**e, rumqttc::v5::ConnectionError::Tls(_)),
            LinkError::Client(_) | LinkError::Client5(_) => false,
        }
    }
}

/// The sending half: queues publishes for the event loop.
pub enum Publisher {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The receiving half: drives the connection; must be polled for anything to happen.
pub enum Poller {
    // Boxed: the loops are large and of different sizes; there is one per connection.
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// A client and its event loop for `s` (MQTT 3.1.1 unless `s.protocol` is 5); nothing connects until polled.
pub fn open(s: Settings) -> (Publisher, Poller) {
    let transport = match s.tls {
        Some(config) => Transport::tls_with_config(TlsConfiguration::Rustls(config)),
        None => Transport::tcp(),
    };
    let (will_topic, will_payload) = s.will;
    if s.protocol == Protocol::V5 {
        let mut o = rumqttc::v5::MqttOptions::new(s.client_id, s.host, s.port);
        o.set_keep_alive(s.keep_alive)
            .set_clean_start(true)
            .set_outgoing_inflight_upper_limit(s.inflight)
            .set_transport(transport)
            .set_last_will(p5::LastWill::new(
                will_topic,
                will_payload,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                true,
                None,
            ));
        if let Some((user, password)) = s.credentials {
            o.set_credentials(user, password);
        }
        let (client, events) = rumqttc::v5::AsyncClient::new(o, s.requests);
        (Publisher::V5(client), Poller::V5(Box::new(events)))
    } else {
        let mut o = rumqttc::MqttOptions::new(s.client_id, s.host, s.port);
        o.set_keep_alive(s.keep_alive)
            .set_clean_session(true)
            .set_inflight(s.inflight)
            .set_transport(transport)
            .set_last_will(rumqttc::LastWill::new(
                will_topic,
                will_payload,
                rumqttc::QoS::AtLeastOnce,
                true,
            ));
        if let Some((user, password)) = s.credentials {
            o.set_credentials(user, password);
        }
        let (client, events) = rumqttc::AsyncClient::new(o, s.requests);
        (Publisher::V311(client), Poller::V311(Box::new(events)))
    }
}

impl Publisher {
    /// Queue a QoS 1 publish without waiting; fails when the request queue is full or the loop is gone.
    pub fn publish(&self, topic: &str, retain: bool, payload: Vec<u8>) -> Result<(), LinkError> {
        match self {
            Publisher::V311(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                .map_err(|e| LinkError::Client(Box::new(e))),
            Publisher::V5(c) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    retain,
                    payload,
                )
                .map_err(|e| LinkError::Client5(Box::new(e))),
        }
    }

    /// Queue a DISCONNECT (best effort: the connection is going away either way).
    pub fn disconnect(&self) {
        let _ = match self {
            Publisher::V311(c) => c.try_disconnect().map_err(|_| ()),
            Publisher::V5(c) => c.try_disconnect().map_err(|_| ()),
        };
    }
}

impl Poller {
    /// The next thing that happened on the connection. Not cancel-safe (neither is rumqttc's poll): let it finish.
    pub async fn poll(&mut self) -> Result<Happened, LinkError> {
        match self {
            Poller::V311(events) => {
                use rumqttc::{Event, Packet};
                let ev = events
                    .poll()
                    .await
                    .map_err(|e| LinkError::Connection(Box::new(e)))?;
                Ok(match ev {
                    Event::Incoming(Packet::ConnAck(_)) => Happened::Connected,
                    Event::Incoming(Packet::PubAck(ack)) => Happened::Acked(ack.pkid),
                    Event::Outgoing(out) => outgoing(out),
                    Event::Incoming(_) => Happened::Other,
                })
            }
            Poller::V5(events) => {
                use rumqttc::v5::Event;
                let ev = events
                    .poll()
                    .await
                    .map_err(|e| LinkError::Connection5(Box::new(e)))?;
                Ok(match ev {
                    Event::Incoming(p5::Packet::ConnAck(_)) => Happened::Connected,
                    Event::Incoming(p5::Packet::PubAck(ack)) => match ack.reason {
                        p5::PubAckReason::Success | p5::PubAckReason::NoMatchingSubscribers => {
                            Happened::Acked(ack.pkid)
                        }
                        reason => Happened::Refused {
                            pkid: ack.pkid,
                            reason: match ack.properties.and_then(|p| p.reason_string) {
                                Some(why) => format!("{reason:?} ({why})"),
                                None => format!("{reason:?}"),
                            },
                        },
                    },
                    Event::Outgoing(out) => outgoing(out),
                    Event::Incoming(_) => Happened::Other,
                })
            }
        }
    }
}

fn outgoing(out: Outgoing) -> Happened {
    match out {
        Outgoing::Publish(pkid) => Happened::Sent(pkid),
        Outgoing::Disconnect => Happened::Closed,
        _ => Happened::Other,
    }
}
