//! A real MQTT broker for the tests: Debian's mosquitto (scripts/setup installs it) on a free loopback port, and a
//! persistent-session subscriber.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use tclseg::events::{Catalog, MqttConfig, MqttSink, Outbox};
use tokio::sync::watch;

/// A mosquitto on a loopback port, with its config and persistence in a temp dir.
pub struct Broker {
    dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl Broker {
    pub fn start(dir: &Path, users: Option<(&str, &str)>) -> Broker {
        Broker::start_with(dir, users, "")
    }

    /// `start` with more mosquitto config lines (more listeners, TLS files, an ACL file).
    pub fn start_with(dir: &Path, users: Option<(&str, &str)>, extra: &str) -> Broker {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut conf = format!(
            "listener {port} 127.0.0.1\npersistence true\npersistence_location {}/\nlog_dest stderr\n",
            dir.display()
        );
        match users {
            Some((u, p)) => {
                let file = dir.join("passwd");
                let ok = Command::new("mosquitto_passwd")
                    .args(["-b", "-c"])
                    .arg(&file)
                    .args([u, p])
                    .status()
                    .expect("mosquitto_passwd (scripts/setup installs mosquitto)");
                assert!(ok.success());
                conf += &format!("allow_anonymous false\npassword_file {}\n", file.display());
            }
            None => conf += "allow_anonymous true\n",
        }
        // Started as root (CI's container), mosquitto drops to the `mosquitto` user, which cannot write the test's
        // private temp dir: saving the sessions at `stop` then fails (only the broker's log says so), the restarted
        // broker has forgotten the subscriber, and whatever is published before it subscribes again is lost: the
        // outage test's rare 30 s timeout whenever the sink reconnected first. Run as the dir's owner; as any user
        // but root, mosquitto ignores `user`.
        if std::fs::metadata(dir).is_ok_and(|m| m.uid() == 0) {
            conf += "user root\n";
        }
        conf += extra;
        std::fs::write(dir.join("mosquitto.conf"), conf).expect("write conf");
        let mut b = Broker {
            dir: dir.to_path_buf(),
            port,
            child: None,
        };
        b.restart();
        b
    }

    pub fn restart(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stderr(std::fs::File::create(self.dir.join("mosquitto.log")).expect("log"))
            .spawn()
            .expect("mosquitto (scripts/setup installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGHUP: mosquitto reads its ACL and password files again.
    pub fn reload(&self) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .arg("-HUP")
                .arg(c.id().to_string())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "could not signal mosquitto");
        }
    }

    /// SIGTERM, so mosquitto saves its persistent sessions (the subscriber's queue) as a real restart would.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
            // The subscriber counts on its session surviving a restart: fail here rather than as a missing message
            // later.
            let log = std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default();
            assert!(
                self.dir.join("mosquitto.db").exists() && !log.contains("Error saving"),
                "mosquitto did not save its persistent sessions: {log}"
            );
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub type Received = Arc<Mutex<Vec<(String, Vec<u8>, bool)>>>;

/// A persistent-session subscriber (QoS 1) that keeps reconnecting, so the broker queues for it while it is away.
/// Returns once the broker has acknowledged the first subscription, so nothing published after is missed.
pub async fn subscribe(port: u16, filter: &str, login: Option<(&str, &str)>) -> Received {
    subscribe_as("test-subscriber", false, port, filter, login).await
}

/// `subscribe` with its own client id; `clean`: a fresh session (it sees retained messages with their flag).
pub async fn subscribe_as(
    client_id: &str,
    clean: bool,
    port: u16,
    filter: &str,
    login: Option<(&str, &str)>,
) -> Received {
    let got: Received = Arc::default();
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_clean_session(clean);
    if let Some((u, p)) = login {
        o.set_credentials(u, p);
    }
    let (client, mut events) = AsyncClient::new(o, 64);
    let (filter, sink) = (filter.to_string(), got.clone());
    let (subscribed, mut suback) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                    let _ = subscribed.send(true);
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    sink.lock().expect("lock").push((
                        p.topic.clone(),
                        p.payload.to_vec(),
                        p.retain,
                    ));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    let acked = tokio::time::timeout(Duration::from_secs(10), suback.wait_for(|s| *s)).await;
    assert!(
        matches!(acked, Ok(Ok(_))),
        "the test subscriber could not subscribe"
    );
    got
}

/// An MQTT sink for `cfg` delivering the outbox's `mqtt` destination, as its own task; send `true` to stop it.
pub fn run_sink(
    cfg: MqttConfig,
    outbox: &Outbox,
    catalog: Catalog,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (stop, stop_rx) = watch::channel(false);
    let (cat, cat_rx) = watch::channel(catalog);
    let sink = MqttSink::new(cfg, outbox.clone(), "mqtt");
    let task = tokio::spawn(async move {
        let _keep = cat;
        sink.run(cat_rx, stop_rx).await
    });
    (stop, task)
}
