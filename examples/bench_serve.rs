//! Soak benchmark of `tclseg serve`: K local RTSP streams into the daemon for a while, then per-stream processed
//! fps against the offered rate, drops by reason, capture → written latency p50/p95 (from each frame's JSON line),
//! CPU use and RSS (start of the measured window vs end).
//!
//! ```text
//! cargo build --release --bins --examples
//! target/release/examples/bench_serve --streams 8 --cap 5 --seconds 300 [--model DIR] [--size 640x480] [--fps 15]
//!     [--pamr false] [--threads N] [--warmup S] [--device cpu|cuda|tensorrt|auto] [--precision fp32|fp16]
//!     [--max-batch N] [--find-max P95_MS] [--events]
//! ```
//! Uses target/release/tclseg and target/release/examples/rtsp_server. The first `--warmup` seconds (default 20)
//! are not measured. Prints a Markdown table for BENCHMARKS.md.
//!
//! `--find-max 200` answers "how many streams does this machine sustain": it runs trials of 1, 2, 4, … streams
//! (each `--seconds` long, fresh server and daemon), then bisects between the last that held and the first that
//! did not. A trial holds when every frame the cap lets through is processed (total processed ≥ 95 % of
//! streams × min(cap, fps)) and the capture → written latency p95 is under the limit. `--streams` is then the
//! upper bound of the search.
//!
//! `--events` measures what events cost: the whole run (one trial, or the `--find-max` search) twice in one
//! invocation, first without `[events]`, then with events delivered over MQTT to a Debian `mosquitto` the bench
//! starts on a free loopback port for each trial. The thresholds are the worst case (`min_area = 0`, `on_s`,
//! `off_s`, `update_s` 0): every query seen in a frame makes an event, so every frame is an fsync'd outbox commit.
//! It prints the events delivered per second, the outbox depth left at the end, and the ratios with / without.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Args {
    streams: usize,
    cap: f64,
    seconds: u64,
    warmup: u64,
    model: Option<PathBuf>,
    size: String,
    fps: u32,
    threads: usize,
    pamr: bool,
    device: String,
    precision: String,
    max_batch: usize,
    find_max: Option<f64>,
    events: bool,
}

/// What one trial measured, for the search and the `--events` comparison.
struct Trial {
    processed_ratio: f64,
    total_fps: f64,
    p50_ms: f64,
    p95_ms: f64,
    /// Daemon CPU, % of one core.
    cpu_pct: f64,
    /// Events the broker acknowledged per second of the window, and those left in the outbox at its end.
    events_per_s: f64,
    outbox_depth: f64,
}

/// One whole measurement: a single trial, or the search's answer (the streams sustained).
enum Outcome {
    Trial(Trial),
    Sustained(usize),
}

fn parse_args() -> Args {
    let mut a = Args {
        streams: 8,
        cap: 5.0,
        seconds: 300,
        warmup: 20,
        model: None,
        size: "640x480".into(),
        fps: 15,
        threads: 0,
        pamr: true,
        device: "cpu".into(),
        precision: "fp32".into(),
        max_batch: 4,
        find_max: None,
        events: false,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        if argv[i] == "--events" {
            a.events = true;
            i += 1;
            continue;
        }
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--streams" => a.streams = v.parse().expect("--streams N"),
            "--cap" => a.cap = v.parse().expect("--cap FPS"),
            "--seconds" => a.seconds = v.parse().expect("--seconds S"),
            "--warmup" => a.warmup = v.parse().expect("--warmup S"),
            "--model" => a.model = Some(PathBuf::from(v)),
            "--size" => a.size = v,
            "--fps" => a.fps = v.parse().expect("--fps N"),
            "--threads" => a.threads = v.parse().expect("--threads N"),
            "--pamr" => a.pamr = v.parse().expect("--pamr true|false"),
            "--device" => a.device = v,
            "--precision" => a.precision = v,
            "--max-batch" => a.max_batch = v.parse().expect("--max-batch N"),
            "--find-max" => a.find_max = Some(v.parse().expect("--find-max P95_MS")),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

fn release_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/release")
        .to_path_buf()
}

fn get(port: u16, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

fn metric(body: &str, key: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// (utime + stime in seconds, RSS in MiB) of a process from /proc.
fn cpu_rss(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, rss_kb / 1024.0)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((q * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1)]
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Debian's mosquitto on a free loopback port, for the `--events` trials; killed on drop.
struct Mosquitto {
    port: u16,
    _child: Kill,
}

impl Mosquitto {
    fn start(dir: &Path) -> Mosquitto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .expect("mosquitto.conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stderr(std::fs::File::create(dir.join("mosquitto.log")).expect("mosquitto.log"))
            .spawn()
            .expect("start mosquitto (Debian package mosquitto)");
        let child = Kill(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "mosquitto did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Mosquitto {
            port,
            _child: child,
        }
    }
}

fn main() {
    let args = parse_args();
    if !args.events {
        run(&args, false);
        return;
    }
    let without = run(&args, false);
    let with = run(&args, true);
    println!("\n## events overhead, same invocation (worst-case thresholds: an event per query seen per frame)");
    match (without, with) {
        (Outcome::Trial(a), Outcome::Trial(b)) => {
            println!(
                "processed fps: without events {:.2}, with events {:.2} (ratio {:.3})",
                a.total_fps,
                b.total_fps,
                b.total_fps / a.total_fps
            );
            println!(
                "latency capture→written p50/p95: without {:.0}/{:.0} ms, with {:.0}/{:.0} ms (p95 ratio {:.2})",
                a.p50_ms,
                a.p95_ms,
                b.p50_ms,
                b.p95_ms,
                b.p95_ms / a.p95_ms
            );
            println!(
                "daemon CPU: without {:.0}%, with {:.0}% of one core; daemon CPU per processed frame ratio {:.3}",
                a.cpu_pct,
                b.cpu_pct,
                (b.cpu_pct / b.total_fps) / (a.cpu_pct / a.total_fps)
            );
            println!(
                "events delivered to mosquitto {:.1}/s; outbox depth at the end of the window {:.0}",
                b.events_per_s, b.outbox_depth
            );
        }
        (Outcome::Sustained(a), Outcome::Sustained(b)) => println!(
            "streams sustained: without events {a}, with events {b} (ratio {:.2})",
            b as f64 / a.max(1) as f64
        ),
        _ => unreachable!("both runs take the same path"),
    }
}

/// The run the arguments ask for, with or without events.
fn run(args: &Args, events: bool) -> Outcome {
    let Some(limit_ms) = args.find_max else {
        return Outcome::Trial(trial(args, args.streams, events));
    };
    let holds = |k: usize| {
        let t = trial(args, k, events);
        let ok = t.processed_ratio >= 0.95 && t.p95_ms < limit_ms;
        println!(
            "\ntrial {k} streams: processed {:.0} % of offered, p95 {:.0} ms: {}\n",
            100.0 * t.processed_ratio,
            t.p95_ms,
            if ok { "holds" } else { "does not hold" }
        );
        ok
    };
    let (mut good, mut bad) = (0usize, None);
    let mut k = 1;
    while k <= args.streams {
        if holds(k) {
            good = k;
            k *= 2;
        } else {
            bad = Some(k);
            break;
        }
    }
    if let Some(mut hi) = bad {
        while hi - good > 1 {
            let mid = (good + hi) / 2;
            if holds(mid) {
                good = mid;
            } else {
                hi = mid;
            }
        }
    }
    println!(
        "sustained{}: {good} streams of {} at {} fps (cap {}), p95 < {limit_ms} ms, device {} {}, max_batch {}{}",
        if events { " with events" } else { "" },
        args.size,
        args.fps,
        args.cap,
        args.device,
        args.precision,
        args.max_batch,
        if bad.is_none() {
            format!(" (the search's upper bound, --streams {}, held)", args.streams)
        } else {
            String::new()
        }
    );
    Outcome::Sustained(good)
}

/// One soak run of `streams` streams; prints its table and returns what the search needs.
fn trial(args: &Args, streams: usize, events: bool) -> Trial {
    let dir = tempfile::tempdir().expect("tmp");
    let broker = events.then(|| Mosquitto::start(dir.path()));
    let release = release_dir();
    let mut server = Command::new(release.join("examples/rtsp_server"))
        .args([
            "--streams",
            &streams.to_string(),
            "--size",
            &args.size,
            "--fps",
            &args.fps.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rtsp_server (cargo build --release --bins --examples)");
    let mut banner = String::new();
    let mut out = server.stdout.take().expect("stdout");
    let mut b = [0u8; 1];
    while !banner.ends_with('\n') && out.read(&mut b).map(|n| n == 1).unwrap_or(false) {
        banner.push(b[0] as char);
    }
    let server = Kill(server);
    let port: u16 = banner
        .trim()
        .trim_start_matches("PORT ")
        .parse()
        .expect("rtsp port");
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut config = format!(
        "[model]\ndevice = \"{}\"\nprecision = \"{}\"\nthreads = {}\n{}[inference]\nmax_batch = {}\nmax_wait_ms = 20\n[http]\nlisten = \"127.0.0.1:{http}\"\n",
        args.device,
        args.precision,
        args.threads,
        args.model.as_ref().map(|m| format!("path = \"{}\"\n", m.display())).unwrap_or_default(),
        args.max_batch
    );
    for k in 0..streams {
        config.push_str(&format!(
            "[[pipeline]]\nname = \"s{k}\"\nsource = \"rtsp://127.0.0.1:{port}/stream{k}\"\nqueries = [\"red square\", \"blue circle\", \"green triangle\"]\nmax_fps = {}\npamr = {}\n[pipeline.output]\ndir = \"{}\"\nlabels = true\njson = false\njsonl = true\n",
            args.cap,
            args.pamr,
            dir.path().join(format!("s{k}")).display()
        ));
    }
    if let Some(b) = &broker {
        config.push_str(&format!(
            "[events]\nmin_area = 0.0\non_s = 0\noff_s = 0\nupdate_s = 0\n[events.outbox]\npath = \"{}\"\n[events.mqtt]\nport = {}\nprefix = \"bench\"\nclient_id = \"bench-serve\"\n",
            dir.path().join("events.redb").display(),
            b.port
        ));
    }
    let config_path = dir.path().join("bench.toml");
    std::fs::write(&config_path, config).expect("config");
    let log = std::fs::File::create(dir.path().join("serve.log")).expect("log");
    let daemon = Command::new(release.join("tclseg"))
        .args(["serve", "--config", config_path.to_str().expect("utf-8")])
        .env("TCLSEG_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start tclseg serve");
    let pid = daemon.id();
    let daemon = Kill(daemon);
    let start = Instant::now();
    while get(http, "/readyz").trim() != "ready" {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "daemon not ready"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(args.warmup));
    let (cpu0, rss0) = cpu_rss(pid);
    let (server_cpu0, _) = cpu_rss(server.0.id());
    let m0 = get(http, "/metrics");
    let t0 = Instant::now();
    let wall0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut rss_max = rss0;
    while t0.elapsed() < Duration::from_secs(args.seconds) {
        std::thread::sleep(Duration::from_secs(5));
        rss_max = rss_max.max(cpu_rss(pid).1);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (cpu1, rss1) = cpu_rss(pid);
    let (server_cpu1, _) = cpu_rss(server.0.id());
    let m1 = get(http, "/metrics");
    drop(daemon);
    drop(server);
    drop(broker);
    let mqtt = "{destination=\"mqtt\"}";
    let events_per_s = (metric(&m1, &format!("tclseg_events_delivered_total{mqtt}"))
        - metric(&m0, &format!("tclseg_events_delivered_total{mqtt}")))
        / elapsed;
    let outbox_depth = metric(&m1, &format!("tclseg_events_outbox_depth{mqtt}"));

    println!(
        "| stream | offered fps | processed fps | ratio | p50 ms | p95 ms | superseded | rate_cap | sink_backlog | other drops | reconnects |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut all = Vec::new();
    let (mut first_half, mut second_half) = (Vec::new(), Vec::new());
    let mut total_fps = 0.0;
    for k in 0..streams {
        let p = format!("pipeline=\"s{k}\"");
        let delta = |name: &str, extra: &str| {
            let key = format!("{name}{{{p}{extra}}}");
            metric(&m1, &key) - metric(&m0, &key)
        };
        let out = delta("tclseg_frames_out_total", "");
        let fps = out / elapsed;
        total_fps += fps;
        let offered = args.cap.min(f64::from(args.fps));
        let jsonl = std::fs::read_to_string(dir.path().join(format!("s{k}/s{k}.jsonl")))
            .unwrap_or_default();
        let timed: Vec<(u64, f64)> = jsonl
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["frame"]["wall_ms"].as_u64().unwrap_or(0) >= wall0)
            .filter_map(|v| {
                Some((
                    v["frame"]["wall_ms"].as_u64()?,
                    v["frame"]["latency_ms"].as_f64()?,
                ))
            })
            .collect();
        let mid = wall0 + (elapsed * 500.0) as u64;
        first_half.extend(timed.iter().filter(|(t, _)| *t < mid).map(|(_, l)| *l));
        second_half.extend(timed.iter().filter(|(t, _)| *t >= mid).map(|(_, l)| *l));
        let mut lat: Vec<f64> = timed.iter().map(|(_, l)| *l).collect();
        lat.sort_by(f64::total_cmp);
        all.extend_from_slice(&lat);
        let other: f64 = ["decode_error", "inference_error", "write_error", "shutdown"]
            .iter()
            .map(|r| delta("tclseg_frames_dropped_total", &format!(",reason=\"{r}\"")))
            .sum();
        println!(
            "| s{k} | {offered:.1} | {fps:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {other:.0} | {:.0} |",
            fps / offered,
            percentile(&lat, 0.5),
            percentile(&lat, 0.95),
            delta("tclseg_frames_dropped_total", ",reason=\"superseded\""),
            delta("tclseg_frames_dropped_total", ",reason=\"rate_cap\""),
            delta("tclseg_frames_dropped_total", ",reason=\"sink_backlog\""),
            delta("tclseg_reconnects_total", ""),
        );
    }
    all.sort_by(f64::total_cmp);
    let offered_total = args.cap.min(f64::from(args.fps)) * streams as f64;
    println!();
    println!(
        "{} streams {} @ {} fps, cap {} fps, PAMR {}, device {} {}, {:.0} s measured after {} s warm-up, events {}",
        streams,
        args.size,
        args.fps,
        args.cap,
        if args.pamr { "on" } else { "off" },
        args.device,
        args.precision,
        elapsed,
        args.warmup,
        if events {
            format!("on ({events_per_s:.1} delivered/s, outbox depth at the end {outbox_depth:.0})")
        } else {
            "off".to_string()
        }
    );
    println!(
        "total processed {total_fps:.2} fps (offered {:.1}, ratio {:.2}); latency capture→written p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms over {} frames",
        offered_total,
        total_fps / offered_total,
        percentile(&all, 0.5),
        percentile(&all, 0.95),
        all.last().copied().unwrap_or(f64::NAN),
        all.len()
    );
    first_half.sort_by(f64::total_cmp);
    second_half.sort_by(f64::total_cmp);
    println!(
        "latency p50/p95 first half of the window {:.0}/{:.0} ms, second half {:.0}/{:.0} ms (growing latency would show here)",
        percentile(&first_half, 0.5),
        percentile(&first_half, 0.95),
        percentile(&second_half, 0.5),
        percentile(&second_half, 0.95)
    );
    let cpu_pct = 100.0 * (cpu1 - cpu0) / elapsed;
    println!(
        "daemon CPU {cpu_pct:.0}% of one core (RTSP server {:.0}%); RSS {rss0:.0} MiB at start of window, {rss1:.0} MiB at end ({:+.1}%), max {rss_max:.0} MiB",
        100.0 * (server_cpu1 - server_cpu0) / elapsed,
        100.0 * (rss1 - rss0) / rss0.max(1e-9)
    );
    Trial {
        processed_ratio: total_fps / offered_total,
        total_fps,
        p50_ms: percentile(&all, 0.5),
        p95_ms: percentile(&all, 0.95),
        cpu_pct,
        events_per_s,
        outbox_depth,
    }
}
