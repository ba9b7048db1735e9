//! Configs against the daemon: every value `config check` refuses names its key and range, and every value it
//! accepts runs — `serve` on the edge of each range becomes ready and stops cleanly at SIGTERM, and a pipeline
//! that cannot start keeps `/readyz` not ready and shows in `/status` and the STATUS line.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::config::{Config, Pipeline};
use common::daemon::Daemon;
use common::wait_until;

fn check(dir: &Path, config: &Config) -> (Option<i32>, String) {
    let path = dir.join("check.toml");
    config.write(&path);
    let out = common::config_check(&path);
    (out.status.code(), common::stderr(&out))
}

/// A valid config (no model path, folder pipeline "cam" writing into `out`) with `model` / `inference` keys,
/// pipeline keys and output keys set.
fn with_out(dir: &Path, out: &Path, [model, inference, pipeline, output]: [&str; 4]) -> Config {
    let cam = Pipeline::folder("cam", &dir.join("inbox"), out)
        .with("queries = [\"x\"]")
        .with(pipeline)
        .output(output);
    Config::bare()
        .model(model)
        .inference(inference)
        .pipeline(cam)
}

/// `with_out` into `dir/out`.
fn with(dir: &Path, model: &str, inference: &str, pipeline: &str, output: &str) -> Config {
    with_out(dir, &dir.join("out"), [model, inference, pipeline, output])
}

#[test]
fn out_of_range_and_missing_values_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let file = d.join("a-file");
    std::fs::write(&file, "x").expect("write");
    let cases: Vec<(Config, &[&str])> = vec![
        (
            with(d, "threads = 1000000", "", "", ""),
            &["model.threads", "1000000", "[0, 256]"],
        ),
        (
            with(d, "threads = 99999999999999999999999", "", "", ""),
            &["threads"],
        ),
        (
            with(d, "crop_batch = 100000", "", "", ""),
            &["model.crop_batch", "[0, 1024]"],
        ),
        (
            with(d, "", "max_wait_ms = 100000000", "", ""),
            &["inference.max_wait_ms", "[0, 10000]"],
        ),
        (
            with(d, "", "drain_timeout_s = inf", "", ""),
            &["inference.drain_timeout_s", "inf", "(0, 3600]"],
        ),
        (
            with(d, "", "drain_timeout_s = nan", "", ""),
            &["inference.drain_timeout_s", "(0, 3600]"],
        ),
        (
            with(d, "", "", "", "retention_hours = inf"),
            &["pipeline[0] 'cam'.output.retention_hours", "(0, 87600]"],
        ),
        (
            with(d, "", "", "", "retention_hours = 1e300"),
            &["output.retention_hours", "(0, 87600]"],
        ),
        (
            with(d, "", "", "", "retention_mb = 1e300"),
            &["output.retention_mb", "(0, 1000000000]"],
        ),
        (
            with(d, "", "", "watchdog_s = inf", ""),
            &["pipeline[0] 'cam'.watchdog_s", "[0.1, 86400]"],
        ),
        (
            with(d, "", "", "backoff_max_s = 1e300", ""),
            &["pipeline[0] 'cam'.backoff_max_s", "[0.01, 86400]"],
        ),
        (
            with(d, "", "", "max_fps = inf", ""),
            &["pipeline[0] 'cam'.max_fps", "(0, 1000]"],
        ),
        (
            with(d, "", "", "kp_weight = 2.0", ""),
            &["pipeline[0] 'cam'.kp_weight", "[0, 1]"],
        ),
        (
            with(d, "path = \"/nonexistent/model\"", "", "", ""),
            &["model.path", "/nonexistent/model", "does not exist"],
        ),
        (
            with(d, &format!("path = \"{}\"", d.display()), "", "", ""),
            &["model.path", "no model.toml"],
        ),
        (
            with_out(d, &file, ["", "", "", ""]),
            &["pipeline[0] 'cam'.output.dir", "is not a folder"],
        ),
        (
            with_out(d, &file.join("sub"), ["", "", "", ""]),
            &["pipeline[0] 'cam'.output.dir", "is not a folder"],
        ),
    ];
    for (config, needles) in cases {
        let (code, err) = check(d, &config);
        assert_eq!(code, Some(1), "accepted:\n{}\n{err}", config.text());
        for needle in needles {
            assert!(err.contains(needle), "'{needle}' missing in:\n{err}");
        }
    }
    // The same file with sane values passes, so each case failed on its own value.
    let (code, err) = check(d, &with(d, "threads = 1", "", "", "retention_hours = 24"));
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn events_mistakes_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let events = |tables: &str| with(d, "", "", "", "").tables(tables);
    let cases: [(&str, &[&str]); 4] = [
        ("[events.mqtt]\nhots = \"broker\"\n", &["hots"]),
        (
            "[events.zones.back]\nyard = [[0, 0], [10, 0], [10, 10]]\n",
            &["events.zones.back", "no [[pipeline]] is named 'back'"],
        ),
        (
            "[[events.webhooks]]\nname = \"ops\"\nurl = \"ftp://example.com/hook\"\n",
            &["events.webhooks[0].url", "http://"],
        ),
        (
            "[events.zones.cam]\nline = [[0, 0], [10, 0]]\n",
            &["events.zones.cam.line", "at least 3"],
        ),
    ];
    for (tables, needles) in cases {
        let config = events(tables);
        let (code, err) = check(d, &config);
        assert_eq!(code, Some(1), "accepted:\n{}\n{err}", config.text());
        for needle in needles {
            assert!(err.contains(needle), "'{needle}' missing in:\n{err}");
        }
    }
    let good = events(
        "[events]\non_s = 0\n[events.zones.cam]\ndoor = [[0, 0], [10, 0], [10, 10]]\n[events.mqtt]\nport = 1883\n[[events.webhooks]]\nname = \"ops\"\nurl = \"http://127.0.0.1:9/hook\"\n",
    );
    let (code, err) = check(d, &good);
    assert_eq!(code, Some(0), "{err}");
}

/// The accepted extremes of every range, for `serve`: (name, model, inference, pipeline, output keys).
const EDGES: [(&str, &str, &str, &str, &str); 2] = [
    (
        "minimums",
        "threads = 0\ncrop_batch = 1",
        "max_batch = 1\nmax_wait_ms = 0\ndrain_timeout_s = 0.001",
        "max_fps = 0.001\nbg_thresh = 0.0\nkp_weight = 0.0\nwatchdog_s = 0.1\nbackoff_initial_s = 0.01\nbackoff_max_s = 0.01",
        "retention_hours = 0.0001\nretention_mb = 0.0001",
    ),
    (
        "maximums",
        "threads = 256\ncrop_batch = 1024",
        "max_batch = 64\nmax_wait_ms = 10000\ndrain_timeout_s = 3600",
        "max_fps = 1000\nbg_thresh = 1.0\nkp_weight = 1.0\nwatchdog_s = 86400\nbackoff_initial_s = 86400\nbackoff_max_s = 86400",
        "retention_hours = 87600\nretention_mb = 1e9",
    ),
];

#[test]
fn serve_on_the_edges_of_every_range_gets_ready_and_stops_cleanly() {
    for (name, model, inference, pipeline, output) in EDGES {
        let dir = tempfile::tempdir().expect("tmp");
        let inbox = dir.path().join("inbox");
        std::fs::create_dir_all(&inbox).expect("inbox");
        common::write_png(&inbox.join("a.png"), 64, 48);
        let edge = Pipeline::folder("edge", &inbox, &dir.path().join("out"))
            .with("queries = [\"red square\"]")
            .with(pipeline)
            .output(output);
        let config = Config::new()
            .model_unset("threads")
            .model(model)
            .inference(inference)
            .pipeline(edge);
        let mut serve = Daemon::start(dir.path(), &config);
        serve.wait_notified("READY=1");
        wait_until(
            &format!("{name}: /readyz 200"),
            Duration::from_secs(30),
            || serve.get("/readyz").code == 200,
        );
        wait_until(
            &format!("{name}: the image is segmented"),
            Duration::from_secs(60),
            || {
                serve
                    .get("/metrics")
                    .body
                    .contains("tclseg_frames_out_total{pipeline=\"edge\"} 1")
            },
        );
        let status = serve.get("/status");
        assert!(status.body.contains("\"running\": true"), "{}", status.body);
        let exit = serve.terminate(Duration::from_secs(60));
        let log = serve.log_text();
        assert_eq!(exit.code(), Some(0), "{name}: {exit:?}\n{log}");
        assert!(!log.contains("panicked"), "{name}:\n{log}");
        assert!(log.contains("stopped cleanly"), "{name}:\n{log}");
    }
}

#[test]
fn a_pipeline_that_cannot_start_keeps_the_daemon_not_ready_until_a_reload_fixes_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let folder = |name: &str, out: &Path| {
        Pipeline::folder(name, &dir.path().join(format!("in-{name}")), out)
            .with("queries = [\"red square\"]")
    };
    let good = folder("good", &dir.path().join("out-good"));
    // Validation passes (the nearest existing part, /proc, is a folder), but nobody can create a folder there.
    let broken = folder("broken", Path::new("/proc/tclseg-cannot-create-this"));
    let config = Config::new().pipeline(good.clone()).pipeline(broken);
    let mut serve = Daemon::start(dir.path(), &config);
    let ready = serve.wait_notified("READY=1");
    assert!(
        ready.contains("1 not running: broken"),
        "STATUS line: {ready}"
    );
    let readyz = serve.get("/readyz");
    assert_eq!(readyz.code, 503, "{}", readyz.body);
    assert!(
        readyz.body.contains("pipeline 'broken' is not running"),
        "{}",
        readyz.body
    );
    let status: serde_json::Value =
        serde_json::from_str(&serve.get("/status").body).expect("status json");
    assert_eq!(status["ready"], false);
    assert_eq!(status["pipelines"]["broken"]["running"], false);
    assert!(status["pipelines"]["broken"]["error"]
        .as_str()
        .is_some_and(|e| e.contains("tclseg-cannot-create-this")));
    assert_eq!(status["pipelines"]["good"]["running"], true);
    let metrics = serve.get("/metrics").body;
    assert!(
        metrics.contains("tclseg_pipeline_running{pipeline=\"broken\"} 0"),
        "{metrics}"
    );

    // Point it somewhere writable: the reload starts it, and the daemon is ready.
    let fixed = folder("broken", &dir.path().join("out-broken"));
    serve.rewrite(&config.with_pipelines(&[good, fixed]));
    let reply = serve.post("/reload", None);
    assert_eq!(reply.code, 200, "{}", reply.body);
    wait_until("ready after the reload", Duration::from_secs(30), || {
        serve.get("/readyz").code == 200
    });
    assert_eq!(serve.terminate(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn a_source_being_retried_counts_as_ready_and_http_off_still_stops_cleanly() {
    // A camera that is down: its pipeline runs (retrying), so the daemon is ready.
    let dir = tempfile::tempdir().expect("tmp");
    let dead = Pipeline::new(
        "dead",
        "rtsp://viewer:pw@127.0.0.1:1/x",
        &dir.path().join("out"),
    )
    .with("queries = [\"x\"]\nwatchdog_s = 0.1\nbackoff_initial_s = 0.01\nbackoff_max_s = 0.01");
    let mut serve = Daemon::start(dir.path(), &Config::new().pipeline(dead));
    serve.wait_ready();
    wait_until("retries", Duration::from_secs(30), || {
        serve
            .metrics()
            .contains("tclseg_reconnects_total{pipeline=\"dead\"} ")
            && !serve
                .metrics()
                .contains("tclseg_reconnects_total{pipeline=\"dead\"} 0\n")
    });
    assert_eq!(serve.get("/readyz").code, 200);
    assert_eq!(serve.terminate(Duration::from_secs(60)).code(), Some(0));

    // HTTP off: READY=1 still comes, and SIGTERM still stops it cleanly.
    let dir = tempfile::tempdir().expect("tmp");
    let p = Pipeline::folder("p", &dir.path().join("in"), &dir.path().join("out"))
        .with("queries = [\"red square\"]");
    let mut serve = Daemon::start(dir.path(), &Config::new().no_http().pipeline(p));
    serve.wait_notified("READY=1");
    assert_eq!(serve.terminate(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn sigterm_during_a_start_up_that_never_ends_stops_at_once() {
    // The model's manifest is a FIFO nobody writes: loading it blocks for good, as a hung disk would.
    let dir = tempfile::tempdir().expect("tmp");
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).expect("mkdir");
    let made = Command::new("mkfifo")
        .arg(model.join("model.toml"))
        .status()
        .expect("run mkfifo");
    assert!(made.success());
    let p = Pipeline::folder("p", &dir.path().join("in"), &dir.path().join("out"))
        .with("queries = [\"red square\"]");
    let config = Config::new()
        .model_unset("path")
        .model_unset("threads")
        .pipeline(p);
    let mut serve = Daemon::start_with_env(
        dir.path(),
        &config,
        &[("TCLSEG_MODEL", common::arg(&model))],
    );
    wait_until("HTTP up", Duration::from_secs(30), || {
        serve.get("/livez").code == 200
    });
    assert_eq!(serve.get("/readyz").code, 503);
    let status = serve.terminate(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", serve.log_text());
    assert!(
        serve.log_text().contains("SIGTERM during start-up"),
        "{}",
        serve.log_text()
    );
}
