//! A restarted daemon keeps what the previous run wrote: frame numbers (`{frame}`, in the default template
//! `{date}/{frame}`) continue after the last run's, so the first frames after a restart do not take the names,
//! and replace the files, of that day's earlier frames.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::config::{Config, Pipeline};
use common::daemon::{Daemon, RtspServer};
use common::{files_with_suffix, wait_until};

/// The sidecars under `out`, as paths relative to it.
fn sidecars(out: &Path) -> BTreeSet<String> {
    files_with_suffix(out, ".json")
        .into_iter()
        .filter(|p| !p.to_string_lossy().ends_with(".jsonl"))
        .map(|p| {
            p.strip_prefix(out)
                .expect("under out")
                .display()
                .to_string()
        })
        .collect()
}

#[test]
fn a_restart_after_sigkill_never_replaces_the_earlier_runs_outputs() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("out");
    let server = RtspServer::options().size("160x120").start();
    let cam = Pipeline::new("cam", &server.url(0), &out)
        .retrying(5.0)
        .with("max_fps = 5");
    let config = Config::new().pipeline(cam);

    let first_run: BTreeSet<String>;
    let first_bytes: Vec<(String, Vec<u8>)>;
    {
        let daemon = Daemon::start(dir.path(), &config);
        daemon.wait_ready();
        wait_until(
            "the first run writes frames",
            Duration::from_secs(90),
            || daemon.frames_out("cam") >= 2.0,
        );
        // Dropping the daemon SIGKILLs it: no orderly shutdown writes anything for the next run.
        drop(daemon);
        first_run = sidecars(&out);
        first_bytes = first_run
            .iter()
            .map(|name| (name.clone(), std::fs::read(out.join(name)).expect("read")))
            .collect();
    }
    assert!(first_run.len() >= 2, "{first_run:?}");

    let daemon = Daemon::start(dir.path(), &config);
    daemon.wait_ready();
    wait_until(
        "the second run writes frames",
        Duration::from_secs(90),
        || daemon.frames_out("cam") >= 2.0,
    );
    drop(daemon);
    let both_runs = sidecars(&out);
    let second_run: BTreeSet<&String> = both_runs.difference(&first_run).collect();
    assert!(
        second_run.len() >= 2,
        "the second run's frames took the first run's names: first {first_run:?}, after {both_runs:?}"
    );
    for (name, bytes) in &first_bytes {
        let now = std::fs::read(out.join(name)).expect("the first run's sidecar is still there");
        assert!(&now == bytes, "{name} was rewritten by the second run");
    }
}
