//! Running `tclseg serve` and the project's RTSP test server (examples/rtsp_server.rs) as child processes, for
//! the end-to-end tests outside tests/serve.rs: start, wait for a condition, read the log and /metrics, stop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::fixture_bundle;

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_tclseg"))
        .parent()
        .expect("bin dir")
        .to_path_buf()
}

/// Polls `check` every 100 ms; returns as soon as it holds, panics after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The RTSP test server; `protocols` is `all`, `tcp` or `udp` (the transports it accepts).
pub struct RtspServer {
    pub child: Child,
    pub port: u16,
}

impl RtspServer {
    pub fn start(protocols: &str) -> RtspServer {
        let mut child = Command::new(bin_dir().join("examples/rtsp_server"))
            .args([
                "--port",
                "0",
                "--size",
                "160x120",
                "--fps",
                "10",
                "--protocols",
                protocols,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start examples/rtsp_server (built by cargo test)");
        let mut out = child.stdout.take().expect("stdout");
        let mut text = String::new();
        let mut byte = [0u8; 1];
        while !text.ends_with('\n') {
            match out.read(&mut byte) {
                Ok(1) => text.push(byte[0] as char),
                _ => panic!("rtsp_server exited before printing its port: {text}"),
            }
        }
        let port = text
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("bad rtsp_server banner: {text}"));
        RtspServer { child, port }
    }

    pub fn url(&self) -> String {
        format!("rtsp://viewer:hunter2@127.0.0.1:{}/stream0", self.port)
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tclseg serve` on the tiny fixture model with the given `[[pipeline]]` tables, its log in `dir/serve.log`.
pub struct Daemon {
    pub child: Child,
    pub http: u16,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(dir: &Path, pipelines: &str) -> Daemon {
        let http = free_port();
        let config = dir.join("serve.toml");
        std::fs::write(
            &config,
            format!(
                "[model]\npath = \"{}\"\ndevice = \"cpu\"\nthreads = 1\n[http]\nlisten = \"127.0.0.1:{http}\"\n{pipelines}",
                fixture_bundle().display()
            ),
        )
        .expect("write config");
        let log = dir.join("serve.log");
        let child = Command::new(env!("CARGO_BIN_EXE_tclseg"))
            .args(["serve", "--config", config.to_str().expect("utf-8")])
            .env("TCLSEG_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start tclseg serve");
        Daemon { child, http, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of `name{labels}` in /metrics (0 when absent or unreachable).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let body = http_get(self.http, "/metrics");
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            format!("{name}{{{labels}}}")
        };
        body.lines()
            .find_map(|l| l.strip_prefix(&key).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    pub fn frames_out(&self, pipeline: &str) -> f64 {
        self.metric(
            "tclseg_frames_out_total",
            &format!("pipeline=\"{pipeline}\""),
        )
    }

    pub fn wait_ready(&self) {
        wait_until("/readyz 200", Duration::from_secs(60), || {
            http_get(self.http, "/readyz").starts_with("HTTP/1.1 200")
        });
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole HTTP response (status line included); empty when the daemon does not answer.
pub fn http_get(port: u16, path: &str) -> String {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
    );
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

/// A `[[pipeline]]` table writing into `out`, with short watchdog and backoff; `extra` adds keys.
pub fn pipeline_toml(name: &str, source: &str, out: &Path, extra: &str) -> String {
    format!(
        "[[pipeline]]\nname = \"{name}\"\nsource = \"{source}\"\nqueries = [\"red square\", \"blue circle\"]\nwatchdog_s = 5\nbackoff_initial_s = 0.2\nbackoff_max_s = 1\n{extra}\n[pipeline.output]\ndir = \"{}\"\n",
        out.display()
    )
}

/// Files under `dir` (recursively) whose names end with `suffix`, sorted.
pub fn files_with_suffix(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                found.push(p);
            }
        }
    }
    found.sort();
    found
}
