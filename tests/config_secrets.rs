//! A config error never shows a camera password: `config check`, `serve`'s start-up error, and a rejected
//! `POST /reload` (its HTTP reply and the daemon's log), with the password in every place an error can quote.

mod common;

use std::path::Path;
use std::time::Duration;

use common::config::{Config, Pipeline};
use common::daemon::Daemon;
use common::{stderr, stdout};

const SECRET: &str = "hunter2S3cret";

/// Pieces of the password that must not show either (a redaction that cut it in two would leak half).
fn leaks(text: &str) -> bool {
    ["hunter2", "S3cret", "hun/ter", "3cret"]
        .iter()
        .any(|piece| text.contains(piece))
}

/// Broken configs (name, pipeline table text) with the password where an error quotes it.
fn broken_pipelines(dir: &Path) -> Vec<(&'static str, String)> {
    let out = dir.join("out").display().to_string();
    let secret_file = dir.join("cam.uri");
    std::fs::write(&secret_file, format!("admin:{SECRET}@10.0.0.5/s1\n")).expect("write");
    let table = |body: &str| {
        format!("[[pipeline]]\nname = \"cam\"\nqueries = [\"x\"]\n{body}\n[pipeline.output]\ndir = \"{out}\"\n")
    };
    vec![
        (
            "syntax error on the URI line",
            table(&format!("source = \"rtsp://admin:{SECRET}@10.0.0.5/s1\" trailing")),
        ),
        (
            "unterminated string on the URI line",
            table(&format!("source = \"rtsp://admin:{SECRET}@10.0.0.5/s1")),
        ),
        (
            "syntax error on the line after the URI",
            table(&format!(
                "source = \"rtsp://admin:{SECRET}@10.0.0.5/s1\"\nmax_fps = 2 2"
            )),
        ),
        (
            "syntax error on the line before the URI",
            table(&format!(
                "max_fps = = 2\nsource = \"rtsp://admin:{SECRET}@10.0.0.5/s1\""
            )),
        ),
        (
            "type error whose value is the URI",
            table(&format!(
                "source = \"folder:///tmp\"\nmax_fps = \"rtsp://admin:{SECRET}@10.0.0.5/s1\""
            )),
        ),
        (
            "type error on the URI line (inline table)",
            format!(
                "pipeline = [{{ name = \"cam\", source = \"rtsp://admin:{SECRET}@cam/s1\", queries = [\"x\"], max_fps = \"fast\", output = {{ dir = \"{out}\" }} }}]\n"
            ),
        ),
        (
            "unknown key on the URI line (inline table)",
            format!(
                "pipeline = [{{ name = \"cam\", sorce = \"rtsp://admin:{SECRET}@cam/s1\", queries = [\"x\"], output = {{ dir = \"{out}\" }} }}]\n"
            ),
        ),
        (
            "invalid enum value on the URI line (inline table)",
            format!(
                "pipeline = [{{ name = \"cam\", source = \"rtsp://admin:{SECRET}@cam/s1\", queue = \"fastest\", queries = [\"x\"], output = {{ dir = \"{out}\" }} }}]\n"
            ),
        ),
        (
            "the URI as an enum value",
            table(&format!(
                "source = \"folder:///tmp\"\nqueue = \"rtsp://admin:{SECRET}@cam/s1\""
            )),
        ),
        (
            "a URI that does not parse, password with a raw '/'",
            table("source = \"gopher://admin:hun/ter2S3cret@cam/s1\""),
        ),
        (
            "source_file holding something that is not a URI",
            table(&format!("source_file = \"{}\"", secret_file.display())),
        ),
    ]
}

/// The whole file: an inline `pipeline = [...]` must come before the first table header.
fn compose(globals: &str, pipeline: &str) -> String {
    if pipeline.starts_with("pipeline =") {
        format!("{pipeline}{globals}")
    } else {
        format!("{globals}{pipeline}")
    }
}

fn config_check(path: &Path) -> (Option<i32>, String) {
    let out = common::config_check(path);
    (
        out.status.code(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

#[test]
fn config_check_never_prints_the_password() {
    let dir = tempfile::tempdir().expect("tmp");
    let globals = Config::new().http("listen = \"127.0.0.1:1\"").text();
    for (what, pipeline) in broken_pipelines(dir.path()) {
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, compose(&globals, &pipeline)).expect("write");
        let (code, text) = config_check(&path);
        assert_eq!(code, Some(1), "{what}: accepted\n{text}");
        assert!(!leaks(&text), "{what}: the password shows:\n{text}");
        assert!(text.contains("serve.toml"), "{what}: {text}");
    }
    // A URI in a global key's error too.
    let path = dir.path().join("listen.toml");
    std::fs::write(
        &path,
        format!("[http]\nlisten = \"rtsp://admin:{SECRET}@cam:554\"\n"),
    )
    .expect("write");
    let (code, text) = config_check(&path);
    assert_eq!(code, Some(1));
    assert!(text.contains("http.listen") && !leaks(&text), "{text}");
}

#[test]
fn serve_start_up_error_never_prints_the_password() {
    let dir = tempfile::tempdir().expect("tmp");
    let pipelines = broken_pipelines(dir.path());
    // A syntax error (the parser quotes the line) and a validation error (tclseg quotes the value).
    for (what, pipeline) in [&pipelines[0], &pipelines[9]] {
        let config = Config::new();
        let text = compose(&config.text(), pipeline);
        let mut serve = Daemon::start_text(dir.path(), &text, config.port, &[]);
        let status = serve
            .wait_exit(Duration::from_secs(60))
            .expect("serve exits on a broken config");
        let log = serve.log_text();
        assert!(!status.success(), "{what}: {log}");
        assert!(log.contains("serve.toml"), "{what}: {log}");
        assert!(!leaks(&log), "{what}: the password shows:\n{log}");
    }
}

#[test]
fn rejected_reload_never_shows_the_password_in_reply_or_log() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = Config::new();
    let globals = config.text();
    let good = Pipeline::folder("ok", &dir.path().join("in"), &dir.path().join("out-ok"))
        .with("queries = [\"red square\"]");
    let mut serve = Daemon::start(dir.path(), &config.pipeline(good));
    serve.wait_ready();
    let broken = broken_pipelines(dir.path());
    for (what, pipeline) in &broken {
        std::fs::write(&serve.config, compose(&globals, pipeline)).expect("write");
        let reply = serve.post("/reload", None);
        assert_eq!(reply.code, 400, "{what}: {}", reply.body);
        assert!(reply.body.contains("errors"), "{what}: {}", reply.body);
        assert!(
            !leaks(&reply.body),
            "{what}: the password shows:\n{}",
            reply.body
        );
    }
    let log = serve.log_text();
    assert!(log.contains("reload rejected"), "{log}");
    assert!(!leaks(&log), "the password shows in the log:\n{log}");
    assert_eq!(
        serve.get("/readyz").code,
        200,
        "the old config keeps running"
    );
    assert_eq!(serve.terminate(Duration::from_secs(60)).code(), Some(0));
}
