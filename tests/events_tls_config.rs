//! `config check` against the mistakes operators make with MQTT's protocol and TLS and with https webhooks: each is
//! refused naming its key, the file and what to do; a TLS port mix-up is a warning (it may be deliberate); and a
//! config with every new key right passes.

mod common;
mod events_common;

use std::path::Path;

use common::config::{Config, Pipeline};
use events_common::pki::Pki;

/// A valid config (folder pipeline "cam") with the events `tables` appended.
fn with_events(dir: &Path, tables: &str) -> Config {
    let cam =
        Pipeline::folder("cam", &dir.join("inbox"), &dir.join("out")).with("queries = [\"x\"]");
    Config::bare().pipeline(cam).tables(tables)
}

/// `config check`'s exit code and stderr.
fn check(dir: &Path, config: &Config) -> (Option<i32>, String) {
    let path = dir.join("check.toml");
    config.write(&path);
    let out = common::config_check(&path);
    (out.status.code(), common::stderr(&out))
}

#[test]
fn protocol_and_tls_mistakes_are_refused_naming_the_key_and_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let pki = Pki::new(d);
    let missing = d.join("missing-ca.pem");
    let not_pem = d.join("not-pem.txt");
    std::fs::write(&not_pem, "hello\n").expect("write");
    let (ca, cert, key, wrong_key) = (
        pki.ca.display().to_string(),
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string(),
        pki.server_key.display().to_string(),
    );
    let mqtt = |lines: String| format!("[events.mqtt]\n{lines}\n");
    let webhook = |lines: String| format!("[[events.webhooks]]\nname = \"ops\"\n{lines}\n");
    let choices = "is not one of \"3.1.1\", \"5\"";
    let cases: Vec<(String, Vec<String>)> = vec![
        (
            mqtt("protocol = \"5.0\"".into()),
            vec!["events.mqtt.protocol".into(), format!("'5.0' {choices}")],
        ),
        (
            mqtt("protocol = \"v5\"".into()),
            vec!["events.mqtt.protocol".into(), format!("'v5' {choices}")],
        ),
        (
            mqtt(format!("ca_file = \"{}\"", missing.display())),
            vec![format!("events.mqtt.ca_file: {}: cannot read", missing.display())],
        ),
        (
            mqtt(format!("tls = true\nca_file = \"{}\"", not_pem.display())),
            vec![format!(
                "events.mqtt.ca_file: {}: holds no PEM certificate",
                not_pem.display()
            )],
        ),
        (
            mqtt(format!("tls = false\nca_file = \"{ca}\"")),
            vec!["events.mqtt.ca_file".into(), "tls = false".into()],
        ),
        (
            mqtt(format!("ca_file = \"{ca}\"\nclient_cert_file = \"{cert}\"")),
            vec![
                "events.mqtt.client_key_file".into(),
                "needed with client_cert_file".into(),
            ],
        ),
        (
            mqtt(format!(
                "ca_file = \"{ca}\"\nclient_cert_file = \"{cert}\"\nclient_key_file = \"{wrong_key}\""
            )),
            vec![
                format!("events.mqtt.client_key_file: {wrong_key}"),
                "does not go with client_cert_file".into(),
            ],
        ),
        (
            webhook(format!(
                "url = \"https://127.0.0.1:9/h\"\nca_file = \"{}\"",
                missing.display()
            )),
            vec![format!(
                "events.webhooks[0].ca_file: {}: cannot read",
                missing.display()
            )],
        ),
        (
            webhook(format!("url = \"http://127.0.0.1:9/h\"\nca_file = \"{ca}\"")),
            vec![
                "events.webhooks[0].ca_file".into(),
                "only used for https:// URLs".into(),
            ],
        ),
        (
            webhook("url = \"mqtts://127.0.0.1:9/h\"".into()),
            vec![
                "events.webhooks[0].url".into(),
                "http:// or https://".into(),
            ],
        ),
    ];
    for (tables, needles) in cases {
        let config = with_events(d, &tables);
        let (code, err) = check(d, &config);
        assert_eq!(code, Some(1), "accepted:\n{}\n{err}", config.text());
        for needle in needles {
            assert!(err.contains(&needle), "'{needle}' missing in:\n{err}");
        }
    }

    // Every key right: accepted, with no warning.
    let good = with_events(
        d,
        &format!(
            "[events.mqtt]\nprotocol = \"5\"\ntls = true\nca_file = \"{ca}\"\nclient_cert_file = \"{cert}\"\nclient_key_file = \"{key}\"\n[[events.webhooks]]\nname = \"ops\"\nurl = \"https://127.0.0.1:9/h\"\nca_file = \"{ca}\"\n"
        ),
    );
    let (code, err) = check(d, &good);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("events."), "{err}");

    // TLS with the system's roots (ca-certificates): found, accepted.
    let system = with_events(d, "[events.mqtt]\ntls = true\nhost = \"broker.example\"\n");
    let (code, err) = check(d, &system);
    assert_eq!(code, Some(0), "{err}");

    // TLS on MQTT's plain port: accepted (it may be deliberate) with a warning naming the usual port.
    let odd = with_events(
        d,
        &format!("[events.mqtt]\nca_file = \"{ca}\"\nport = 1883\n"),
    );
    let (code, err) = check(d, &odd);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("warning: events.mqtt.port: 1883") && err.contains("8883"),
        "{err}"
    );
}
