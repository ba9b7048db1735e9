//! `tclseg serve` and the project's RTSP test server (examples/rtsp_server.rs, built by `cargo test`) as child
//! processes: start, HTTP requests and /metrics, the notify messages and the log, signals, a bounded stop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::config::Config;
use super::{arg, signal, wait_until};

/// An HTTP response: status code (0 when nothing answered), head and body (as text, and as the bytes sent).
pub struct Reply {
    pub code: u16,
    pub head: String,
    pub body: String,
    pub bytes: Vec<u8>,
}

impl Reply {
    /// The value of the header `name` (case-insensitive), if the answer has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port` with extra header lines (each ending in \r\n).
pub fn request(port: u16, method: &str, path: &str, headers: &str) -> Reply {
    request_with_body(port, method, path, headers, &[])
}

/// `request` with a body (its `Content-Length` is added). A server that answers before reading the whole body
/// may close the connection on the rest: what it answered is still read.
pub fn request_with_body(port: u16, method: &str, path: &str, headers: &str, body: &[u8]) -> Reply {
    request_to_host(port, "localhost", method, path, headers, body)
}

/// `request_with_body` naming `host` in the Host header (what a browser sends for the name it resolved).
pub fn request_to_host(
    port: u16,
    host: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> Reply {
    let mut raw = Vec::new();
    if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Content-Length: {}\r\n\r\n",
            body.len()
        );
        let _ = stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body));
        let _ = stream.read_to_end(&mut raw);
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let bytes = raw.get(split + 4..).unwrap_or_default().to_vec();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Reply {
        code,
        head,
        body: String::from_utf8_lossy(&bytes).into_owned(),
        bytes,
    }
}

/// The value of `name{labels}` in a Prometheus text, if it is there.
pub fn find_metric(body: &str, name: &str, labels: &str) -> Option<f64> {
    let key = if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{labels}}}")
    };
    body.lines()
        .find_map(|l| l.strip_prefix(&key).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// The value of `name{labels}` in a Prometheus text (0 when absent).
pub fn metric(body: &str, name: &str, labels: &str) -> f64 {
    find_metric(body, name, labels).unwrap_or(0.0)
}

/// The daemon under test: its config file, HTTP port, notify messages and log file (`serve.toml`,
/// `notify.sock` and `serve.log` in the test's folder).
pub struct Daemon {
    pub child: Child,
    /// Where its HTTP listens on 127.0.0.1 (0: HTTP off).
    pub port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Filled by a thread that reads the notify socket as systemd does, all the time: a receiver that only reads
    /// at the end would let the socket's short queue (10 datagrams by default) fill, and the daemon drops what
    /// does not fit.
    notify: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn start(dir: &Path, config: &Config) -> Daemon {
        Daemon::start_text(dir, &config.text(), config.port, &[])
    }

    /// `start` with extra environment variables.
    pub fn start_with_env(dir: &Path, config: &Config, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_text(dir, &config.text(), config.port, env)
    }

    /// Writes `text` (a config the builder cannot express, a broken one) to `dir/serve.toml` and starts
    /// `tclseg serve` on it, with a NOTIFY_SOCKET, WATCHDOG_USEC of 2 s and the log at INFO; `port` is where its
    /// HTTP listens.
    pub fn start_text(dir: &Path, text: &str, port: u16, env: &[(&str, &str)]) -> Daemon {
        let config = dir.join("serve.toml");
        std::fs::write(&config, text).expect("write config");
        let socket = dir.join("notify.sock");
        let _ = std::fs::remove_file(&socket);
        let socket_reader = UnixDatagram::bind(&socket).expect("bind notify socket");
        socket_reader
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let notify = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::clone(&notify);
        // Ends once the `Daemon` (the other owner of the message list) is gone.
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while Arc::strong_count(&received) > 1 {
                if let Ok(n) = socket_reader.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    received.lock().expect("notify log").push(text);
                }
            }
        });
        let log = dir.join("serve.log");
        let child = Command::new(super::tclseg_bin())
            .args(["serve", "--config", arg(&config)])
            .envs(env.iter().copied())
            .env("NOTIFY_SOCKET", &socket)
            .env("WATCHDOG_USEC", "2000000")
            .env_remove("WATCHDOG_PID")
            .env("TCLSEG_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start tclseg serve");
        Daemon {
            child,
            port,
            config,
            log,
            notify,
        }
    }

    /// Replaces the config file (for a reload).
    pub fn rewrite(&self, config: &Config) {
        config.write(&self.config);
    }

    /// Notify messages received so far.
    pub fn notifications(&self) -> Vec<String> {
        // The reader thread may still be taking the last datagrams off the socket.
        std::thread::sleep(Duration::from_millis(200));
        self.notify.lock().expect("notify log").clone()
    }

    /// Waits until a notify message contains `what` (90 s at most) and returns it.
    pub fn wait_notified(&self, what: &str) -> String {
        let mut found = None;
        wait_until(what, Duration::from_secs(90), || {
            found = self
                .notify
                .lock()
                .expect("notify log")
                .iter()
                .find(|n| n.contains(what))
                .cloned();
            found.is_some()
        });
        found.unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Reply {
        request(self.port, "GET", path, "")
    }

    /// A POST, with `Authorization: Bearer TOKEN` when a token is given.
    pub fn post(&self, path: &str, token: Option<&str>) -> Reply {
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        request(self.port, "POST", path, &auth)
    }

    /// The /metrics text (empty when the daemon does not answer).
    pub fn metrics(&self) -> String {
        self.get("/metrics").body
    }

    /// The value of `name{labels}` in /metrics (0 when absent or unreachable).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        metric(&self.metrics(), name, labels)
    }

    /// One events destination's figure (`depth`, `delivered`, `retried`, `dropped`) in /status, if listed.
    pub fn delivery(&self, destination: &str, figure: &str) -> Option<u64> {
        let status: serde_json::Value = serde_json::from_str(&self.get("/status").body).ok()?;
        status["events"]
            .as_array()?
            .iter()
            .find(|d| d["destination"] == destination)?[figure]
            .as_u64()
    }

    pub fn frames_out(&self, pipeline: &str) -> f64 {
        self.metric(
            "tclseg_frames_out_total",
            &format!("pipeline=\"{pipeline}\""),
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for /readyz to answer 200 (90 s at most: the model loads first).
    pub fn wait_ready(&self) {
        wait_until("/readyz 200", Duration::from_secs(90), || {
            self.get("/readyz").code == 200
        });
    }

    pub fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    /// The exit status, waiting at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then the exit status (panics after `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(timeout).unwrap_or_else(|| {
            panic!(
                "no exit within {timeout:?} of SIGTERM; log:\n{}",
                self.log_text()
            )
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The RTSP test server as a child process, so it can be killed, frozen and restarted on its port. Its streams
/// (`stream0`, `stream1`, …) show a moving test picture at 10 fps; the URLs carry the password `hunter2`.
pub struct RtspServer {
    pub child: Child,
    pub port: u16,
}

/// How to start an [`RtspServer`]: port 0 (any), one stream, 320x240, every transport.
pub struct RtspOptions {
    port: u16,
    streams: usize,
    size: &'static str,
    protocols: &'static str,
}

impl RtspOptions {
    pub fn port(mut self, port: u16) -> RtspOptions {
        self.port = port;
        self
    }

    pub fn streams(mut self, streams: usize) -> RtspOptions {
        self.streams = streams;
        self
    }

    pub fn size(mut self, size: &'static str) -> RtspOptions {
        self.size = size;
        self
    }

    /// The transports it accepts: `all`, `tcp` or `udp`.
    pub fn protocols(mut self, protocols: &'static str) -> RtspOptions {
        self.protocols = protocols;
        self
    }

    pub fn start(self) -> RtspServer {
        let mut child = Command::new(bin_dir().join("examples/rtsp_server"))
            .args([
                "--port",
                &self.port.to_string(),
                "--streams",
                &self.streams.to_string(),
                "--size",
                self.size,
                "--fps",
                "10",
                "--protocols",
                self.protocols,
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
}

/// Cargo's own output folder of this test build (its `examples/` are built by `cargo test`, never by setup), so
/// not the folder of `tclseg_bin`, which may be the release build.
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_tclseg"))
        .parent()
        .expect("bin dir")
        .to_path_buf()
}

impl RtspServer {
    pub fn options() -> RtspOptions {
        RtspOptions {
            port: 0,
            streams: 1,
            size: "320x240",
            protocols: "all",
        }
    }

    /// One stream at 320x240 on any free port.
    pub fn start() -> RtspServer {
        RtspServer::options().start()
    }

    pub fn url(&self, stream: usize) -> String {
        format!(
            "rtsp://viewer:hunter2@127.0.0.1:{}/stream{stream}",
            self.port
        )
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        // A frozen (SIGSTOPped) server must be continued to die cleanly.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        self.kill();
    }
}
