//! Benchmark of the events path: the outbox's sustained write rate, events delivered end to end through a real
//! broker, and raw MQTT publishes of the same payloads as the reference, all in one run.
//!
//! ```text
//! cargo build --release --example bench_events
//! target/release/examples/bench_events [--events 2000] [--seconds 20] [--rate 0]
//! ```
//! Starts its own Debian `mosquitto` on a free loopback port (files in a temp dir), kills it at the end. A phase
//! stops after `--events` or `--seconds`; `--rate R` offers phases 2 and 3 at R/s (0: unpaced, latency queues):
//! 1. outbox: `Outbox::push` of one event at a time, each an fsync'd commit, on the temp dir's disk;
//! 2. end to end: `Events::observe` on synthetic frames (one event each), the MQTT delivery task, a rumqttc QoS 1
//!    subscriber on `<prefix>/events`; latency: frame time (µs, in the event's `outputs`) to receipt, same clock;
//! 3. reference: the same event bodies (restamped) published by a rumqttc QoS 1 client straight to the broker.
//!
//! The ratio is what the outbox costs (an fsync'd commit per frame, read back, acknowledged), plus the sink's two
//! retained state publishes per event, which the reference does not send.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use tclseg::events::{
    Event, Events, EventsConfig, FrameStats, MqttConfig, Outbox, OutboxConfig, QueryStats,
};
use tokio::sync::watch;

#[derive(Clone, Copy)]
struct Args {
    events: usize,
    seconds: f64,
    /// Frames (or raw publishes) offered per second in phases 2 and 3; 0: as fast as they go.
    rate: f64,
}

/// `--events N`, `--seconds S` and `--rate R`, each optional.
fn parse_args() -> Result<Args> {
    let mut a = Args {
        events: 2000,
        seconds: 20.0,
        rate: 0.0,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let v = pair.get(1).map(String::as_str).unwrap_or_default();
        match pair[0].as_str() {
            "--events" => a.events = v.parse().context("--events N")?,
            "--seconds" => a.seconds = v.parse().context("--seconds S")?,
            "--rate" => a.rate = v.parse().context("--rate R")?,
            other => bail!("unknown argument {other} (--events N, --seconds S, --rate R)"),
        }
    }
    Ok(a)
}

/// How long to wait before offering item `i` of a phase begun at `start`; None once the phase is over.
fn pace(a: &Args, start: Instant, i: usize) -> Option<Duration> {
    let due = i as f64 / a.rate; // NaN or infinite when unpaced
    let due = if due.is_finite() { due } else { 0.0 };
    let now = start.elapsed().as_secs_f64();
    (i < a.events && due.max(now) < a.seconds)
        .then(|| Duration::from_secs_f64((due - now).max(0.0)))
}

/// Wall-clock µs since the epoch: the frame stamp and the receive time use this same clock.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// No cap on the subscriber's queue: the default (1000) would drop messages when the publisher runs ahead.
const CONF: &str = "allow_anonymous true\npersistence false\nmax_queued_messages 0\n";

/// Debian's mosquitto on a loopback port; killed on drop so an early error does not leave it running.
struct Broker {
    child: Child,
    port: u16,
}

impl Broker {
    fn start(dir: &Path) -> Result<Broker> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port")?
            .port();
        let conf = format!("listener {port} 127.0.0.1\n{CONF}");
        let conf_path = dir.join("mosquitto.conf");
        std::fs::write(&conf_path, conf).context("writing mosquitto.conf")?;
        let log = std::fs::File::create(dir.join("mosquitto.log")).context("mosquitto.log")?;
        let child = Command::new("mosquitto")
            .args([Path::new("-c"), &conf_path])
            .stderr(log)
            .spawn()
            .context("starting mosquitto (Debian package mosquitto)")?;
        let broker = Broker { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("mosquitto did not listen on port {port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(broker)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (frame stamp µs, receive µs) per message received.
type Got = Arc<Mutex<Vec<(u64, u64)>>>;

/// The stamp a message carries: `t_us=<µs>` in `outputs`.
fn stamp_of(payload: &[u8]) -> Option<u64> {
    let event: Event = serde_json::from_slice(payload).ok()?;
    event.outputs?.strip_prefix("t_us=")?.parse().ok()
}

/// A QoS 1 subscriber on `topic` (own client id); returns once the broker has acknowledged the subscription.
async fn subscribe(port: u16, topic: &str) -> Result<Got> {
    let got: Got = Arc::default();
    let id = format!("sub-{}", topic.replace('/', "-"));
    let (client, mut lp) = AsyncClient::new(MqttOptions::new(id, "127.0.0.1", port), 1024);
    client
        .subscribe(topic, QoS::AtLeastOnce)
        .await
        .context("subscribe")?;
    let (acked, mut suback) = watch::channel(false);
    let sink = got.clone();
    tokio::spawn(async move {
        let _client = client;
        loop {
            match lp.poll().await {
                Ok(MqttEvent::Incoming(Packet::SubAck(_))) => _ = acked.send(true),
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    let t = now_us();
                    if let Some(s) = stamp_of(&p.payload) {
                        sink.lock().unwrap_or_else(|e| e.into_inner()).push((s, t));
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), suback.wait_for(|a| *a))
        .await
        .context("subscriber: no SUBACK in 10 s")?
        .context("subscriber task ended")?;
    Ok(got)
}

/// Wait (up to 30 s) for `n` messages; returns what arrived.
async fn collect(got: &Got, n: usize) -> Vec<(u64, u64)> {
    let lock = || got.lock().unwrap_or_else(|e| e.into_inner());
    let deadline = Instant::now() + Duration::from_secs(30);
    while lock().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    got.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Prints one line and returns [events/s from the first stamp to the last receipt, latency p50 ms, p95 ms].
fn report(label: &str, sent: usize, got: &[(u64, u64)]) -> Result<[f64; 3]> {
    let (Some(first), Some(last)) = (got.iter().min(), got.iter().max_by_key(|g| g.1)) else {
        bail!("{label}: nothing received");
    };
    let rate = got.len() as f64 / ((last.1 - first.0) as f64 / 1e6).max(1e-6);
    let mut lat: Vec<f64> = got
        .iter()
        .map(|(s, r)| r.saturating_sub(*s) as f64 / 1e3)
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    let (p50, p95) = (pct(0.5), pct(0.95));
    println!(
        "{label:<12} {sent:>8} {:>9} {rate:>10.1} {p50:>9.2} {p95:>9.2}",
        got.len()
    );
    Ok([rate, p50, p95])
}

/// Frame `i` of the synthetic pipeline: the query is present in even frames and absent in odd ones, so with zero
/// hysteresis every frame starts or ends a presence.
fn frame(i: usize) -> FrameStats {
    let present = i.is_multiple_of(2);
    FrameStats {
        pipeline: "cam".into(),
        at_ms: now_us() / 1000,
        queries: vec![QueryStats {
            label: 1,
            name: "person".into(),
            fraction: if present { 0.25 } else { 0.0 },
            bbox: present.then_some([10, 20, 300, 200]),
            mean_score: present.then_some(0.8),
        }],
        model: "0".repeat(64),
        outputs: Some(format!("t_us={}", now_us())),
        ..FrameStats::default()
    }
}

/// Phase 1: fsync'd pushes of one event each (a start made by the presence state); returns (pushes, pushes/s).
fn outbox_rate(dir: &Path, config: &EventsConfig, args: &Args) -> Result<(usize, f64)> {
    let outbox =
        Outbox::open(&dir.join("rate.redb"), u64::MAX, &["bench"]).context("opening the outbox")?;
    let event = config.pipeline_state("cam", "bench").observe(&frame(0));
    anyhow::ensure!(!event.is_empty(), "the synthetic frame made no event");
    let start = Instant::now();
    let mut n = 0;
    while n < args.events && start.elapsed().as_secs_f64() < args.seconds {
        outbox.push(&event).context("push")?;
        n += 1;
    }
    Ok((n, n as f64 / start.elapsed().as_secs_f64()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let dir = tempfile::tempdir().context("temp dir")?;
    let broker = Broker::start(dir.path())?;
    let config = EventsConfig {
        on_s: 0.0,
        off_s: 0.0,
        update_s: 0.0,
        outbox: OutboxConfig {
            path: Some(dir.path().join("events.redb")),
            capacity: u64::MAX,
        },
        mqtt: Some(MqttConfig {
            port: Some(broker.port),
            prefix: "bench".into(),
            client_id: "bench-events".into(),
            ..MqttConfig::default()
        }),
        ..EventsConfig::default()
    };
    let (pushes, push_rate) = outbox_rate(dir.path(), &config, &args)?;
    println!("outbox: {pushes} pushes, {push_rate:.1} pushes/s (one fsync'd commit each)");
    println!("path             sent  received   events/s    p50 ms    p95 ms");

    // Phase 2: frames → Events::observe → outbox → MQTT delivery task → broker → subscriber.
    let got = subscribe(broker.port, "bench/events").await?;
    let events = Events::open(config, dir.path()).context("opening events")?;
    let (_catalog, catalog_rx) = watch::channel(Vec::new());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let tasks = events.spawn(catalog_rx, shutdown_rx);
    // observe blocks on the fsync: off the tokio workers, as the daemon's output path does.
    let made = tokio::task::spawn_blocking(move || -> Result<Vec<Event>> {
        let (start, mut made, mut i) = (Instant::now(), Vec::new(), 0);
        while let Some(wait) = pace(&args, start, i) {
            std::thread::sleep(wait);
            made.extend(events.observe(&frame(i)).context("observe")?);
            i += 1;
        }
        Ok(made)
    })
    .await
    .context("feeder thread")??;
    let e2e = report("end to end", made.len(), &collect(&got, made.len()).await)?;
    let _ = shutdown.send(true);
    for t in tasks {
        let _ = t.await;
    }
    // Phase 3: the same bodies, restamped, straight to the broker with QoS 1.
    let got = subscribe(broker.port, "bench/raw").await?;
    let (client, mut lp) =
        AsyncClient::new(MqttOptions::new("bench-raw", "127.0.0.1", broker.port), 64);
    tokio::spawn(async move { while lp.poll().await.is_ok() {} });
    let (start, mut sent) = (Instant::now(), 0);
    while let (Some(wait), Some(e)) = (pace(&args, start, sent), made.get(sent)) {
        if !wait.is_zero() {
            // A zero sleep still waits for tokio's next timer tick (1 ms), which would pace an unpaced run.
            tokio::time::sleep(wait).await;
        }
        let mut e = e.clone();
        e.outputs = Some(format!("t_us={}", now_us()));
        client
            .publish("bench/raw", QoS::AtLeastOnce, false, e.to_json())
            .await
            .context("raw publish")?;
        sent += 1;
    }
    let raw = report("raw mqtt", sent, &collect(&got, sent).await)?;
    drop(broker);
    let [r0, r1, r2] = [0, 1, 2].map(|k| e2e[k] / raw[k].max(1e-9));
    println!("ratio end to end / raw mqtt: events/s {r0:.2}x, p50 {r1:.2}x, p95 {r2:.2}x");
    Ok(())
}
