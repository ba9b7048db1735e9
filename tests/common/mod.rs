//! Helpers shared by the integration tests that run the `tclseg` binary on the tiny fixture bundle.
// Each test crate compiles its own copy and uses only some of these.
#![allow(dead_code)]

pub mod daemon;
pub mod staged;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixture_bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bundles/tiny-random")
}

/// Runs the binary with `args`, its log at the default level.
pub fn tclseg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tclseg"))
        .args(args)
        .env_remove("TCLSEG_LOG")
        .output()
        .expect("run tclseg")
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

pub mod serve;
