//! Where outputs go and how they are written, in `segment` and `serve`: names unique per input, no output folder
//! shared or inside an input, stale temporaries swept, long names, a full disk, and `--out` naming a file.
//! Real binaries, real files, a real (small) filesystem for the full disk.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::config::{Config, Pipeline};
use common::daemon::Daemon;
use common::{assert_ok, fixture_bundle, image_size, stderr, stdout, wait_until, write_png};

/// `tclseg segment INPUTS --out OUT` on the fixture bundle, CPU, one thread.
fn segment(inputs: &[&Path], out: &Path, extra: &[&str]) -> Output {
    common::segment(inputs, out, &["red square"], extra)
}

/// Every file under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("list").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                found.push(
                    p.strip_prefix(dir)
                        .expect("under dir")
                        .display()
                        .to_string(),
                );
            }
        }
    }
    found.sort();
    found
}

#[test]
fn same_named_images_from_different_folders_keep_their_own_outputs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    for (dir, w, h) in [("c1", 30, 20), ("c2", 40, 50)] {
        fs::create_dir_all(t.join(dir)).expect("mkdir");
        write_png(&t.join(dir).join("same.png"), w, h);
    }
    let out = t.join("o");
    let run = segment(&[&t.join("c1/same.png"), &t.join("c2/same.png")], &out, &[]);
    assert_ok(&run);
    assert!(stdout(&run).contains("done 2"), "{}", stdout(&run));
    assert_eq!(image_size(&out.join("c1/same.labels.png")), (30, 20));
    assert_eq!(image_size(&out.join("c2/same.labels.png")), (40, 50));

    // Two folder roots holding the same names, two of them with the same folder name.
    for (dir, w) in [("a/imgs", 21), ("b/imgs", 22), ("c1", 23)] {
        fs::create_dir_all(t.join(dir)).expect("mkdir");
        write_png(&t.join(dir).join("same.png"), w, 17);
    }
    let out = t.join("o2");
    let run = segment(
        &[&t.join("a/imgs"), &t.join("b/imgs"), &t.join("c1")],
        &out,
        &[],
    );
    assert_ok(&run);
    assert_eq!(image_size(&out.join("imgs/same.labels.png")), (21, 17));
    assert_eq!(image_size(&out.join("imgs-2/same.labels.png")), (22, 17));
    assert_eq!(image_size(&out.join("c1/same.labels.png")), (23, 17));

    // A collision that is still possible (an image's sidecar on the run's report) is an error, not an overwrite.
    let inbox = t.join("inbox");
    fs::create_dir_all(&inbox).expect("mkdir");
    write_png(&inbox.join("segment-report.png"), 12, 12);
    let out = t.join("o3");
    let run = segment(&[&inbox], &out, &[]);
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    let err = stderr(&run);
    assert!(
        err.contains("segment-report.png") && err.contains("report"),
        "{err}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("segment-report.json")).expect("report"))
            .expect("the report, not a sidecar");
    assert_eq!(report["failed"], 1, "{report}");
    assert!(!out.join("segment-report.labels.png").exists());
}

/// A config on the tiny model, HTTP off, watching `pipelines`' folders once, names kept whole.
fn serve_config() -> Config {
    Config::new().no_http()
}

fn folder_pipeline(name: &str, inbox: &Path, out: &Path) -> Pipeline {
    Pipeline::new(name, &format!("folder://{}", inbox.display()), out)
        .with("folder_mode = \"once\"\nqueries = [\"red square\"]")
        .output("path = \"{name}\"")
}

#[test]
fn serve_names_keep_the_whole_file_name() {
    let tmp = tempfile::tempdir().expect("tmp");
    let inbox = tmp.path().join("inbox");
    fs::create_dir_all(&inbox).expect("mkdir");
    // Each image a different width, so every output can be traced to its input.
    let names = [
        "shot.2026.01.png",
        "shot.2026.02.png",
        "x.png",
        "x.jpg",
        "a b.png",
        "a_b.png",
    ];
    for (i, name) in names.iter().enumerate() {
        write_png(&inbox.join(name), 20 + i as u32, 16);
    }
    let out = tmp.path().join("out");
    // A killed daemon's temporary is swept at start; a file of another pattern is not ours to delete.
    fs::create_dir_all(out.join("2026-01-01")).expect("mkdir");
    let stale = out.join(format!("2026-01-01/.tclseg-{}-a1B2c3D4.tmp", dead_pid()));
    fs::write(&stale, b"half").expect("write");
    fs::write(out.join(".someone-else.tmp"), b"theirs").expect("write");
    let config = serve_config().pipeline(folder_pipeline("inbox", &inbox, &out));
    let mut daemon = Daemon::start(tmp.path(), &config);
    let count = || {
        fs::read_dir(&out)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                    .count()
            })
            .unwrap_or(0)
    };
    wait_until("a sidecar per image", Duration::from_secs(90), || {
        count() >= names.len()
    });
    daemon.terminate(Duration::from_secs(60));
    let log = daemon.log_text();
    assert_eq!(count(), names.len(), "{:?}\n{log}", tree(&out));
    assert!(!stale.exists(), "stale temporary swept");
    assert!(out.join(".someone-else.tmp").exists(), "not our pattern");
    for (i, name) in names.iter().enumerate() {
        let shown = name.replace(' ', "%20");
        let labels = out.join(format!("{shown}.labels.png"));
        assert_eq!(image_size(&labels), (20 + i as u32, 16), "{name}");
        let sidecar: serde_json::Value =
            serde_json::from_slice(&fs::read(out.join(format!("{shown}.json"))).expect("json"))
                .expect("valid");
        assert!(
            sidecar["image"]
                .as_str()
                .is_some_and(|s| s.ends_with(&format!("/{name}"))),
            "{sidecar}"
        );
    }
}

fn config_check(dir: &Path, pipelines: &[Pipeline]) -> Output {
    let path = dir.join("check.toml");
    serve_config().with_pipelines(pipelines).write(&path);
    common::config_check(&path)
}

#[test]
fn config_check_refuses_shared_nested_and_fed_back_output_folders() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    fs::create_dir_all(t.join("x")).expect("mkdir");
    let inbox = t.join("in");
    fs::create_dir_all(&inbox).expect("mkdir");
    let other = t.join("other-in");
    fs::create_dir_all(&other).expect("mkdir");
    let ok = [
        folder_pipeline("a", &inbox, &t.join("same")),
        folder_pipeline("b", &other, &t.join("same-2")),
    ];
    let run = config_check(t, &ok);
    assert_ok(&run);

    for (second_out, how) in [
        (t.join("x/../same"), "is the same folder as"),
        (t.join("same/sub"), "is inside"),
    ] {
        let pipelines = [
            folder_pipeline("a", &inbox, &t.join("same")),
            folder_pipeline("b", &other, &second_out),
        ];
        let run = config_check(t, &pipelines);
        assert_eq!(run.status.code(), Some(1), "{}", second_out.display());
        let err = stderr(&run);
        assert!(
            err.contains("pipeline[1] 'b'.output.dir") && err.contains(how),
            "{err}"
        );
    }

    let fed_back = folder_pipeline("a", &inbox, &inbox.join("masks"));
    let run = config_check(t, &[fed_back]);
    assert_eq!(run.status.code(), Some(1));
    let err = stderr(&run);
    assert!(
        err.contains("pipeline[0] 'a'.output.dir") && err.contains("inside the watched folder"),
        "{err}"
    );
}

#[test]
fn segment_refuses_an_output_folder_inside_an_input_folder() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path().join("D");
    fs::create_dir_all(&d).expect("mkdir");
    write_png(&d.join("a.png"), 20, 20);
    for out in [
        d.join("masks"),
        d.clone(),
        tmp.path().join("D/./x/../masks"),
    ] {
        let run = segment(&[&d], &out, &[]);
        assert_eq!(run.status.code(), Some(1), "{}", out.display());
        let err = stderr(&run);
        assert!(err.contains("inside the input folder"), "{err}");
        assert_eq!(tree(&d), ["a.png"], "nothing written into the input");
    }
    // Beside the input folder is fine.
    let run = segment(&[&d], &tmp.path().join("D-masks"), &[]);
    assert_ok(&run);
}

/// A pid no process has: a child that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().expect("true");
    let pid = child.id();
    child.wait().expect("wait");
    pid
}

#[test]
fn the_next_run_sweeps_stale_temporaries_of_a_killed_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let input = tmp.path().join("in");
    fs::create_dir_all(input.join("sub")).expect("mkdir");
    write_png(&input.join("a.png"), 20, 20);
    write_png(&input.join("sub/b.png"), 20, 20);
    let out = tmp.path().join("out");
    fs::create_dir_all(out.join("sub")).expect("mkdir");
    let dead = format!(".tclseg-{}-a1B2c3D4.tmp", dead_pid());
    // This test process is running: its temporaries may be in use.
    let live = format!(".tclseg-{}-a1B2c3D4.tmp", std::process::id());
    for dir in [out.clone(), out.join("sub")] {
        for name in [&dead, &live, ".someone-else.tmp"] {
            fs::write(dir.join(name), b"half a file").expect("write");
        }
    }
    let run = segment(&[&input], &out, &[]);
    assert_ok(&run);
    for dir in [out.clone(), out.join("sub")] {
        assert!(!dir.join(&dead).exists(), "{} swept", dir.display());
        assert!(
            dir.join(&live).exists(),
            "a running writer's temporary is kept"
        );
        assert!(dir.join(".someone-else.tmp").exists(), "not our pattern");
    }
}

#[test]
fn a_240_character_file_name_is_segmented() {
    let tmp = tempfile::tempdir().expect("tmp");
    let input = tmp.path().join("in");
    fs::create_dir_all(&input).expect("mkdir");
    let stem = "n".repeat(236);
    write_png(&input.join(format!("{stem}.png")), 20, 20);
    let out = tmp.path().join("out");
    let run = segment(&[&input], &out, &[]);
    assert_ok(&run);
    assert_eq!(
        image_size(&out.join(format!("{stem}.labels.png"))),
        (20, 20)
    );
    assert!(out.join(format!("{stem}.overlay.jpg")).is_file());
    assert!(out.join(format!("{stem}.json")).is_file());
}

#[test]
fn out_naming_a_file_says_it_is_not_a_folder() {
    let tmp = tempfile::tempdir().expect("tmp");
    let input = tmp.path().join("a.png");
    write_png(&input, 20, 20);
    let file = tmp.path().join("results.txt");
    fs::write(&file, b"keep me").expect("write");
    let run = segment(&[&input], &file, &[]);
    assert_eq!(run.status.code(), Some(1));
    let err = stderr(&run);
    assert!(
        err.contains(&format!("--out {} is a file, not a folder", file.display())),
        "{err}"
    );
    assert!(!err.contains("os error 17"), "{err}");
    assert_eq!(fs::read(&file).expect("read"), b"keep me");
}

/// Noise: its PNG overlay does not compress.
fn write_noise_png(path: &Path, w: u32, h: u32) {
    let mut state: u32 = 0x1234_5678;
    let img = image::RgbImage::from_fn(w, h, |_, _| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let b = state.to_le_bytes();
        image::Rgb([b[0], b[1], b[2]])
    });
    img.save(path).expect("save png");
}

fn pages(bytes: u64) -> u64 {
    bytes.div_ceil(4096)
}

/// Whether this machine lets us mount a private tmpfs (root, or an unprivileged user namespace).
fn can_mount_tmpfs(dir: &Path) -> bool {
    Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs \"$0\""])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn a_full_disk_leaves_no_part_of_the_failed_image_and_resume_completes_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let input = t.join("in");
    fs::create_dir_all(&input).expect("mkdir");
    write_png(&input.join("small.png"), 24, 24);
    write_noise_png(&input.join("big.png"), 320, 320);
    let format = ["--overlay-format", "png", "--jobs", "1", "--batch", "1"];

    // The sizes of big.png's outputs, written where there is room.
    let roomy = t.join("roomy");
    let run = segment(&[&input], &roomy, &format);
    assert_ok(&run);
    let size = |name: &str| fs::metadata(roomy.join(name)).expect(name).len();
    let (labels, overlay) = (size("big.labels.png"), size("big.overlay.png"));
    let small: u64 = [
        "small.labels.png",
        "small.overlay.png",
        "small.json",
        "segment-report.json",
    ]
    .iter()
    .map(|n| pages(size(n)))
    .sum();
    // Room for small.png's outputs, the report and big.png's labels, not for its overlay.
    let room_pages = small + pages(labels) + 4;
    assert!(
        pages(overlay) > room_pages,
        "the overlay ({overlay} bytes) must not fit in {room_pages} pages"
    );

    let disk = t.join("disk");
    fs::create_dir_all(&disk).expect("mkdir");
    let bin = common::tclseg_bin();
    let bin = bin.display();
    let bundle = fixture_bundle();
    let args = format!(
        "segment '{}' --out \"$DISK/out\" --model '{}' -q 'red square' --device cpu --threads 1 {}",
        input.display(),
        bundle.display(),
        format.join(" ")
    );
    let (phase1, phase2) = (t.join("phase1"), t.join("phase2"));
    let tmpfs = can_mount_tmpfs(&disk);
    let steps = format!(
        "'{bin}' {args} >\"$HOST/run1.out\" 2>\"$HOST/run1.err\"; echo $? >\"$HOST/run1.code\"\n\
         cp -a \"$DISK/out\" '{}'\n\
         {free}\n\
         '{bin}' {args} >\"$HOST/run2.out\" 2>\"$HOST/run2.err\"; echo $? >\"$HOST/run2.code\"\n\
         cp -a \"$DISK/out\" '{}'\n",
        phase1.display(),
        phase2.display(),
        free = if tmpfs {
            "mount -o remount,size=64m tmpfs \"$DISK\""
        } else {
            "ulimit -S -f unlimited"
        }
    );
    let script = if tmpfs {
        // A real full disk: a tmpfs of `room_pages` pages in a private mount namespace (gone when it exits).
        format!(
            "set -e\nmount -t tmpfs -o size={}k tmpfs \"$DISK\"\nset +e\n{steps}",
            room_pages * 4
        )
    } else {
        // No mount allowed here: the file-size limit makes the kernel refuse the overlay's write instead (EFBIG).
        eprintln!("cannot mount a tmpfs here; the overlay's write fails on RLIMIT_FSIZE instead");
        let blocks = (labels.max(size("small.overlay.png")) + 4096).div_ceil(512);
        format!("trap '' XFSZ\nulimit -S -f {blocks}\n{steps}")
    };
    let mut shell = if tmpfs {
        let mut c = Command::new("unshare");
        c.args(["-rm", "sh"]);
        c
    } else {
        Command::new("sh")
    };
    let status = shell
        .args(["-c", &script])
        .env("DISK", &disk)
        .env("HOST", t)
        .status()
        .expect("run the script");
    assert!(status.success(), "{script}");
    let read = |name: &str| fs::read_to_string(t.join(name)).unwrap_or_default();

    // Full: big.png failed and nothing of it is visible; small.png is whole.
    assert_eq!(read("run1.code").trim(), "1", "{}", read("run1.err"));
    assert!(read("run1.err").contains("big.png"), "{}", read("run1.err"));
    let files = tree(&phase1);
    assert!(
        !files
            .iter()
            .any(|f| f.starts_with("big.") || f.contains(".tclseg-")),
        "{files:?}"
    );
    for name in ["small.labels.png", "small.overlay.png", "small.json"] {
        assert!(files.iter().any(|f| f == name), "{name} in {files:?}");
    }
    // Room again: resume redoes exactly the image that failed.
    assert_eq!(read("run2.code").trim(), "0", "{}", read("run2.err"));
    assert!(
        read("run2.out").contains("done 1, skipped 1"),
        "{}",
        read("run2.out")
    );
    assert_eq!(image_size(&phase2.join("big.overlay.png")), (320, 320));
    assert!(phase2.join("big.json").is_file());
}
