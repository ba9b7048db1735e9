//! `--device auto` on a machine without an NVIDIA driver: running on the CPU is expected there, so it is one
//! INFO line, not a warning on every run.

mod common;

use common::{fixture_bundle, write_png};

#[test]
fn auto_without_a_gpu_driver_says_cpu_once_at_info() {
    let driver = tclseg::model::cuda::nvidia_driver_present();
    let tmp = tempfile::tempdir().expect("tmp");
    let image = tmp.path().join("a.png");
    write_png(&image, 40, 30);
    let out = std::process::Command::new(common::tclseg_bin())
        .args([
            "segment",
            image.to_str().expect("utf-8"),
            "--out",
            tmp.path().join("out").to_str().expect("utf-8"),
            "--model",
            fixture_bundle().to_str().expect("utf-8"),
            "-q",
            "red square",
            "--threads",
            "1",
            "--device",
            "auto",
        ])
        .env("TCLSEG_LOG", "info")
        .output()
        .expect("run tclseg");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    if driver {
        eprintln!("this machine has an NVIDIA driver: the no-driver case cannot be checked here");
        return;
    }
    let cpu: Vec<&str> = err.lines().filter(|l| l.contains("on the CPU")).collect();
    assert_eq!(cpu.len(), 1, "{err}");
    assert!(
        cpu[0].contains("INFO") && !cpu[0].contains("WARN"),
        "{}",
        cpu[0]
    );
    assert!(
        !err.contains("WARN"),
        "no warning on a machine without a GPU:\n{err}"
    );
}
