//! MQTT delivery from the outbox: at least once, in outbox order, across broker outages and restarts.
//!
//! One task owns the connection. Each connection attempt builds a fresh rumqttc client and event loop (MQTT
//! 3.1.1, clean session), so nothing is replayed behind our back: after a reconnect the task itself republishes
//! everything the outbox still holds, oldest first. An event leaves the outbox only when the broker's PUBACK for
//! its event-topic publish arrives, so a broker that dies mid-flight costs a duplicate (dropped by event id), never
//! a loss. The retained state topics are published just before each event, from the same outbox entry, so they
//! replay too. TLS and MQTT 5 are not enabled: rumqttc's TLS pulls a rustls provider build and its v5 client is a
//! separate API; both are left for when someone needs them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event as MqttEvent, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
};
use serde::Deserialize;
use tokio::sync::watch;

use super::outbox::{Outbox, OutboxError};
use super::topics::{self, Discovery};

/// The `[events.mqtt]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Also names this daemon's Home Assistant device; two daemons on one broker need different ids.
    pub client_id: String,
    /// The first topic level of everything published.
    pub prefix: String,
    pub username: Option<String>,
    /// A file holding the password (trailing newline ignored), so the secret stays out of the config file.
    pub password_file: Option<PathBuf>,
    pub keep_alive_s: u64,
    /// Publish Home Assistant discovery configs (opt-in).
    pub discovery: bool,
    pub discovery_prefix: String,
    /// The device name Home Assistant shows.
    pub device_name: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "tclseg".into(),
            prefix: "tclseg".into(),
            username: None,
            password_file: None,
            keep_alive_s: 30,
            discovery: false,
            discovery_prefix: "homeassistant".into(),
            device_name: "tclseg".into(),
        }
    }
}

/// The pipelines and their query names, for discovery; the daemon sends a new one on reload.
pub type Catalog = Vec<(String, Vec<String>)>;

/// Events published but not yet acknowledged per connection, so one slow broker cannot take unbounded memory.
const WINDOW: usize = 32;

/// The client's request channel: a window of events (three publishes each) plus a large catalog's discovery
/// configs must fit, since a full channel ends the connection.
const REQUESTS: usize = 8192;

#[derive(Debug, thiserror::Error)]
enum SessionError {
    // Boxed: rumqttc's errors are large and this travels up every call of the session.
    #[error("{0}")]
    Connection(Box<rumqttc::ConnectionError>),
    #[error("{0}")]
    Client(Box<rumqttc::ClientError>),
    #[error("{0}")]
    Outbox(#[from] OutboxError),
    #[error("password file {0}: {1}")]
    Password(String, std::io::Error),
}

impl From<rumqttc::ConnectionError> for SessionError {
    fn from(e: rumqttc::ConnectionError) -> Self {
        SessionError::Connection(Box::new(e))
    }
}

impl From<rumqttc::ClientError> for SessionError {
    fn from(e: rumqttc::ClientError) -> Self {
        SessionError::Client(Box::new(e))
    }
}

/// Delivers one outbox destination to an MQTT broker.
pub struct MqttSink {
    config: MqttConfig,
    outbox: Outbox,
    destination: String,
}

/// Per-connection bookkeeping.
#[derive(Default)]
struct Session {
    /// One entry per publish handed to the client, in order: the outbox sequence for event publishes.
    expected: VecDeque<Option<u64>>,
    /// Packet id → outbox sequence, for event publishes the broker has not acknowledged yet.
    inflight: BTreeMap<u16, u64>,
    /// Sequences published in this connection and not yet acknowledged.
    unacked: BTreeSet<u64>,
    /// The newest sequence published in this connection.
    cursor: Option<u64>,
    connected: bool,
    /// Discovery configs published in this connection, to clear those that left the catalog.
    discovered: BTreeSet<String>,
    /// The catalog's sender is gone.
    catalog_closed: bool,
}

impl MqttSink {
    pub fn new(config: MqttConfig, outbox: Outbox, destination: &str) -> MqttSink {
        MqttSink {
            config,
            outbox,
            destination: destination.to_string(),
        }
    }

    fn options(&self) -> Result<MqttOptions, SessionError> {
        let c = &self.config;
        let mut o = MqttOptions::new(&c.client_id, &c.host, c.port);
        o.set_keep_alive(Duration::from_secs(c.keep_alive_s.max(5)));
        o.set_clean_session(true);
        o.set_inflight(u16::try_from(WINDOW * 4).unwrap_or(u16::MAX));
        o.set_last_will(LastWill::new(
            topics::availability(&c.prefix),
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
        if let Some(user) = &c.username {
            let password = match &c.password_file {
                Some(p) => std::fs::read_to_string(p)
                    .map_err(|e| SessionError::Password(p.display().to_string(), e))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
                None => String::new(),
            };
            o.set_credentials(user, password);
        }
        Ok(o)
    }

    /// Deliver until `shutdown` turns true; then say `offline` and disconnect. Reconnects with backoff (0.2 s
    /// doubling to 5 s) for as long as it runs.
    pub async fn run(
        self,
        mut catalog: watch::Receiver<Catalog>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(200);
        let counters = self.outbox.counters(&self.destination).ok();
        loop {
            if super::stopped(&shutdown) {
                return;
            }
            let mut s = Session::default();
            let result = self.session(&mut s, &mut catalog, &mut shutdown).await;
            if s.connected {
                backoff = Duration::from_millis(200);
            }
            // What was published and not acknowledged goes out again on the next connection.
            if let Some(c) = &counters {
                c.retried
                    .fetch_add(s.unacked.len() as u64, Ordering::Relaxed);
            }
            match result {
                Ok(()) => return,
                Err(error) => tracing::warn!(
                    host = %self.config.host, port = self.config.port, %error,
                    retry_in_ms = backoff.as_millis() as u64, "MQTT connection failed; events wait in the outbox"
                ),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = super::stopping(&mut shutdown) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn session(
        &self,
        s: &mut Session,
        catalog: &mut watch::Receiver<Catalog>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        let (client, mut events) = AsyncClient::new(self.options()?, REQUESTS);
        let notify = self.outbox.notifier(&self.destination)?;
        loop {
            // Each poll runs to its end while pushes and reloads are served beside it, never dropped halfway:
            // rumqttc does not promise that poll is cancel-safe, and it is not quite: a poll dropped while writing
            // a publish into a full socket has already given it a packet id, so the broker never sees it, its
            // PUBACK never comes and its event waits for the next reconnect.
            let polled = {
                let mut poll = std::pin::pin!(events.poll());
                loop {
                    tokio::select! {
                        ev = &mut poll => break Some(ev),
                        _ = notify.notified(), if s.connected => self.fill(&client, s)?,
                        changed = catalog.changed(), if s.connected && !s.catalog_closed => {
                            match changed {
                                Ok(()) => self.discover(&client, s, catalog)?,
                                // No more reloads: keep what was discovered, stop watching.
                                Err(_) => s.catalog_closed = true,
                            }
                        }
                        _ = super::stopping(shutdown) => break None,
                    }
                }
            };
            match polled {
                Some(ev) => self.handle(ev?, &client, s, catalog)?,
                None => return self.say_goodbye(&client, &mut events).await,
            }
        }
    }

    fn handle(
        &self,
        ev: MqttEvent,
        client: &AsyncClient,
        s: &mut Session,
        catalog: &mut watch::Receiver<Catalog>,
    ) -> Result<(), SessionError> {
        match ev {
            MqttEvent::Incoming(Packet::ConnAck(_)) => {
                tracing::info!(host = %self.config.host, port = self.config.port, "MQTT connected");
                s.connected = true;
                self.publish(
                    client,
                    s,
                    &topics::availability(&self.config.prefix),
                    "online",
                    None,
                )?;
                self.discover(client, s, catalog)?;
                self.fill(client, s)?;
            }
            MqttEvent::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(Some(seq)) = s.expected.pop_front() {
                    s.inflight.insert(pkid, seq);
                }
            }
            MqttEvent::Incoming(Packet::PubAck(ack)) => {
                if let Some(seq) = s.inflight.remove(&ack.pkid) {
                    self.outbox.ack(&self.destination, &[seq])?;
                    s.unacked.remove(&seq);
                    self.fill(client, s)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Publish retained QoS 1 (state, discovery, availability) or, with `seq`, the event itself.
    fn publish(
        &self,
        client: &AsyncClient,
        s: &mut Session,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        seq: Option<u64>,
    ) -> Result<(), SessionError> {
        client.try_publish(topic, QoS::AtLeastOnce, seq.is_none(), payload)?;
        s.expected.push_back(seq);
        Ok(())
    }

    /// Publish outbox entries past the cursor until the window is full.
    fn fill(&self, client: &AsyncClient, s: &mut Session) -> Result<(), SessionError> {
        let room = WINDOW.saturating_sub(s.unacked.len());
        if room == 0 {
            return Ok(());
        }
        for (seq, event) in self.outbox.pending(&self.destination, s.cursor, room)? {
            for (topic, payload) in topics::state_messages(&self.config.prefix, &event) {
                self.publish(client, s, &topic, payload, None)?;
            }
            self.publish(
                client,
                s,
                &topics::events(&self.config.prefix),
                event.to_json(),
                Some(seq),
            )?;
            s.unacked.insert(seq);
            s.cursor = Some(seq);
        }
        Ok(())
    }

    /// Home Assistant discovery for the current catalog; entities that left it are removed (empty retained config).
    fn discover(
        &self,
        client: &AsyncClient,
        s: &mut Session,
        catalog: &mut watch::Receiver<Catalog>,
    ) -> Result<(), SessionError> {
        if !self.config.discovery {
            return Ok(());
        }
        let d = Discovery {
            discovery_prefix: &self.config.discovery_prefix,
            prefix: &self.config.prefix,
            node: &self.config.client_id,
            device_name: &self.config.device_name,
        };
        let messages: Vec<_> = catalog
            .borrow_and_update()
            .iter()
            .flat_map(|(p, queries)| {
                queries
                    .iter()
                    .flat_map(|q| d.messages(p, q))
                    .collect::<Vec<_>>()
            })
            .collect();
        let now: BTreeSet<String> = messages.iter().map(|(t, _)| t.clone()).collect();
        let gone: Vec<String> = s.discovered.difference(&now).cloned().collect();
        for topic in gone {
            self.publish(client, s, &topic, Vec::new(), None)?;
        }
        for (topic, payload) in messages {
            self.publish(client, s, &topic, payload.to_string(), None)?;
        }
        s.discovered = now;
        Ok(())
    }

    /// Say `offline` (the last will covers a crash) and disconnect, waiting briefly for the broker.
    async fn say_goodbye(
        &self,
        client: &AsyncClient,
        events: &mut EventLoop,
    ) -> Result<(), SessionError> {
        let topic = topics::availability(&self.config.prefix);
        let _ = client.try_publish(topic, QoS::AtLeastOnce, true, "offline");
        let _ = client.try_disconnect();
        let drain = async {
            while let Ok(ev) = events.poll().await {
                if matches!(ev, MqttEvent::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        Ok(())
    }
}
