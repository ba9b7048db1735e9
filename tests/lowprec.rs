//! int8 image graphs end to end through the binary: a copy of the trained synthetic-shapes bundle with int8
//! graphs added (`python -m tclseg_trainer.quantize`), `models verify` running a crop at each precision it holds,
//! `segment` labels at int8 against fp32 on synthetic-world scenes, and `--precision auto|int8|bf16` choosing or
//! refusing as `model::cpu::choose` says for this CPU. Needs the setup's `.venv` (scripts/test runs scripts/setup).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use tclseg::model::cpu::{choose, CpuFeatures};
use tclseg::model::{Device, Precision};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const COLOURS: [&str; 6] = ["red", "green", "blue", "yellow", "purple", "white"];
/// One CPU thread: the graphs' numbers do not depend on it, and the machine is shared.
const ON_CPU: [&str; 4] = ["--device", "cpu", "--threads", "1"];

fn python(args: &[&str]) -> Output {
    Command::new(Path::new(ROOT).join(".venv/bin/python"))
        .args(args)
        .current_dir(Path::new(ROOT).join("trainer"))
        .env("PYTHONPATH", Path::new(ROOT).join("trainer"))
        .output()
        .expect("run the trainer's python")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn segment(bundle: &Path, images: &Path, out: &Path, precision: &str, bg_thresh: &str) {
    let mut args = vec![
        "segment",
        s(images),
        "--bg-thresh",
        bg_thresh,
        "--model",
        s(bundle),
        "--out",
        s(out),
        "--format",
        "labels",
        "--precision",
        precision,
    ];
    args.extend(ON_CPU);
    for c in COLOURS {
        args.extend(["-q", c]);
    }
    ok(&common::tclseg(&args), &format!("segment at {precision}"));
}

#[test]
fn int8_bundle_verifies_segments_like_fp32_and_auto_follows_the_cpu() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let bundle = tmp.path().join("synthetic-int8");
    let synthetic = Path::new(ROOT).join("models/synthetic-shapes");
    ok(
        &python(&[
            "-m",
            "tclseg_trainer.quantize",
            s(&synthetic),
            "--out",
            s(&bundle),
        ]),
        "quantize",
    );
    let world = tmp.path().join("world");
    ok(
        &python(&[
            "-m",
            "tclseg_trainer.tools.synthetic",
            "generate",
            "--out",
            s(&world),
            "--train",
            "0",
            "--eval",
            "8",
        ]),
        "synthetic scenes",
    );
    let images = world.join("eval/images");

    // verify runs one crop at every precision the bundle holds, int8 among them.
    let stdout = ok(
        &common::tclseg(&["models", "verify", s(&bundle), "--threads", "1"]),
        "verify",
    );
    for role in ["image_trunk", "tcl_head"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("int8") && l.contains(role) && l.contains(" int8 ")),
            "int8 {role} ran: {stdout}"
        );
    }

    // Labels on the synthetic world's eval scenes, int8 against fp32. Measured on the bundle of 2026-12-07, seventh
    // session (issue 21: the background-naming CLIP, weight average, short side 448): 99.37 % of pixels as the
    // argmax of the class scores (background 0), 99.92 % with background threshold 0.4 (the bundle before it: 98.8 %
    // and 99.4 %; the tiny one: 99.7 % and 99.9 %). `--bg-thresh` here also leaves the bundle's per-word thresholds
    // out, so only the graphs' precision differs. These synthetic models quantize worse than ViT-B/16
    // (BENCHMARKS.md); the floors sit a point or more under the measurement, so a regression in what is quantized
    // (an attention product, a LayerNorm) fails here.
    for (bg, floor) in [("0", 0.98), ("0.4", 0.985)] {
        let (fp32, int8) = (
            tmp.path().join(format!("fp32-bg{bg}")),
            tmp.path().join(format!("int8-bg{bg}")),
        );
        segment(&bundle, &images, &fp32, "fp32", bg);
        segment(&bundle, &images, &int8, "int8", bg);
        let (a, b) = (common::label_maps(&fp32), common::label_maps(&int8));
        assert_eq!(a.len(), 8, "one label map per scene");
        assert_eq!(a.len(), b.len());
        let (mut same, mut total) = (0usize, 0usize);
        for ((pa, la), (_, lb)) in a.iter().zip(&b) {
            assert_eq!(la.len(), lb.len(), "{}", pa.display());
            same += la.iter().zip(lb).filter(|(x, y)| x == y).count();
            total += la.len();
        }
        let agree = same as f64 / total as f64;
        assert!(
            agree >= floor,
            "background {bg}: int8 labels agree with fp32 on {agree:.4}"
        );
    }

    // auto: what `choose` says for this CPU and this bundle, reported with the reason and the flags.
    let bench = |model: &Path, precision: &str| {
        let mut args = vec![
            "models",
            "bench",
            "--model",
            s(model),
            "--images",
            s(&images),
            "--batch",
            "1",
            "--warmup",
            "0",
            "--iterations",
            "1",
            "--precision",
            precision,
        ];
        args.extend(ON_CPU);
        common::tclseg(&args)
    };
    let out = ok(&bench(&bundle, "auto"), "bench auto");
    let line: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("a JSON line")).expect("JSON");
    let cpu = CpuFeatures::detect();
    let expected = choose(Precision::Auto, Device::Cpu, |_| true, &cpu).expect("auto resolves");
    assert_eq!(line["precision"], expected.precision.key(), "{line}");
    assert_eq!(line["precision_reason"], expected.reason.as_str(), "{line}");
    assert_eq!(line["kernels"], cpu.kernels(expected.precision), "{line}");
    assert_eq!(
        line["cpu_flags"],
        serde_json::json!(cpu.names()),
        "flags as detected: {line}"
    );

    // int8 asked of a bundle without int8 graphs is refused with what to do, not run as fp32.
    let out = bench(&synthetic, "int8");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--precision fp32,int8"), "{err}");
    // bf16 runs only where ONNX Runtime has bf16 kernels (ARM64 with BF16).
    if !cpu.arm_bf16 {
        let out = bench(&bundle, "bf16");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("ARM64"), "{err}");
    }
}
