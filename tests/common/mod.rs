//! Helpers shared by the integration tests that run the `tclseg` binary on the tiny fixture bundle: running the
//! CLI, checking its exit, small images, polling, signals. The daemon harness is in `daemon`, its config builder
//! in `config`, staged writes in `staged`, the browser (chromium through chromedriver) in `browser`.
// Each test crate compiles its own copy and uses only some of these.
#![allow(dead_code)]

pub mod browser;
pub mod config;
pub mod daemon;
pub mod staged;
pub mod video;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The label maps (`*.labels.png`) `segment --format labels` wrote into `dir`, sorted by path, as raw bytes.
pub fn label_maps(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("outputs")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".labels.png"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let img = image::open(&p).expect("label png").to_luma8();
            (p, img.into_raw())
        })
        .collect()
}

pub fn fixture_bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bundles/tiny-random")
}

/// The `tclseg` binary the tests run: `TCLSEG_TEST_BIN` when set, else the one cargo built for this test run.
/// `scripts/test` points it at the release binary `scripts/setup` has just built: the spawned binary's own work
/// (decoding, resizing, PNG writing) runs about 10x faster optimised, which halved the run time of the
/// segmenting tests in CI, and the tests then check the binary that ships. Unset, the tests run the debug build.
pub fn tclseg_bin() -> PathBuf {
    match std::env::var_os("TCLSEG_TEST_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_tclseg")),
    }
}

/// Runs the binary with `args`, its log at the default level.
pub fn tclseg(args: &[&str]) -> Output {
    Command::new(tclseg_bin())
        .args(args)
        .env_remove("TCLSEG_LOG")
        .output()
        .expect("run tclseg")
}

/// `tclseg segment INPUTS --out OUT` on the fixture bundle (CPU, one thread), one `-q` per query, then `extra`.
pub fn segment(inputs: &[&Path], out: &Path, queries: &[&str], extra: &[&str]) -> Output {
    segment_with(&fixture_bundle(), inputs, out, queries, extra)
}

/// `segment` on `bundle`.
pub fn segment_with(
    bundle: &Path,
    inputs: &[&Path],
    out: &Path,
    queries: &[&str],
    extra: &[&str],
) -> Output {
    let mut args: Vec<&str> = vec!["segment"];
    args.extend(inputs.iter().map(|p| arg(p)));
    args.extend_from_slice(&["--out", arg(out), "--model", arg(bundle)]);
    for query in queries {
        args.extend_from_slice(&["-q", query]);
    }
    args.extend_from_slice(&["--device", "cpu", "--threads", "1"]);
    args.extend_from_slice(extra);
    tclseg(&args)
}

/// `tclseg config check PATH`.
pub fn config_check(path: &Path) -> Output {
    tclseg(&["config", "check", arg(path)])
}

/// A path as a command-line argument (the tests' temporary paths are UTF-8).
pub fn arg(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Panics with the command's stderr unless it exited with status 0.
pub fn assert_ok(out: &Output) {
    assert!(out.status.success(), "{:?}\n{}", out.status, stderr(out));
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A small synthetic picture: a red square on grey.
pub fn write_png(path: &Path, w: u32, h: u32) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        if x > w / 4 && x < w / 2 && y > h / 4 && y < h / 2 {
            image::Rgb([220, 30, 30])
        } else {
            image::Rgb([120, 120, 120])
        }
    });
    img.save(path).expect("save png");
}

/// Width and height of the image at `path`.
pub fn image_size(path: &Path) -> (u32, u32) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (img.width(), img.height())
}

/// Files under `dir` (recursively) whose names end with `suffix`, sorted.
pub fn files_with_suffix(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                found.push(p);
            }
        }
    }
    found.sort();
    found
}

/// The lines of `log` that contain every one of `needles`.
pub fn lines_with<'a>(log: &'a str, needles: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}

/// Polls `check` every 100 ms; returns as soon as it holds, panics after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

/// Sends `sig` (a name such as `TERM` or `STOP`) to `pid` with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

/// A TCP port nothing listens on (at the moment of asking).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}
