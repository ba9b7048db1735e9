//! `tclseg segment` end to end on the tiny fixture bundle: outputs, resume, and every kind of bad input.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{arg, assert_ok, fixture_bundle, stderr, stdout, tclseg, write_png};

fn segment(input: &Path, out: &Path, extra: &[&str]) -> Output {
    common::segment(&[input], out, &["red square", "grey wall"], extra)
}

#[test]
fn writes_labels_overlay_and_json_mirroring_the_tree_then_resumes() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let input = tmp.path().join("in");
    fs::create_dir_all(input.join("sub")).expect("mkdir");
    write_png(&input.join("a.png"), 61, 45);
    write_png(&input.join("sub/b.png"), 40, 90);
    let out = tmp.path().join("out");

    let run = segment(&input, &out, &[]);
    assert_ok(&run);
    assert!(stdout(&run).contains("done 2"), "{}", stdout(&run));

    let labels = image::open(out.join("sub/b.labels.png")).expect("label png");
    assert_eq!((labels.width(), labels.height()), (40, 90));
    let overlay = image::open(out.join("a.overlay.jpg")).expect("overlay");
    assert_eq!((overlay.width(), overlay.height()), (61, 45));

    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("a.json")).expect("json")).expect("valid json");
    assert_eq!(json["width"], 61);
    assert_eq!(json["model"]["name"], "tiny-random");
    let classes = json["classes"].as_array().expect("classes");
    assert_eq!(classes.len(), 3);
    assert_eq!(classes[1]["name"], "red square");
    let total: f64 = classes
        .iter()
        .map(|c| c["pixel_fraction"].as_f64().expect("fraction"))
        .sum();
    assert!(
        (total - 1.0).abs() < 1e-9,
        "fractions sum to 1, got {total}"
    );
    assert_eq!(classes[0]["rle"]["size"], serde_json::json!([45, 61]));

    // Second run: everything is up to date.
    let again = segment(&input, &out, &[]);
    assert_ok(&again);
    assert!(
        stdout(&again).contains("done 0, skipped 2"),
        "{}",
        stdout(&again)
    );
    // --force redoes.
    let forced = segment(&input, &out, &["--force"]);
    assert!(stdout(&forced).contains("done 2"), "{}", stdout(&forced));
}

#[test]
fn bad_inputs_are_reported_by_name_and_the_rest_goes_on() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let input = tmp.path().join("in");
    fs::create_dir_all(&input).expect("mkdir");
    write_png(&input.join("good.png"), 30, 30);
    fs::write(input.join("empty.jpg"), b"").expect("write");
    fs::write(input.join("text.png"), b"this is not an image at all").expect("write");
    let mut good = Vec::new();
    image::RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]))
        .write_to(
            &mut std::io::Cursor::new(&mut good),
            image::ImageFormat::Png,
        )
        .expect("encode");
    fs::write(input.join("truncated.png"), &good[..good.len() / 3]).expect("write");
    fs::write(
        input.join("gif.png"),
        b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
    )
    .expect("write");
    fs::write(input.join("huge.png"), png_header(100_000, 100_000)).expect("write");
    std::os::unix::fs::symlink("/nonexistent/target.png", input.join("dangling.png"))
        .expect("symlink");
    let out = tmp.path().join("out");

    let run = segment(&input, &out, &[]);
    assert_eq!(
        run.status.code(),
        Some(1),
        "failures make the exit status non-zero"
    );
    let err = stderr(&run);
    for (file, reason) in [
        ("empty.jpg", "empty"),
        ("text.png", "not an image"),
        ("truncated.png", "corrupt or truncated"),
        ("gif.png", "not an image"),
        ("huge.png", "100000x100000"),
        ("dangling.png", "cannot read"),
    ] {
        assert!(
            err.lines().any(|l| l.contains(file) && l.contains(reason)),
            "no message naming {file} with '{reason}' in:\n{err}"
        );
    }
    assert!(stdout(&run).contains("done 1"), "{}", stdout(&run));
    assert!(out.join("good.labels.png").is_file());

    let report: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("segment-report.json")).expect("report"))
            .expect("json");
    assert_eq!(report["failed"], 6);
    assert_eq!(report["failures"].as_array().expect("list").len(), 6);
}

#[test]
fn a_failed_redo_leaves_earlier_outputs_intact() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let input = tmp.path().join("in");
    fs::create_dir_all(&input).expect("mkdir");
    let image = input.join("x.png");
    write_png(&image, 33, 20);
    let out = tmp.path().join("out");
    assert_ok(&segment(&input, &out, &[]));
    let before = fs::read(out.join("x.labels.png")).expect("labels");
    fs::write(&image, b"now corrupt").expect("corrupt input");
    let run = segment(&input, &out, &["--force"]);
    assert_eq!(run.status.code(), Some(1));
    assert_eq!(fs::read(out.join("x.labels.png")).expect("labels"), before);
}

#[test]
fn max_failures_stops_early() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let input = tmp.path().join("in");
    fs::create_dir_all(&input).expect("mkdir");
    for i in 0..6 {
        fs::write(input.join(format!("bad{i}.png")), b"junk").expect("write");
    }
    let out = tmp.path().join("out");
    let run = segment(
        &input,
        &out,
        &["--max-failures", "2", "--jobs", "1", "--batch", "1"],
    );
    assert_eq!(run.status.code(), Some(1));
    assert!(stderr(&run).contains("--max-failures"), "{}", stderr(&run));
    let report: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("segment-report.json")).expect("report"))
            .expect("json");
    assert!(report["failed"].as_u64().expect("n") < 6, "{report}");
}

#[test]
fn unusable_output_folder_and_bad_queries_are_refused() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let input = tmp.path().join("a.png");
    write_png(&input, 20, 20);
    let blocker = tmp.path().join("file");
    fs::write(&blocker, b"x").expect("write");
    let run = segment(&input, &blocker.join("out"), &[]);
    assert_eq!(run.status.code(), Some(1));
    assert!(stderr(&run).contains("output folder"), "{}", stderr(&run));

    let bundle = fixture_bundle();
    let base = [
        "segment",
        arg(&input),
        "--out",
        arg(tmp.path()),
        "--model",
        arg(&bundle),
    ];
    let dup = tclseg(&[&base[..], &["-q", "cat", "-q", "Cat"]].concat());
    assert_eq!(dup.status.code(), Some(1));
    assert!(stderr(&dup).contains("twice"), "{}", stderr(&dup));
    let blank = tclseg(&[&base[..], &["-q", " "]].concat());
    assert!(stderr(&blank).contains("empty name"), "{}", stderr(&blank));
    let none = tclseg(&base);
    assert_eq!(none.status.code(), Some(2), "a query is required");
}

#[test]
fn over_long_prompts_are_cut_with_a_warning() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let input = tmp.path().join("a.png");
    write_png(&input, 20, 20);
    // A short name (names are held to 64 characters) with a prompt far past the text encoder's 77 tokens.
    let long = "very ".repeat(100) + "long query";
    let queries = tmp.path().join("queries.toml");
    std::fs::write(
        &queries,
        format!("[[query]]\nname = \"long one\"\nprompts = [\"{long}\"]\n"),
    )
    .expect("queries file");
    let out = tmp.path().join("out");
    let run = tclseg(&[
        "segment",
        arg(&input),
        "--out",
        arg(&out),
        "--model",
        arg(&fixture_bundle()),
        "--queries",
        arg(&queries),
    ]);
    assert_ok(&run);
    assert!(stderr(&run).contains("tokens"), "warned: {}", stderr(&run));
}

/// A well-formed PNG whose header claims `w`×`h` pixels but which carries only a little compressed data:
/// what a decompression bomb looks like. It must be refused from the header, before any allocation.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    use std::io::Write;
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&vec![0u8; 1 << 16]).expect("compress");
    let idat = z.finish().expect("compress");
    for (kind, data) in [(&b"IHDR"[..], &ihdr[..]), (b"IDAT", &idat), (b"IEND", &[])] {
        let mut chunk = kind.to_vec();
        chunk.extend_from_slice(data);
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(&chunk);
        out.extend_from_slice(&crc32(&chunk).to_be_bytes());
    }
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The CPU build of ONNX Runtime that `scripts/setup` installs (CI has only this one).
fn cpu_onnxruntime() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps/onnxruntime/lib/libonnxruntime.so")
}

#[test]
fn cuda_is_never_a_silent_fallback() {
    // With the CPU build of ONNX Runtime, `cuda` and `tensorrt` must refuse and say which library is missing and
    // what to run; `auto` must say it fell back, and why.
    let tmp = tempfile::tempdir().expect("temp dir");
    let input = tmp.path().join("a.png");
    write_png(&input, 24, 24);
    let bundle = fixture_bundle();
    let run = |device: &str, out: &str, ort: &Path, cuda_dir: &Path| {
        Command::new(common::tclseg_bin())
            .args(["segment", &input.display().to_string(), "--out"])
            .arg(tmp.path().join(out))
            .arg("--model")
            .arg(&bundle)
            .args(["-q", "cat", "--device", device])
            .env_remove("TCLSEG_LOG")
            .env("ORT_DYLIB_PATH", ort)
            .env("TCLSEG_CUDA_LIB_DIR", cuda_dir)
            .output()
            .expect("run tclseg")
    };
    let no_cuda = tmp.path().join("no-cuda-libs");
    std::fs::create_dir(&no_cuda).expect("mkdir");
    for (device, out) in [("cuda", "o1"), ("tensorrt", "o2")] {
        let refused = run(device, out, &cpu_onnxruntime(), &no_cuda);
        let err = stderr(&refused);
        assert_eq!(refused.status.code(), Some(1), "{err}");
        assert!(
            err.contains("libonnxruntime_providers_cuda.so") && err.contains("CPU-only build"),
            "{err}"
        );
        assert!(err.contains("scripts/setup --gpu"), "{err}");
        assert!(!tmp.path().join(out).join("a.labels.png").exists());
    }

    // A GPU-build layout (the provider file beside the library) with no CUDA libraries: the error names the
    // first library that cannot be loaded: the driver's on a machine without one, else the CUDA runtime.
    let gpu_layout = tmp.path().join("gpu-build");
    std::fs::create_dir(&gpu_layout).expect("mkdir");
    std::os::unix::fs::symlink(cpu_onnxruntime(), gpu_layout.join("libonnxruntime.so"))
        .expect("symlink");
    std::fs::write(gpu_layout.join("libonnxruntime_providers_cuda.so"), b"").expect("write");
    let refused = run(
        "cuda",
        "o3",
        &gpu_layout.join("libonnxruntime.so"),
        &no_cuda,
    );
    let err = stderr(&refused);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(
        err.contains("libcuda.so.1") || err.contains("libcudart.so.13 not found"),
        "{err}"
    );

    let auto = run("auto", "o4", &cpu_onnxruntime(), &no_cuda);
    let err = stderr(&auto);
    assert!(auto.status.success(), "{err}");
    assert!(err.contains("running on the CPU"), "{err}");
    assert!(err.contains("libonnxruntime_providers_cuda.so"), "{err}");
    assert!(tmp.path().join("o4/a.labels.png").is_file());
}

/// `--processing device` (the GPU's path, here on the CPU provider) writes the same label maps as the host path,
/// for a folder of differently sized images, and says which path ran.
#[test]
fn device_processing_writes_the_host_paths_labels() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let input = tmp.path().join("in");
    fs::create_dir(&input).expect("mkdir");
    for (name, w, h) in [("a", 48, 40), ("b", 90, 30), ("c", 48, 40), ("d", 33, 70)] {
        write_png(&input.join(format!("{name}.png")), w, h);
    }
    let mut labels = Vec::new();
    for processing in ["host", "device"] {
        let out = tmp.path().join(processing);
        let run = segment(
            &input,
            &out,
            &[
                "--processing",
                processing,
                "--batch",
                "4",
                "--bg-thresh",
                "0",
                "--format",
                "labels",
            ],
        );
        assert_ok(&run);
        assert!(
            stderr(&run).contains(&format!("{processing} processing")),
            "{}",
            stderr(&run)
        );
        let mut maps = Vec::new();
        for name in ["a", "b", "c", "d"] {
            let img = image::open(out.join(format!("{name}.labels.png")))
                .expect("label map")
                .to_luma8();
            maps.push(img.into_raw());
        }
        labels.push(maps);
    }
    let (host, device) = (&labels[0], &labels[1]);
    for (h, d) in host.iter().zip(device) {
        assert_eq!(h.len(), d.len());
        let equal = h.iter().zip(d).filter(|(a, b)| a == b).count();
        assert!(
            equal as f64 >= 0.999 * h.len() as f64,
            "{equal} of {} pixels equal",
            h.len()
        );
    }
    // With a zero background threshold every pixel takes one of the two queries: the maps are not trivially equal.
    assert!(host.iter().flatten().any(|&v| v != 0));
}
