//! The daemon's configuration: typed sections (serde), loading through the `config` crate (a TOML file, then
//! `TCLSEG_<SECTION>__<KEY>` environment overrides, then secrets read from files), and a validation pass that
//! reports every problem with its location instead of stopping at the first. `diff` compares two configs for
//! reload.
//!
//! ```toml
//! [model]                      # changes here need a restart
//! path = "models/default"      # default: the built-in model
//! device = "auto"              # auto | cpu | cuda | tensorrt
//! processing = "auto"          # auto | host | device: where resize/windows/argmax run (device: on the GPU)
//!
//! [inference]
//! max_batch = 4                # frames per engine run, across pipelines
//! max_wait_ms = 20             # how long a partial batch waits for more frames
//!
//! [http]
//! listen = "127.0.0.1:9480"    # "" turns the HTTP endpoints off
//! token_file = "/etc/tclseg/http.token"   # bearer token for POST /reload and /v1/segment; required off loopback
//! segment_max_mb = 32          # POST /v1/segment: largest upload (413 above)
//! segment_max_pixels = 40000000  # POST /v1/segment: largest image (413 above)
//! segment_queue = 4            # POST /v1/segment: images waiting for the worker (429 above)
//! page = true                 # the live page at / and its /v1/pipelines routes (false: 404)
//!
//! [events.mqtt]               # optional: presence events (see pipelines/README.md)
//! host = "127.0.0.1"
//!
//! [[pipeline]]
//! name = "front-door"
//! source = "rtsp://cam.local/stream1"     # or source_file = "/run/secrets/front-door.uri"
//! queries = ["person", { name = "car", colour = "#ff8800", threshold = 0.6 }]
//! max_fps = 2
//! [pipeline.output]
//! dir = "/var/lib/tclseg/front-door"
//! ```
//!
//! The parts: `sections` (the typed structs serde reads), `choice` (keys with a fixed set of values), `plan`
//! (checking each pipeline into a `PipelinePlan`), `validate` (per-key checks), `paths` (output and watched
//! folders that must not overlap), `events` (the `[events]` table), `redact` and `diff`; this file loads a file through them. Every public item
//! is re-exported here, so callers name `config::…` whatever file it lives in.

mod choice;
pub mod diff;
mod events;
mod paths;
mod plan;
pub mod redact;
mod sections;
pub mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

pub use choice::Choice;
pub use events::state_dir as events_state_dir;
pub use plan::{validate, PipelinePlan};
pub use sections::{
    HttpSection, InferenceSection, ModelSection, OutputConfig, PipelineConfig, QueryEntry,
    QueuePolicy, ServeConfig,
};

/// Every problem found in a config file, each with where it is.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: PathBuf,
    /// Already redacted (`redact::redact`): safe for logs and HTTP replies.
    pub errors: Vec<String>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} has {} problem{}:",
            self.file.display(),
            self.errors.len(),
            if self.errors.len() == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Loads, overrides and validates a config file.
pub fn load(path: &Path) -> Result<(ServeConfig, Vec<PipelinePlan>), ConfigErrors> {
    load_with_env(path, std::env::vars())
}

/// `load` with an explicit environment (tests).
pub fn load_with_env(
    path: &Path,
    env: impl Iterator<Item = (String, String)>,
) -> Result<(ServeConfig, Vec<PipelinePlan>), ConfigErrors> {
    let fail = |errors: Vec<String>| ConfigErrors {
        file: path.to_path_buf(),
        errors: errors.iter().map(|e| redact::redact(e, &[])).collect(),
    };
    if !path.is_file() {
        return Err(fail(vec![format!(
            "cannot read it: {}",
            if path.exists() {
                "not a file"
            } else {
                "no such file"
            }
        )]));
    }
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let literal_errors = validate::check_number_literals(&text);
            if !literal_errors.is_empty() {
                return Err(fail(literal_errors));
            }
        }
        Err(e) => return Err(fail(vec![format!("cannot read it: {e}")])),
    }
    // Only `TCLSEG_<SECTION>__<KEY>` variables override: TCLSEG_LOG and TCLSEG_MODEL mean other things.
    let overrides: config::Map<String, String> = env
        .filter(|(k, _)| k.starts_with("TCLSEG_") && k.contains("__"))
        .collect();
    let built = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("TCLSEG")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(overrides)),
        )
        .build()
        .and_then(|c| c.try_deserialize::<ServeConfig>())
        .map_err(|e| fail(vec![e.to_string()]))?;
    let plans = validate(&built).map_err(fail)?;
    Ok((built, plans))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("serve.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    const GOOD: &str = r#"
[inference]
max_batch = 2
[[pipeline]]
name = "cam"
source = "rtsp://user:secret@127.0.0.1:8554/live"
queries = ["person", { name = "car", threshold = 0.6 }]
max_fps = 2
[pipeline.output]
dir = "/tmp/out-cam"
[[pipeline]]
name = "inbox"
source = "folder:///tmp/inbox"
folder_mode = "once"
queries = ["cat"]
[pipeline.output]
dir = "/tmp/out-inbox"
jsonl = true
"#;

    #[test]
    fn a_good_config_loads_with_defaults_and_env_overrides() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = write(dir.path(), GOOD);
        let env = vec![
            (
                "TCLSEG_INFERENCE__MAX_WAIT_MS".to_string(),
                "75".to_string(),
            ),
            ("TCLSEG_MODEL".to_string(), "/ignored".to_string()),
        ];
        let (cfg, plans) = load_with_env(&path, env.into_iter()).expect("valid");
        assert_eq!(cfg.inference.max_batch, 2);
        assert_eq!(cfg.inference.max_wait_ms, 75);
        assert_eq!(cfg.model.path, None);
        assert_eq!(plans.len(), 2);
        assert_eq!(plans[0].queue, QueuePolicy::Latest);
        assert_eq!(plans[1].queue, QueuePolicy::Lossless);
        assert_eq!(plans[0].queries.specs[1].threshold, Some(0.6));
        assert!(!plans[0].source.redacted().contains("secret"));
    }

    #[test]
    fn every_error_is_reported_with_its_location() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = write(
            dir.path(),
            r#"
[model]
device = "tpu"
processing = "gpu"
[[pipeline]]
name = "a b"
source = "gopher://x"
queries = []
max_fps = -1
[pipeline.output]
dir = "/tmp/x"
path = "../{frame}"
[[pipeline]]
name = "ok"
queries = ["x"]
[pipeline.output]
dir = "/tmp/x"
overlay = "gif"
"#,
        );
        let err = load_with_env(&path, std::iter::empty()).expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "model.device",
            "model.processing",
            "pipeline[0] 'a b'.name",
            "pipeline[0] 'a b'.source",
            "pipeline[0] 'a b'.queries",
            "pipeline[0] 'a b'.max_fps",
            "pipeline[0] 'a b'.output.path",
            "pipeline[1] 'ok'.source: missing",
            "pipeline[1] 'ok'.output.dir",
            "pipeline[1] 'ok'.output.overlay",
        ] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }
        assert!(text.contains("serve.toml has 10 problems"), "{text}");
    }

    #[test]
    fn syntax_and_unknown_keys_name_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = write(
            dir.path(),
            "[[pipeline]]\nname = \"x\"\nsorce = \"rtsp://a\"\n",
        );
        let text = load_with_env(&path, std::iter::empty())
            .expect_err("unknown key")
            .to_string();
        assert!(
            text.contains("serve.toml") && text.contains("sorce"),
            "{text}"
        );
        let missing = load_with_env(&dir.path().join("nope.toml"), std::iter::empty())
            .expect_err("missing")
            .to_string();
        assert!(missing.contains("nope.toml") && missing.contains("no such file"));
    }

    fn one_pipeline(dir: &Path, source: &str, extra: &str) -> String {
        let path = write(
            dir,
            &format!(
                "[[pipeline]]\nname = \"cam\"\nsource = \"{source}\"\nqueries = [\"x\"]\n{extra}\n[pipeline.output]\ndir = \"/tmp/o\"\n"
            ),
        );
        match load_with_env(&path, std::iter::empty()) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn rtsp_transport_and_folder_settle_are_checked_with_key_and_allowed_values() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        for ok in ["auto", "tcp", "udp", "udp-mcast"] {
            let text = one_pipeline(d, "rtsp://cam/s", &format!("rtsp_transport = \"{ok}\""));
            assert!(text.is_empty(), "{ok}: {text}");
        }
        let text = one_pipeline(d, "rtsp://cam/s", "rtsp_transport = \"quic\"");
        assert!(
            text.contains(
                "pipeline[0] 'cam'.rtsp_transport: 'quic' is not one of auto, tcp, udp, udp-mcast"
            ),
            "{text}"
        );
        let text = one_pipeline(d, "folder:///in", "rtsp_transport = \"tcp\"");
        assert!(
            text.contains("'cam'.rtsp_transport: only rtsp://"),
            "{text}"
        );
        assert!(one_pipeline(d, "folder:///in", "folder_settle_s = 0.5").is_empty());
        let text = one_pipeline(d, "folder:///in", "folder_settle_s = -1");
        assert!(
            text.contains("'cam'.folder_settle_s: -1 is outside [0, 3600]"),
            "{text}"
        );
        let text = one_pipeline(d, "folder:///in", "folder_settle_s = nan");
        assert!(text.contains("'cam'.folder_settle_s"), "{text}");
        let text = one_pipeline(d, "rtsp://cam/s", "folder_settle_s = 3");
        assert!(
            text.contains("'cam'.folder_settle_s: only folder://"),
            "{text}"
        );
    }

    #[test]
    fn an_unencoded_password_is_refused_at_check_time_without_printing_it() {
        let dir = tempfile::tempdir().expect("tmp");
        for (password, says) in [("hun@ter2", "raw '@'"), ("hun:ter2", "raw ':'")] {
            let text = one_pipeline(
                dir.path(),
                &format!("rtsp://admin:{password}@10.0.0.5/s1"),
                "",
            );
            assert!(
                text.contains("pipeline[0] 'cam'.source") && text.contains(says),
                "{text}"
            );
            assert!(text.contains("percent-encode"), "{text}");
            assert!(!text.contains("ter2"), "the password leaked: {text}");
        }
        let uri_file = dir.path().join("cam.uri");
        std::fs::write(&uri_file, "rtsp://admin:hun@ter2@10.0.0.5/s1\n").expect("write");
        let path = write(
            dir.path(),
            &format!(
                "[[pipeline]]\nname = \"cam\"\nsource_file = \"{}\"\nqueries = [\"x\"]\n[pipeline.output]\ndir = \"/tmp/o\"\n",
                uri_file.display()
            ),
        );
        let text = load_with_env(&path, std::iter::empty())
            .expect_err("unencoded")
            .to_string();
        assert!(
            text.contains("'cam'.source_file: ") && text.contains("raw '@'"),
            "{text}"
        );
        assert!(!text.contains("ter2"), "the password leaked: {text}");
    }

    #[test]
    fn password_file_is_percent_encoded_into_the_uri() {
        let dir = tempfile::tempdir().expect("tmp");
        let secret = dir.path().join("cam.pw");
        std::fs::write(&secret, "p@ss:w/rd\n").expect("write");
        let path = write(
            dir.path(),
            &format!(
                "[[pipeline]]\nname = \"cam\"\nsource = \"rtsp://admin@10.0.0.5/s1\"\npassword_file = \"{}\"\nqueries = [\"x\"]\n[pipeline.output]\ndir = \"/tmp/o\"\n",
                secret.display()
            ),
        );
        let (_, plans) = load_with_env(&path, std::iter::empty()).expect("valid");
        assert_eq!(
            plans[0].source.uri(),
            "rtsp://admin:p%40ss%3Aw%2Frd@10.0.0.5/s1"
        );
        assert!(!format!("{:?}", plans[0].source).contains("p%40ss"));
        let text = one_pipeline(
            dir.path(),
            "rtsp://admin:old@10.0.0.5/s1",
            &format!("password_file = \"{}\"", secret.display()),
        );
        assert!(
            text.contains("'cam'.password_file") && text.contains("already holds a password"),
            "{text}"
        );
        assert!(!text.contains("p@ss") && !text.contains("old@"), "{text}");
    }

    #[test]
    fn secrets_come_from_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let secret = dir.path().join("cam.uri");
        std::fs::write(&secret, "rtsp://admin:hunter2@10.0.0.5/s1\n").expect("write");
        let path = write(
            dir.path(),
            &format!(
                "[[pipeline]]\nname = \"cam\"\nsource_file = \"{}\"\nqueries = [\"x\"]\n[pipeline.output]\ndir = \"/tmp/o\"\n",
                secret.display()
            ),
        );
        let (_, plans) = load_with_env(&path, std::iter::empty()).expect("valid");
        assert_eq!(plans[0].source.uri(), "rtsp://admin:hunter2@10.0.0.5/s1");
        assert!(!plans[0].source.redacted().contains("hunter2"));
    }
}
