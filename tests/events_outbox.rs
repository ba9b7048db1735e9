//! The durable outbox: order, acknowledgement, restart, bound and per-destination queues.

use std::sync::atomic::Ordering;

mod events_common;

use events_common::event;
use tclseg::events::{Event, EventKind, Outbox, OutboxError};

fn ids(v: &[(u64, Event)]) -> Vec<String> {
    v.iter().map(|(_, e)| e.id.clone()).collect()
}

#[test]
fn events_wait_in_order_until_acked_and_survive_a_reopen() -> Result<(), OutboxError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("events.redb");
    let pushed: Vec<Event> = (0..6)
        .map(|n: u64| {
            event(
                if n.is_multiple_of(2) { "a" } else { "b" },
                n,
                EventKind::Start,
            )
        })
        .collect();
    {
        let outbox = Outbox::open(&path, 100, &["mqtt"])?;
        outbox.push(&pushed[..4])?;
        outbox.push(&pushed[4..])?;
        let all = outbox.pending("mqtt", None, 100)?;
        assert_eq!(
            ids(&all),
            pushed.iter().map(|e| e.id.clone()).collect::<Vec<_>>()
        );
        assert_eq!(all[0].1, pushed[0], "stored events read back unchanged");
        // A window: the first two, then the next two after the second.
        let first = outbox.pending("mqtt", None, 2)?;
        let next = outbox.pending("mqtt", Some(first[1].0), 2)?;
        assert_eq!(ids(&next), ["a:t:2#0", "b:t:3#0"]);
        outbox.ack("mqtt", &[first[0].0, first[1].0])?;
        let c = outbox.counters("mqtt")?;
        assert_eq!(c.delivered.load(Ordering::Relaxed), 2);
        assert_eq!(c.depth.load(Ordering::Relaxed), 4);
        assert!(matches!(
            outbox.pending("smtp", None, 1),
            Err(OutboxError::NoDestination(_))
        ));
    }
    // A restart: what was not acked is still there, in order, and new pushes go after it.
    let outbox = Outbox::open(&path, 100, &["mqtt"])?;
    assert_eq!(outbox.counters("mqtt")?.depth.load(Ordering::Relaxed), 4);
    outbox.push(&[event("a", 6, EventKind::Start)])?;
    let left = outbox.pending("mqtt", None, 100)?;
    assert_eq!(
        ids(&left),
        ["a:t:2#0", "b:t:3#0", "a:t:4#0", "b:t:5#0", "a:t:6#0"]
    );
    assert!(
        left.windows(2).all(|w| w[0].0 < w[1].0),
        "sequence numbers keep rising across restarts"
    );
    Ok(())
}

#[test]
fn a_full_outbox_drops_the_oldest_and_counts_them() -> Result<(), OutboxError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Outbox::open(&dir.path().join("o.redb"), 3, &["mqtt"])?;
    for n in 0..5 {
        outbox.push(&[event("a", n, EventKind::Start)])?;
    }
    let c = outbox.counters("mqtt")?;
    assert_eq!(c.dropped.load(Ordering::Relaxed), 2);
    assert_eq!(c.depth.load(Ordering::Relaxed), 3);
    assert_eq!(
        ids(&outbox.pending("mqtt", None, 10)?),
        ["a:t:2#0", "a:t:3#0", "a:t:4#0"]
    );
    Ok(())
}

#[test]
fn each_destination_acknowledges_on_its_own() -> Result<(), OutboxError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Outbox::open(&dir.path().join("o.redb"), 10, &["mqtt", "webhook:alerts"])?;
    outbox.push(&[
        event("a", 0, EventKind::Start),
        event("a", 1, EventKind::Start),
    ])?;
    let m = outbox.pending("mqtt", None, 10)?;
    outbox.ack("mqtt", &m.iter().map(|(s, _)| *s).collect::<Vec<_>>())?;
    assert!(outbox.pending("mqtt", None, 10)?.is_empty());
    assert_eq!(outbox.pending("webhook:alerts", None, 10)?.len(), 2);
    // A second process (or a second open) cannot take the same store.
    assert!(Outbox::open(&dir.path().join("o.redb"), 10, &["mqtt"]).is_err());
    Ok(())
}

/// Run in a child process by the test below: push, say so, then wait to be killed.
#[test]
fn child_pushes_then_waits_to_be_killed() {
    let Some(path) = std::env::var_os("TCLSEG_OUTBOX_CHILD") else {
        return;
    };
    let outbox = Outbox::open(std::path::Path::new(&path), 100, &["mqtt"]).expect("open");
    for n in 0..20 {
        outbox
            .push(&[event("a", n, EventKind::Start)])
            .expect("push");
    }
    println!("PUSHED");
    std::thread::sleep(std::time::Duration::from_secs(60));
}

#[test]
fn a_returned_push_survives_a_killed_process() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("events.redb");
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_pushes_then_waits_to_be_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TCLSEG_OUTBOX_CHILD", &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let pushed = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("PUSHED"));
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    assert!(pushed, "the child did not push");
    let outbox = Outbox::open(&path, 100, &["mqtt"]).expect("reopen after a kill");
    assert_eq!(
        outbox.pending("mqtt", None, 100).expect("pending").len(),
        20
    );
}
