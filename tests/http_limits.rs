//! The HTTP control plane's limits, over real sockets: a client that sends part of a request head and stalls
//! (slowloris) or sends nothing does not hold up other requests and is disconnected after the header timeout
//! (5 s); a head over the size limit is refused; the daemon still stops cleanly with a stalled client connected.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::config::{Config, Pipeline};
use common::daemon::Daemon;
use common::wait_until;

/// Sends `raw` as the whole request and returns the status code of the answer (0: none, connection closed).
fn exchange(port: u16, raw: &[u8]) -> u16 {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = stream.write_all(raw);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// True while the server keeps `stream` open without answering.
fn still_open(stream: &mut TcpStream) -> bool {
    stream.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8; 1];
    let open = matches!(stream.read(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock);
    stream.set_nonblocking(false).expect("blocking");
    open
}

/// Waits for the server to close `stream` (EOF or reset) and returns how long that took from `since`.
fn closed_after(stream: &mut TcpStream, since: Instant) -> Duration {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the stalled connection was not closed within 30 s: {e}"),
    }
    since.elapsed()
}

#[test]
fn a_stalled_client_blocks_nobody_and_is_dropped_after_the_header_timeout() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = Pipeline::folder("p", &dir.path().join("in"), &dir.path().join("out"))
        .with("queries = [\"red square\"]");
    let mut daemon = Daemon::start(dir.path(), &Config::new().pipeline(p));
    let port = daemon.port;
    wait_until("/readyz 200", Duration::from_secs(90), || {
        daemon.get("/readyz").code == 200
    });

    // One client sends half a request head, another nothing at all; both then stall.
    let stalled_at = Instant::now();
    let mut partial = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    partial
        .write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .expect("write");
    let mut silent = TcpStream::connect(("127.0.0.1", port)).expect("connect");

    // Meanwhile every other request is answered at once.
    for path in ["/livez", "/readyz", "/metrics", "/status"] {
        let start = Instant::now();
        assert_eq!(daemon.get(path).code, 200, "{path} while a client stalls");
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{path} took {:?} while a client stalls",
            start.elapsed()
        );
    }
    assert!(
        stalled_at.elapsed() >= Duration::from_secs(4) || still_open(&mut partial),
        "the stalled connection was closed before the header timeout"
    );

    // Both are disconnected once the header timeout (5 s) has passed, not before.
    for (what, stream) in [("partial head", &mut partial), ("silent", &mut silent)] {
        let after = closed_after(stream, stalled_at);
        assert!(
            after >= Duration::from_millis(4500) && after < Duration::from_secs(20),
            "{what}: closed after {after:?}"
        );
    }

    // A request head over the 16 KiB limit is refused, and the server goes on.
    let huge = format!(
        "GET /livez HTTP/1.1\r\nHost: localhost\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    let code = exchange(port, huge.as_bytes());
    assert!(
        code == 0 || (400..500).contains(&code),
        "oversized head: {code}"
    );
    assert_eq!(daemon.get("/livez").code, 200);

    // SIGTERM with a stalled client still connected: the daemon drains and exits cleanly, without waiting on it.
    let mut lingering = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    lingering
        .write_all(b"GET /livez HTTP/1.1\r\n")
        .expect("write");
    let status = daemon.terminate(Duration::from_secs(60));
    let log = daemon.log_text();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("stopped cleanly"), "{log}");
}
