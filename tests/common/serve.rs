//! A `tclseg serve` process for tests: a config file written as given, a NOTIFY_SOCKET, the log in a file,
//! plain HTTP requests over TCP and SIGTERM with a bounded wait.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

/// The global part of a config on the tiny fixture bundle (CPU, one thread), listening on `listen`.
pub fn globals(listen: &str) -> String {
    format!(
        "[model]\npath = \"{}\"\ndevice = \"cpu\"\nthreads = 1\n[http]\nlisten = \"{listen}\"\n",
        super::fixture_bundle().display()
    )
}

/// A folder pipeline (watching `inbox`, created here) writing to `out`, with `extra` keys.
pub fn folder_pipeline(name: &str, inbox: &Path, out: &Path, extra: &str) -> String {
    std::fs::create_dir_all(inbox).expect("inbox");
    format!(
        "[[pipeline]]\nname = \"{name}\"\nsource = \"folder://{}\"\nqueries = [\"red square\"]\n{extra}\n[pipeline.output]\ndir = \"{}\"\n",
        inbox.display(),
        out.display()
    )
}

/// A response: status code, head and body.
pub struct Reply {
    pub code: u16,
    pub head: String,
    pub body: String,
}

/// One HTTP/1.1 request to 127.0.0.1:`port` with extra header lines (each ending in \r\n).
pub fn request(port: u16, method: &str, path: &str, headers: &str) -> Reply {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return Reply {
            code: 0,
            head: String::new(),
            body: String::new(),
        };
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Content-Length: 0\r\n\r\n"
    );
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Reply {
        code,
        head: head.to_string(),
        body: body.to_string(),
    }
}

pub struct Serve {
    pub child: Child,
    pub port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
    notify: UnixDatagram,
}

impl Serve {
    /// Writes `config_text` to `dir/serve.toml` and starts `tclseg serve` on it; `port` is where its HTTP is.
    pub fn start(dir: &Path, config_text: &str, port: u16) -> Serve {
        Serve::start_with_env(dir, config_text, port, &[])
    }

    /// `start` with extra environment variables.
    pub fn start_with_env(
        dir: &Path,
        config_text: &str,
        port: u16,
        env: &[(&str, &Path)],
    ) -> Serve {
        let config = dir.join("serve.toml");
        std::fs::write(&config, config_text).expect("write config");
        let socket = dir.join("notify.sock");
        let _ = std::fs::remove_file(&socket);
        let notify = UnixDatagram::bind(&socket).expect("bind notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let log = dir.join("serve.log");
        let child = Command::new(env!("CARGO_BIN_EXE_tclseg"))
            .args(["serve", "--config", config.to_str().expect("utf-8")])
            .envs(env.iter().copied())
            .env("NOTIFY_SOCKET", &socket)
            .env_remove("WATCHDOG_USEC")
            .env("TCLSEG_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start tclseg serve");
        Serve {
            child,
            port,
            config,
            log,
            notify,
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        request(self.port, "GET", path, "")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Notify messages received so far.
    pub fn notifications(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.notify.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    /// Waits until the daemon has started (READY=1 sent or /readyz answered 200) or exited.
    pub fn wait_started(&self, notes: &mut Vec<String>) {
        wait_until("READY=1", Duration::from_secs(90), || {
            notes.extend(self.notifications());
            notes.iter().any(|n| n.contains("READY=1"))
        });
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
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        self.wait_exit(timeout).unwrap_or_else(|| {
            panic!(
                "no exit within {timeout:?} of SIGTERM; log:\n{}",
                self.log_text()
            )
        })
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
