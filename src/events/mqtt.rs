//! MQTT delivery from the outbox: at least once, in outbox order, across broker outages and restarts.
//!
//! One task owns the connection. Each connection attempt builds a fresh client and event loop (clean session), so
//! nothing is replayed behind our back: after a reconnect the task itself republishes everything the outbox still
//! holds, oldest first. An event leaves the outbox only when the broker's PUBACK for its event-topic publish
//! arrives, so a broker that dies mid-flight costs a duplicate (dropped by event id), never a loss. The retained
//! state topics are published just before each event, from the same outbox entry, so they replay too.
//!
//! MQTT 3.1.1 or 5 (`protocol`), each through rumqttc's own client behind [`super::link`], so this loop is written
//! once. Over TLS when `tls` is on (or a `ca_file` / client certificate is given), with the config from
//! [`super::tls`]; a failed handshake is logged with what to do about it. MQTT 5 adds one thing the loop uses: a
//! broker that refuses a publish says so (PUBACK reason code), and the connection is then dropped and retried so
//! the event is not taken as delivered.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

pub use super::link::Protocol;
use super::link::{self, Happened, LinkError, Poller, Publisher};
use super::outbox::{Outbox, OutboxError};
use super::tls::{self, TlsError, TlsFiles};
use super::topics::{self, Discovery};

/// The `[events.mqtt]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub host: String,
    /// Unset: 1883, or 8883 with TLS (the ports registered for MQTT and MQTT over TLS).
    pub port: Option<u16>,
    /// `"3.1.1"` (the default) or `"5"`.
    pub protocol: Protocol,
    /// Connect over TLS. Unset: on when `ca_file` or `client_cert_file` is given.
    pub tls: Option<bool>,
    /// PEM certificates of the CA(s) that signed the broker's certificate, trusted instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain to present to a broker that requires client certificates (mutual TLS).
    pub client_cert_file: Option<PathBuf>,
    /// The PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
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
            port: None,
            protocol: Protocol::default(),
            tls: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
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

impl MqttConfig {
    /// Whether the connection is over TLS.
    pub fn uses_tls(&self) -> bool {
        self.tls
            .unwrap_or(self.ca_file.is_some() || self.client_cert_file.is_some())
    }

    /// The broker's port: the one given, else MQTT's registered port for the transport.
    pub fn port(&self) -> u16 {
        self.port
            .unwrap_or(if self.uses_tls() { 8883 } else { 1883 })
    }

    /// The TLS files given.
    pub fn tls_files(&self) -> TlsFiles<'_> {
        TlsFiles::of(&self.ca_file, &self.client_cert_file, &self.client_key_file)
    }

    /// Problems in the section as (key below `mqtt`, message), for config validation; the files themselves are
    /// read by the whole-config check.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        if let Protocol::Unknown(text) = &self.protocol {
            errors.push((
                "protocol".into(),
                format!(
                    "'{text}' is not one of {} (MQTT 3.1.1 or MQTT 5)",
                    Protocol::CHOICES.map(|c| format!("\"{c}\"")).join(", ")
                ),
            ));
        }
        if self.tls == Some(false) {
            for key in self.tls_files().keys_given() {
                errors.push((
                    key.into(),
                    "is set but tls = false: remove one of them (the file is only used over TLS)"
                        .into(),
                ));
            }
        }
        if self.port == Some(0) {
            errors.push(("port".into(), "must be 1 to 65535".into()));
        }
        errors
    }

    /// What a valid section may still get wrong: TLS on MQTT's plain port, or plain MQTT on its TLS port.
    pub fn warnings(&self) -> Vec<(String, String)> {
        match (self.uses_tls(), self.port) {
            (true, Some(1883)) => vec![(
                "port".into(),
                "1883 is MQTT's plain (non-TLS) port but tls is on: TLS listeners are usually on 8883".into(),
            )],
            (false, Some(8883)) => vec![(
                "port".into(),
                "8883 is MQTT's TLS port but tls is off: set tls = true if the broker listens in TLS there".into(),
            )],
            _ => Vec::new(),
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
    #[error("{0}")]
    Link(#[from] LinkError),
    #[error("{0}")]
    Outbox(#[from] OutboxError),
    #[error("password file {0}: {1}")]
    Password(String, std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("the broker refused the publish to {topic}: {reason} (check its ACL for this client)")]
    Refused { topic: String, reason: String },
}

/// Delivers one outbox destination to an MQTT broker.
pub struct MqttSink {
    config: MqttConfig,
    outbox: Outbox,
    destination: String,
}

/// A publish handed to the client: its topic (to name a refusal) and, for an event, its outbox sequence.
struct Sent {
    topic: String,
    seq: Option<u64>,
}

/// Per-connection bookkeeping.
#[derive(Default)]
struct Session {
    /// One entry per publish handed to the client, in order, until the client says which packet id it got.
    expected: VecDeque<Sent>,
    /// Packet id → publish, for publishes the broker has not acknowledged yet.
    inflight: BTreeMap<u16, Sent>,
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

    /// The connection's settings; reads the password and TLS files now, so replaced files count at the next
    /// connection.
    fn settings(&self) -> Result<link::Settings, SessionError> {
        let c = &self.config;
        let credentials = match &c.username {
            Some(user) => {
                let password = match &c.password_file {
                    Some(p) => std::fs::read_to_string(p)
                        .map_err(|e| SessionError::Password(p.display().to_string(), e))?
                        .trim_end_matches(['\r', '\n'])
                        .to_string(),
                    None => String::new(),
                };
                Some((user.clone(), password))
            }
            None => None,
        };
        let tls = if c.uses_tls() {
            Some(tls::client_config(c.tls_files())?)
        } else {
            None
        };
        Ok(link::Settings {
            protocol: c.protocol.clone(),
            client_id: c.client_id.clone(),
            host: c.host.clone(),
            port: c.port(),
            keep_alive: Duration::from_secs(c.keep_alive_s.max(5)),
            inflight: u16::try_from(WINDOW * 4).unwrap_or(u16::MAX),
            will: (topics::availability(&c.prefix), "offline"),
            credentials,
            tls,
            requests: REQUESTS,
        })
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
            // A broker that refused a publish will most likely refuse it again: keep backing off then.
            if s.connected && !matches!(result, Err(SessionError::Refused { .. })) {
                backoff = Duration::from_millis(200);
            }
            // What was published and not acknowledged goes out again on the next connection.
            if let Some(c) = &counters {
                c.retried
                    .fetch_add(s.unacked.len() as u64, Ordering::Relaxed);
            }
            match result {
                Ok(()) => return,
                Err(error) => {
                    let (host, port, tls) = (
                        &self.config.host,
                        self.config.port(),
                        self.config.uses_tls(),
                    );
                    let retry_in_ms = backoff.as_millis() as u64;
                    let handshake = matches!(&error, SessionError::Link(l) if l.in_tls_handshake());
                    match tls::hint(&error, handshake) {
                        Some(hint) => tracing::warn!(
                            %host, port, tls, %error, hint, retry_in_ms,
                            "MQTT connection failed; events wait in the outbox"
                        ),
                        None => tracing::warn!(
                            %host, port, tls, %error, retry_in_ms,
                            "MQTT connection failed; events wait in the outbox"
                        ),
                    }
                }
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
        let (client, mut events) = link::open(self.settings()?);
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
        ev: Happened,
        client: &Publisher,
        s: &mut Session,
        catalog: &mut watch::Receiver<Catalog>,
    ) -> Result<(), SessionError> {
        match ev {
            Happened::Connected => {
                tracing::info!(
                    host = %self.config.host, port = self.config.port(), tls = self.config.uses_tls(),
                    protocol = %self.config.protocol, "MQTT connected"
                );
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
            Happened::Sent(pkid) => {
                if let Some(sent) = s.expected.pop_front() {
                    s.inflight.insert(pkid, sent);
                }
            }
            Happened::Acked(pkid) => {
                if let Some(Sent { seq: Some(seq), .. }) = s.inflight.remove(&pkid) {
                    self.outbox.ack(&self.destination, &[seq])?;
                    s.unacked.remove(&seq);
                    self.fill(client, s)?;
                }
            }
            // The event stays in the outbox; the reconnect (with backoff) retries it and says why in the log.
            Happened::Refused { pkid, reason } => {
                let topic = s
                    .inflight
                    .remove(&pkid)
                    .map_or_else(|| format!("packet {pkid}"), |sent| sent.topic);
                return Err(SessionError::Refused { topic, reason });
            }
            Happened::Closed | Happened::Other => {}
        }
        Ok(())
    }

    /// Publish retained QoS 1 (state, discovery, availability) or, with `seq`, the event itself.
    fn publish(
        &self,
        client: &Publisher,
        s: &mut Session,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        seq: Option<u64>,
    ) -> Result<(), SessionError> {
        client.publish(topic, seq.is_none(), payload.into())?;
        s.expected.push_back(Sent {
            topic: topic.to_string(),
            seq,
        });
        Ok(())
    }

    /// Publish outbox entries past the cursor until the window is full.
    fn fill(&self, client: &Publisher, s: &mut Session) -> Result<(), SessionError> {
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
        client: &Publisher,
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
        client: &Publisher,
        events: &mut Poller,
    ) -> Result<(), SessionError> {
        let topic = topics::availability(&self.config.prefix);
        let _ = client.publish(&topic, true, b"offline".to_vec());
        client.disconnect();
        let drain = async {
            while let Ok(ev) = events.poll().await {
                if matches!(ev, Happened::Closed) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        Ok(())
    }
}
