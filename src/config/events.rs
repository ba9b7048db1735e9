//! The `[events]` table: checked with the rest of the config (the events library's own checks, prefixed with
//! `events.`, plus what only the whole config knows: that each zone's pipeline exists and that the secret files
//! and TLS files can be read and parsed), and where its outbox lives when `events.outbox.path` is not given.

use std::path::{Path, PathBuf};

use super::ServeConfig;
use crate::events::tls::{self, TlsFiles};

/// Every problem in `[events]`, each with its key path (`events.…`); none when the table is absent.
pub fn check_events(cfg: &ServeConfig) -> Vec<String> {
    let Some(events) = &cfg.events else {
        return Vec::new();
    };
    let mut errors: Vec<String> = events
        .validate()
        .into_iter()
        .map(|(path, msg)| format!("events.{path}: {msg}"))
        .collect();
    for pipeline in events.zones.keys() {
        if !cfg.pipelines.iter().any(|p| &p.name == pipeline) {
            errors.push(format!(
                "events.zones.{pipeline}: no [[pipeline]] is named '{pipeline}'"
            ));
        }
    }
    // Read at start-up by the deliveries: a missing file is an operator's mistake best caught here.
    let mut secret = |key: String, file: &Path| {
        if let Err(e) = std::fs::read(file) {
            errors.push(format!("{key}: cannot read {}: {e}", file.display()));
        }
    };
    if let Some(file) = events.mqtt.as_ref().and_then(|m| m.password_file.as_ref()) {
        secret("events.mqtt.password_file".into(), file);
    }
    for (i, w) in events.webhooks.iter().enumerate() {
        if let Some(file) = &w.secret_file {
            secret(format!("events.webhooks[{i}].secret_file"), file);
        }
    }
    // The TLS files are read and parsed as the delivery will: a wrong path, a key that is not the certificate's
    // or a file that is not PEM is named here, with its key.
    let mut tls = |table: String, files: TlsFiles<'_>| {
        if let Err(e) = tls::client_config(files) {
            errors.push(format!("{table}.{}: {}", e.key, e.detail()));
        }
    };
    if let Some(m) = events.mqtt.as_ref().filter(|m| m.uses_tls()) {
        tls("events.mqtt".into(), m.tls_files());
    }
    for (i, w) in events.webhooks.iter().enumerate() {
        if w.uses_tls() {
            tls(format!("events.webhooks[{i}]"), w.tls_files());
        }
    }
    errors
}

/// What a valid `[events]` table may still get wrong, for `config check` and the daemon's start-up log.
pub fn warnings(cfg: &ServeConfig) -> Vec<String> {
    let Some(mqtt) = cfg.events.as_ref().and_then(|e| e.mqtt.as_ref()) else {
        return Vec::new();
    };
    mqtt.warnings()
        .into_iter()
        .map(|(key, msg)| format!("events.mqtt.{key}: {msg}"))
        .collect()
}

/// The folder the events outbox goes in when `events.outbox.path` is not set: systemd's `$STATE_DIRECTORY`
/// (`StateDirectory=`, writable under `ProtectSystem=strict`) when it is set, else the config file's folder.
pub fn state_dir(config_path: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY")
        .and_then(|v| {
            v.to_str()
                .and_then(|s| s.split(':').next())
                .map(PathBuf::from)
        })
        .filter(|d| !d.as_os_str().is_empty())
    {
        return dir;
    }
    match config_path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::super::load_with_env;

    const PIPELINE: &str = "[[pipeline]]\nname = \"Front-Door\"\nsource = \"folder:///tmp/in\"\nqueries = [\"x\"]\n[pipeline.output]\ndir = \"/tmp/o\"\n";

    fn load(events: &str) -> Result<crate::config::ServeConfig, String> {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, format!("{PIPELINE}{events}")).expect("write");
        load_with_env(&path, std::iter::empty())
            .map(|(cfg, _)| cfg)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_table_reads_with_case_kept_and_integer_points() {
        let cfg = load(
            "[events]\nmin_area = 0.02\n[events.zones.Front-Door]\nPorch = [[0, 0], [100, 0], [100, 50.5]]\n[events.mqtt]\nhost = \"broker\"\ndiscovery = true\n[[events.webhooks]]\nname = \"ops\"\nurl = \"http://127.0.0.1:9/hook\"\n",
        )
        .expect("valid");
        let events = cfg.events.expect("events");
        assert_eq!(events.min_area, 0.02);
        assert_eq!(
            events.zones["Front-Door"]["Porch"],
            vec![[0.0, 0.0], [100.0, 0.0], [100.0, 50.5]]
        );
        assert!(events.mqtt.expect("mqtt").discovery);
        assert_eq!(events.webhooks[0].name, "ops");
        assert!(load("").expect("valid").events.is_none());
    }

    #[test]
    fn mistakes_name_their_key() {
        for (text, needle) in [
            ("[events.mqtt]\nhots = \"x\"\n", "hots"),
            (
                "[events.zones.back]\nyard = [[0, 0], [1, 0], [1, 1]]\n",
                "events.zones.back: no [[pipeline]] is named 'back'",
            ),
            (
                "[[events.webhooks]]\nname = \"a\"\nurl = \"ftp://x\"\n",
                "events.webhooks[0].url",
            ),
            ("[events]\nmin_area = 2.0\n", "events.min_area"),
            (
                "[events.mqtt]\npassword_file = \"/nonexistent/pw\"\n",
                "events.mqtt.password_file: cannot read /nonexistent/pw",
            ),
        ] {
            let err = load(text).expect_err(text);
            assert!(err.contains(needle), "{needle} not in {err}");
        }
    }
}
