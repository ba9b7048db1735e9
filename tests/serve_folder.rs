//! The watched-folder source of `tclseg serve`: bad images are skipped with a reason and new ones taken (with
//! `TCLSEG_LOG_FORMAT=json`, every log line one JSON object); files written the way real copies write them, in
//! stages, with pauses, or created empty and filled later; and what it says about an empty folder and a
//! symlink loop.

mod common;

use std::path::Path;
use std::time::Duration;

use common::config::{Config, Pipeline};
use common::daemon::Daemon;
use common::staged::{noisy_image_bytes, write_in_stages};
use common::{files_with_suffix, lines_with, wait_until};
use image::ImageFormat;

/// A folder pipeline whose outputs keep the input's whole name.
fn folder_pipeline(name: &str, inbox: &Path, out: &Path) -> Pipeline {
    Pipeline::folder(name, inbox, out)
        .retrying(5.0)
        .output("path = \"{name}\"")
}

#[test]
fn files_written_in_stages_are_taken_once_whole() {
    let dir = tempfile::tempdir().expect("tmp");
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inbox).expect("mkdir");
    let out = dir.path().join("out");
    let config = Config::new().pipeline(folder_pipeline("inbox", &inbox, &out));
    let daemon = Daemon::start(dir.path(), &config);
    daemon.wait_ready();

    let png = noisy_image_bytes(120, 90, ImageFormat::Png);
    let jpeg = noisy_image_bytes(120, 90, ImageFormat::Jpeg);
    std::thread::scope(|s| {
        // A copy that pauses for 1 s (two scans, less than the 2 s settle time): never read half-written.
        s.spawn(|| {
            write_in_stages(
                &inbox.join("brief.png"),
                &png,
                &[png.len() / 3],
                Duration::from_secs(1),
            )
        });
        // A copy that stalls for longer than the settle time: read half-written, which must fail (a cut JPEG
        // decodes to grey padding unless caught), then read again once the rest has arrived.
        s.spawn(|| {
            write_in_stages(
                &inbox.join("stalled.jpg"),
                &jpeg,
                &[jpeg.len() / 3],
                Duration::from_secs(6),
            )
        });
        // Created empty, filled 3 s later.
        s.spawn(|| write_in_stages(&inbox.join("late.png"), &png, &[0], Duration::from_secs(3)));
    });
    wait_until(
        "all three images segmented",
        Duration::from_secs(90),
        || daemon.frames_out("inbox") >= 3.0,
    );
    let labels = files_with_suffix(&out, ".labels.png");
    for name in ["brief", "stalled", "late"] {
        let found: Vec<_> = labels
            .iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with(name))
            })
            .collect();
        assert_eq!(found.len(), 1, "{name}: {labels:?}");
        let img = image::open(found[0]).expect("labels");
        assert_eq!((img.width(), img.height()), (120, 90), "{name}");
    }
    let log = daemon.log_text();
    assert!(
        lines_with(&log, &["brief.png"]).is_empty(),
        "a copy pausing less than the settle time was read early:\n{log}"
    );
    let stalled = lines_with(&log, &["stalled.jpg"]);
    assert_eq!(stalled.len(), 1, "the early read is logged once:\n{log}");
    assert!(
        stalled[0].contains("WARN") && stalled[0].contains("truncated"),
        "{}",
        stalled[0]
    );
    assert!(
        lines_with(&log, &["late.png"]).len() <= 1,
        "an empty file's failure is logged at most once:\n{log}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(daemon.frames_out("inbox"), 3.0, "nothing is taken twice");
}

#[test]
fn an_empty_folder_and_a_symlink_loop_are_reported_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let empty = dir.path().join("empty");
    let loopy = dir.path().join("loopy");
    std::fs::create_dir_all(&empty).expect("mkdir");
    std::fs::create_dir_all(&loopy).expect("mkdir");
    std::os::unix::fs::symlink("loop.jpg", loopy.join("loop.jpg")).expect("symlink loop");
    let config = Config::new()
        .pipeline(folder_pipeline(
            "empty",
            &empty,
            &dir.path().join("out-empty"),
        ))
        .pipeline(folder_pipeline(
            "loopy",
            &loopy,
            &dir.path().join("out-loopy"),
        ));
    let daemon = Daemon::start(dir.path(), &config);
    daemon.wait_ready();
    let png = noisy_image_bytes(64, 48, ImageFormat::Png);
    std::fs::write(loopy.join("a.png"), &png).expect("write");
    // Taking a.png needs the 2 s settle time: several scans of both folders have run by then.
    wait_until("a.png segmented", Duration::from_secs(60), || {
        daemon.frames_out("loopy") >= 1.0
    });
    let empty_name = empty.display().to_string();
    let log = daemon.log_text();
    let said_empty = lines_with(&log, &["holds no images", &empty_name]);
    assert_eq!(said_empty.len(), 1, "{log}");
    assert!(said_empty[0].contains("WARN"), "{}", said_empty[0]);
    let said_loop = lines_with(&log, &["loop.jpg"]);
    assert_eq!(
        said_loop.len(),
        1,
        "the symlink loop is reported once:\n{log}"
    );
    assert!(
        said_loop[0].contains("WARN") && said_loop[0].contains("symlink"),
        "{}",
        said_loop[0]
    );
    // An unreadable entry is no image: that folder holds none either, and says so once.
    assert!(
        lines_with(&log, &["holds no images", &loopy.display().to_string()]).len() <= 1,
        "{log}"
    );

    // Said again only when it changes: an image arrives, then goes.
    std::fs::write(empty.join("b.png"), &png).expect("write");
    wait_until("b.png segmented", Duration::from_secs(60), || {
        daemon.frames_out("empty") >= 1.0
    });
    std::fs::remove_file(empty.join("b.png")).expect("remove");
    wait_until("empty again, said again", Duration::from_secs(30), || {
        lines_with(&daemon.log_text(), &["holds no images", &empty_name]).len() == 2
    });
}

#[test]
fn watched_folder_skips_bad_images_and_takes_new_ones() {
    let dir = tempfile::tempdir().expect("tmp");
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(inbox.join("sub")).expect("mkdir");
    let good = |path: &Path| {
        image::RgbImage::from_fn(96, 64, |x, _| image::Rgb([(x * 2) as u8, 40, 200]))
            .save(path)
            .expect("save");
    };
    good(&inbox.join("a.png"));
    good(&inbox.join("sub/b.png"));
    std::fs::write(inbox.join("corrupt.jpg"), b"this is not a jpeg").expect("write");
    std::fs::write(inbox.join("empty.png"), b"").expect("write");
    let mut truncated = std::fs::read(inbox.join("a.png")).expect("read");
    truncated.truncate(truncated.len() / 2);
    std::fs::write(inbox.join("truncated.png"), truncated).expect("write");
    let out = dir.path().join("out");
    let pipeline = folder_pipeline("inbox", &inbox, &out).retrying(3.0);
    let config = Config::new()
        .inference("max_batch = 4\nmax_wait_ms = 20")
        .pipeline(pipeline);
    let daemon = Daemon::start_with_env(dir.path(), &config, &[("TCLSEG_LOG_FORMAT", "json")]);
    daemon.wait_ready();
    let m = |name: &str, labels: &str| daemon.metric(name, labels);
    wait_until(
        "2 good images written, 3 bad ones skipped",
        Duration::from_secs(60),
        || {
            m("tclseg_frames_out_total", "pipeline=\"inbox\"") >= 2.0
                && m(
                    "tclseg_frames_dropped_total",
                    "pipeline=\"inbox\",reason=\"decode_error\"",
                ) >= 3.0
        },
    );
    assert!(out.join("a.png.labels.png").is_file() && out.join("sub/b.png.labels.png").is_file());
    let log = daemon.log_text();
    for name in ["corrupt.jpg", "empty.png", "truncated.png"] {
        assert!(log.contains(name), "no reason logged for {name}:\n{log}");
    }
    good(&inbox.join("c.png"));
    // The label PNG is renamed into place before the unit's last file and before the frame is counted, so wait
    // for both; then exactly 3: no image was segmented twice.
    wait_until("a new image is picked up", Duration::from_secs(30), || {
        out.join("c.png.labels.png").is_file()
            && m("tclseg_frames_out_total", "pipeline=\"inbox\"") >= 3.0
    });
    assert_eq!(m("tclseg_frames_out_total", "pipeline=\"inbox\""), 3.0);
    // --log-format json: every log line is one JSON object.
    for line in daemon.log_text().lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}
