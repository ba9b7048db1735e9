//! Certificates for the TLS tests, made by the `openssl` command (scripts/setup installs it) in a temp dir: a test
//! CA, a server certificate it signed for 127.0.0.1 and localhost, a client certificate it signed (mutual TLS),
//! and a second CA that signed nothing the servers present (a client trusting only it must fail). Plus a mosquitto
//! TLS listener using them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::broker::Broker;

pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed neither certificate.
    pub other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA `name` (`name.pem`, `name.key`).
fn ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// A certificate `name` (`name.pem`, `name.key`) signed by CA `ca` with the extensions `ext`.
fn leaf(dir: &Path, ca: &str, name: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).expect("ext file");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-days",
            "2",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        ca(dir, "test-ca");
        ca(dir, "other-ca");
        leaf(
            dir,
            "test-ca",
            "server",
            "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        );
        leaf(
            dir,
            "test-ca",
            "client",
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        );
        Pki {
            ca: dir.join("test-ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            other_ca: dir.join("other-ca.pem"),
        }
    }

    /// mosquitto config lines for a TLS listener on a free loopback port (returned), presenting the server
    /// certificate; with `require_client_cert`, only clients with a certificate signed by the test CA get in.
    pub fn mosquitto_listener(&self, require_client_cert: bool) -> (u16, String) {
        let port = free_port();
        let conf = format!(
            "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {require_client_cert}\n",
            self.ca.display(),
            self.server_cert.display(),
            self.server_key.display()
        );
        (port, conf)
    }
}

/// Certificates in `dir` and a mosquitto there with a plain listener (`broker.port`) and a TLS one (the port
/// returned), up and listening.
pub fn tls_broker(dir: &Path, require_client_cert: bool) -> (Pki, Broker, u16) {
    let pki = Pki::new(dir);
    let (tls_port, listener) = pki.mosquitto_listener(require_client_cert);
    let broker = Broker::start_with(dir, None, &listener);
    wait_listening(tls_port);
    (pki, broker, tls_port)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Wait until something listens on `port` (a broker's second listener).
fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
