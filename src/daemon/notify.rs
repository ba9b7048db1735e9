//! systemd's notify protocol, spoken directly: one datagram per state change to `$NOTIFY_SOCKET` (a path, or an
//! abstract socket when it starts with '@'). Without the variable (not under systemd) every call is a no-op.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Sends `state` (e.g. "READY=1\nSTATUS=serving 3 pipelines"). Errors are logged, never fatal.
///
/// The send never blocks. A datagram socket whose receiver is slow or stuck has a short queue (Linux's
/// `net.unix.max_dgram_qlen` is 10 by default), and a blocking send would then stall the daemon's control loop
/// (signals, reload, shutdown) behind it. A message that finds the queue full is dropped with a warning: the next
/// state change or watchdog ping carries the current state again.
pub fn notify(state: &str) {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        send_to(&path.to_string_lossy(), state);
    }
}

/// One non-blocking datagram to the notify socket at `path`.
fn send_to(path: &str, state: &str) {
    let result = UnixDatagram::unbound().and_then(|sock| {
        sock.set_nonblocking(true)?;
        if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(state.as_bytes(), &addr)
        } else {
            sock.send_to(state.as_bytes(), path)
        }
    });
    match result {
        Ok(_) => {
            if QUEUE_FULL.swap(false, Ordering::Relaxed) {
                tracing::info!("sd_notify: the service manager takes messages again");
            }
        }
        // Said once per episode: a stuck receiver would otherwise get a line per watchdog ping.
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            if !QUEUE_FULL.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "sd_notify: the service manager's queue is full; dropping messages until it reads again"
                );
            }
        }
        Err(e) => tracing::warn!("sd_notify '{}' failed: {e}", state.replace('\n', " ")),
    }
}

/// Whether the last send found the receiver's queue full.
static QUEUE_FULL: AtomicBool = AtomicBool::new(false);

/// Half the watchdog period systemd asked for (`$WATCHDOG_USEC`, for this process per `$WATCHDOG_PID`).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver that never reads fills its queue; the sender must drop messages, not block. Before the fix this
    /// test hung on the 11th send (the kernel's default queue length is 10).
    #[test]
    fn a_full_notify_socket_never_blocks_the_sender() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("notify.sock");
        let receiver = UnixDatagram::bind(&path).expect("bind");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let sender_path = path.clone();
        std::thread::spawn(move || {
            for i in 0..200 {
                send_to(
                    &sender_path.to_string_lossy(),
                    &format!("STATUS=message {i}"),
                );
            }
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(20)).is_ok(),
            "sending to a full notify socket blocked"
        );
        let mut buf = [0u8; 64];
        let n = receiver
            .recv(&mut buf)
            .expect("the first messages were delivered");
        assert_eq!(&buf[..n], b"STATUS=message 0");
    }
}
