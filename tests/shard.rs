//! Beyond one machine (issue 22), with real `tclseg` processes: `segment --shard` runs on the built-in model
//! whose reports merge to the totals of one unsharded run, a shard killed with SIGKILL and run again that
//! completes the set, and two `serve --shard` daemons on one config that together run every pipeline exactly
//! once, before and after a reload.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::config::{Config, Pipeline};
use common::daemon::Daemon;
use common::{arg, free_port, stdout, wait_until, write_png};

/// `tclseg segment IN --out OUT -q "red square"` on the built-in model (no --model, no $TCLSEG_MODEL; unpacked
/// into this test's own cache), CPU, one thread, one image per call, then `extra`.
fn segment_command(work: &Path, input: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(common::tclseg_bin());
    cmd.current_dir(work)
        .args(["segment", arg(input), "--out", arg(out), "-q", "red square"])
        .args([
            "--device",
            "cpu",
            "--threads",
            "1",
            "--batch",
            "1",
            "--jobs",
            "1",
        ])
        .args(extra)
        .env_remove("TCLSEG_MODEL")
        .env_remove("TCLSEG_LOG")
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env("XDG_CACHE_HOME", work.join("cache"));
    cmd
}

fn segment_builtin(work: &Path, input: &Path, out: &Path, extra: &[&str]) -> Output {
    segment_command(work, input, out, extra)
        .output()
        .expect("run tclseg segment")
}

fn merge(dir: &Path) -> Output {
    common::tclseg(&["merge-reports", arg(dir)])
}

fn report(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("report JSON")
}

/// `n` small pictures named `<prefix><i>.png` in `dir`, every third in a sub-folder.
fn pictures(dir: &Path, prefix: &str, n: usize, size: (u32, u32)) {
    for i in 0..n {
        let folder = if i % 3 == 0 {
            dir.join("sub")
        } else {
            dir.to_path_buf()
        };
        std::fs::create_dir_all(&folder).expect("mkdir");
        write_png(&folder.join(format!("{prefix}{i}.png")), size.0, size.1);
    }
}

/// Every file under `dir` (relative), except the runs' reports.
fn outputs(dir: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if !entry
                .file_name()
                .to_string_lossy()
                .starts_with("segment-report")
            {
                out.insert(path.strip_prefix(root).expect("under root").to_path_buf());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(out),
        common::stderr(out)
    );
}

#[test]
fn shard_reports_merge_to_the_totals_of_an_unsharded_run() {
    let dir = tempfile::tempdir().expect("tmp");
    let work = dir.path();
    let input = work.join("in");
    pictures(&input, "a", 14, (96, 72));
    let (whole, split) = (work.join("whole"), work.join("split"));

    let out = segment_builtin(work, &input, &whole, &[]);
    assert_exit(&out, 0);
    let unsharded = report(&whole.join("segment-report.json"));
    assert_eq!(unsharded["done"], 14, "{unsharded}");

    std::fs::create_dir_all(&split).expect("mkdir");
    let none = merge(&split);
    assert_exit(&none, 1);
    assert!(
        common::stderr(&none).contains("no shard reports"),
        "{}",
        common::stderr(&none)
    );

    for i in 0..2 {
        assert_exit(
            &segment_builtin(work, &input, &split, &["--shard", &format!("{i}/3")]),
            0,
        );
    }
    let partial = merge(&split);
    assert_exit(&partial, 1);
    assert!(
        stdout(&partial).contains("shard 2/3: missing (no segment-report.2-of-3.json)"),
        "{}",
        stdout(&partial)
    );

    // The last shard through Slurm's variables, as an array task sees them (ids 5..7).
    let out = segment_command(work, &input, &split, &["--shard", "auto"])
        .env("SLURM_ARRAY_TASK_ID", "7")
        .env("SLURM_ARRAY_TASK_MIN", "5")
        .env("SLURM_ARRAY_TASK_COUNT", "3")
        .output()
        .expect("run");
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("shard 2/3 ("), "{}", stdout(&out));

    let merged = merge(&split);
    assert_exit(&merged, 0);
    let text = stdout(&merged);
    assert!(
        text.contains("3 of 3 shards finished: done 14, skipped 0 (up to date), failed 0, not attempted 0 of 14 images"),
        "{text}"
    );
    // Each image was done by exactly one shard: the shards' shares add up to the set, and together they wrote
    // exactly the files the unsharded run wrote.
    let mut done_by_shard = Vec::new();
    for i in 0..3 {
        let r = report(&split.join(format!("segment-report.{i}-of-3.json")));
        assert_eq!(r["all_images"], 14, "{r}");
        assert_eq!(r["finished"], true, "{r}");
        done_by_shard.push(r["done"].as_u64().expect("done"));
    }
    assert_eq!(done_by_shard.iter().sum::<u64>(), 14);
    assert_eq!(outputs(&split), outputs(&whole));

    // Files added later go to their own shards; none done before moves: each shard skips exactly what it did.
    pictures(&input, "b", 9, (96, 72));
    for (i, done_before) in done_by_shard.iter().enumerate() {
        let out = segment_builtin(work, &input, &split, &["--shard", &format!("{i}/3")]);
        assert_exit(&out, 0);
        let r = report(&split.join(format!("segment-report.{i}-of-3.json")));
        assert_eq!(r["skipped"].as_u64(), Some(*done_before), "shard {i}: {r}");
        assert_eq!(r["all_images"], 23, "{r}");
    }
    let merged = merge(&split);
    assert_exit(&merged, 0);
    assert!(
        stdout(&merged)
            .contains("done 9, skipped 14 (up to date), failed 0, not attempted 0 of 23 images"),
        "{}",
        stdout(&merged)
    );
    assert_exit(&segment_builtin(work, &input, &whole, &[]), 0);
    assert_eq!(outputs(&split), outputs(&whole));
}

#[test]
fn a_shard_killed_mid_run_and_run_again_completes_the_set() {
    let dir = tempfile::tempdir().expect("tmp");
    let work = dir.path();
    let input = work.join("in");
    pictures(&input, "k", 36, (320, 240));
    let out_dir = work.join("out");
    let sidecars = |dir: &Path| {
        outputs(dir)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .count()
    };

    let mut shard0: Child = segment_command(work, &input, &out_dir, &["--shard", "0/2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start shard 0");
    wait_until("shard 0's first outputs", Duration::from_secs(120), || {
        out_dir.is_dir() && sidecars(&out_dir) > 0
    });
    common::signal(shard0.id(), "KILL");
    shard0.wait().expect("reap shard 0");
    let killed = report(&out_dir.join("segment-report.0-of-2.json"));
    assert_eq!(killed["finished"], false, "{killed}");
    let done_before = sidecars(&out_dir);
    let share0 = killed["images"].as_u64().expect("images") as usize;
    assert!(
        done_before < share0,
        "shard 0 finished ({done_before} of {share0}) before the kill"
    );

    assert_exit(
        &segment_builtin(work, &input, &out_dir, &["--shard", "1/2"]),
        0,
    );
    let merged = merge(&out_dir);
    assert_exit(&merged, 1);
    assert!(
        stdout(&merged).contains("shard 0/2: started but did not finish"),
        "{}",
        stdout(&merged)
    );

    // The engine's retry: the same index again. It resumes (what was written is skipped) and the set is whole.
    let rerun = segment_builtin(work, &input, &out_dir, &["--shard", "0/2"]);
    assert_exit(&rerun, 0);
    let r = report(&out_dir.join("segment-report.0-of-2.json"));
    assert_eq!(r["finished"], true, "{r}");
    assert!(
        r["skipped"].as_u64().unwrap_or(0) >= 1,
        "nothing resumed: {r}"
    );
    assert_eq!(
        (r["done"].as_u64().unwrap_or(0) + r["skipped"].as_u64().unwrap_or(0)) as usize,
        share0,
        "{r}"
    );
    let merged = merge(&out_dir);
    assert_exit(&merged, 0);
    assert!(
        stdout(&merged).contains("of 36 images"),
        "{}",
        stdout(&merged)
    );
    assert!(
        stdout(&merged).contains("failed 0, not attempted 0"),
        "{}",
        stdout(&merged)
    );
    assert_eq!(sidecars(&out_dir), 36);
    let temporaries: Vec<PathBuf> = outputs(&out_dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "tmp"))
        .collect();
    assert!(temporaries.is_empty(), "left behind: {temporaries:?}");
}

#[test]
fn shard_errors_name_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tmp");
    let work = dir.path();
    let input = work.join("in");
    pictures(&input, "e", 1, (32, 32));
    let out = work.join("out");
    let cases: [(&[&str], &str); 4] = [
        (&["--shard", "3/3"], "shard 3 of 3 does not exist"),
        (&["--shard", "0/0"], "at least 1"),
        (
            &["--shard", "auto"],
            "neither JOB_COMPLETION_INDEX nor SLURM_ARRAY_TASK_ID is set",
        ),
        (&["--shard", "1/4", "--shards", "3"], "disagree"),
    ];
    for (extra, want) in cases {
        let o = segment_builtin(work, &input, &out, extra);
        assert_exit(&o, 1);
        assert!(
            common::stderr(&o).contains(want),
            "{extra:?}: {}",
            common::stderr(&o)
        );
    }
    let o = segment_command(work, &input, &out, &["--shard", "auto"])
        .env("JOB_COMPLETION_INDEX", "1")
        .output()
        .expect("run");
    assert_exit(&o, 1);
    assert!(
        common::stderr(&o).contains("spec.completions"),
        "{}",
        common::stderr(&o)
    );
    assert!(!out.exists(), "a refused shard wrote {}", out.display());
}

/// `daemon.shard` and the pipelines each daemon runs, from its `/status`.
fn share(daemon: &Daemon) -> (BTreeSet<String>, serde_json::Value) {
    let status: serde_json::Value =
        serde_json::from_str(&daemon.get("/status").body).expect("status JSON");
    let shard = status["daemon"]["shard"].clone();
    let runs: BTreeSet<String> = shard["runs"]
        .as_array()
        .unwrap_or_else(|| panic!("no daemon.shard.runs in {status}"))
        .iter()
        .map(|v| v.as_str().expect("name").to_string())
        .collect();
    let running: BTreeSet<String> = status["daemon"]["pipelines"]
        .as_object()
        .expect("daemon.pipelines")
        .keys()
        .cloned()
        .collect();
    assert_eq!(runs, running, "what it says it runs is what runs: {status}");
    (runs, shard)
}

/// Together the daemons run each of `names` exactly once, and each names the other's as skipped.
fn assert_one_owner_each(a: &Daemon, b: &Daemon, names: &[&str]) {
    let (runs_a, shard_a) = share(a);
    let (runs_b, shard_b) = share(b);
    assert!(
        runs_a.is_disjoint(&runs_b),
        "both run {:?}",
        runs_a.intersection(&runs_b)
    );
    let all: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
    assert_eq!(runs_a.union(&runs_b).cloned().collect::<BTreeSet<_>>(), all);
    assert_eq!(shard_a["shard"], "0/2");
    assert_eq!(shard_b["shard"], "1/2");
    for name in &runs_b {
        assert_eq!(shard_a["skipped"][name], 1, "{shard_a}");
    }
    for name in &runs_a {
        assert_eq!(shard_b["skipped"][name], 0, "{shard_b}");
    }
}

#[test]
fn two_serve_shards_on_one_config_run_every_pipeline_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let pipelines = |names: &[&str]| -> Vec<Pipeline> {
        names
            .iter()
            .map(|n| {
                Pipeline::folder(
                    n,
                    &dir.path().join("inbox").join(n),
                    &dir.path().join("out").join(n),
                )
            })
            .collect()
    };
    let first = ["cam-a", "cam-b", "cam-c", "cam-d", "cam-e"];
    let config = Config::new().with_pipelines(&pipelines(&first));
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&dir_a).expect("mkdir");
    std::fs::create_dir_all(&dir_b).expect("mkdir");
    // One config text for both; the second daemon listens elsewhere (an environment override, as a second
    // daemon on one host would) and finds its shard in its host name, as a StatefulSet's pod does.
    let port_b = free_port();
    let listen_b = format!("127.0.0.1:{port_b}");
    let a = Daemon::start_text(
        &dir_a,
        &config.text(),
        config.port,
        &[("TCLSEG_SHARD", "0/2")],
    );
    let b = Daemon::start_text(
        &dir_b,
        &config.text(),
        port_b,
        &[
            ("TCLSEG_SHARD", "auto"),
            ("TCLSEG_SHARDS", "2"),
            ("HOSTNAME", "tclseg-1"),
            ("TCLSEG_HTTP__LISTEN", &listen_b),
        ],
    );
    a.wait_ready();
    b.wait_ready();
    assert_one_owner_each(&a, &b, &first);
    assert!(
        a.log_text()
            .contains("shard 0/2: runs 3 of the config's 5 pipelines"),
        "{}",
        a.log_text()
    );

    // A reload adds pipelines: each new one starts on its owner only.
    let second = [
        "cam-a", "cam-b", "cam-c", "cam-d", "cam-e", "cam-f", "cam-g", "cam-h",
    ];
    let config = config.with_pipelines(&pipelines(&second));
    a.rewrite(&config);
    b.rewrite(&config);
    assert_eq!(a.post("/reload", None).code, 200);
    assert_eq!(b.post("/reload", None).code, 200);
    assert_one_owner_each(&a, &b, &second);
}

#[test]
fn serve_shard_auto_needs_an_ordinal_in_the_host_name() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = Config::new().no_http().with_pipelines(&[Pipeline::folder(
        "cam-a",
        &dir.path().join("inbox"),
        &dir.path().join("out"),
    )]);
    let path = dir.path().join("serve.toml");
    config.write(&path);
    let out = Command::new(common::tclseg_bin())
        .args([
            "serve",
            "--config",
            arg(&path),
            "--shard",
            "auto",
            "--shards",
            "2",
        ])
        .env("HOSTNAME", "gpu-box")
        .env_remove("TCLSEG_SHARD")
        .env_remove("TCLSEG_SHARDS")
        .output()
        .expect("run serve");
    assert_exit(&out, 1);
    assert!(
        common::stderr(&out).contains("'gpu-box' does not end in -<number>"),
        "{}",
        common::stderr(&out)
    );
}

/// `eval --shard`: each shard scores its share and saves its predictions into one folder; scoring that folder
/// gives the unsharded run's mIoU (the documented way to combine the shards).
#[test]
fn eval_shards_saved_predictions_score_like_one_run() {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("data");
    let l = tclseg::eval::datasets::spec("voc").expect("voc").layout;
    let ids: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let image = root.join(l.images).join(format!("{id}.jpg"));
        std::fs::create_dir_all(image.parent().expect("parent")).expect("mkdir");
        write_png(&image.with_extension("png"), 64, 48);
        image::open(image.with_extension("png"))
            .expect("png")
            .save(&image)
            .expect("jpg");
        let label = image::GrayImage::from_fn(64, 48, |x, y| {
            image::Luma([if (x + y) % 7 == 0 {
                255
            } else {
                ((x / 16 + i as u32) % 3) as u8 * 7
            }])
        });
        let path = root.join(l.labels).join(format!("{id}.png"));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        label.save(&path).expect("label");
    }
    let split = root.join(l.split.expect("split"));
    std::fs::create_dir_all(split.parent().expect("parent")).expect("mkdir");
    std::fs::write(&split, ids.join("\n") + "\n").expect("split");

    let bundle = common::fixture_bundle();
    // `eval` of the dataset, through the model (`model` true) or scoring saved predictions.
    let eval = |model: bool, extra: &[&str]| -> Output {
        let mut args = vec!["eval", "--dataset", "voc", "--root", arg(&root)];
        if model {
            args.extend_from_slice(&["--model", arg(&bundle), "--device", "cpu"]);
            args.extend_from_slice(&["--threads", "1", "--no-pamr"]);
        }
        args.extend_from_slice(extra);
        common::tclseg(&args)
    };
    let whole = dir.path().join("whole.json");
    assert_exit(&eval(true, &["--out", arg(&whole)]), 0);
    let saved = dir.path().join("saved");
    let mut images = 0;
    for i in 0..2 {
        let out_file = dir.path().join(format!("shard{i}.json"));
        let shard = format!("{i}/2");
        let out = eval(
            true,
            &[
                "--shard",
                &shard,
                "--save-predictions",
                arg(&saved),
                "--out",
                arg(&out_file),
            ],
        );
        assert_exit(&out, 0);
        let r = report(&out_file);
        assert_eq!(r["shard"]["index"], i, "{r}");
        // Both shards have work (ids s1..s4 hash to shard 0, s0 and s5 to shard 1).
        let share = r["images"].as_u64().expect("images");
        assert!(share > 0, "{r}");
        images += share;
    }
    assert_eq!(images, 6);
    let combined = dir.path().join("combined.json");
    let out = eval(
        false,
        &["--predictions", arg(&saved), "--out", arg(&combined)],
    );
    assert_exit(&out, 0);
    assert_eq!(report(&combined)["images"], 6);
    assert_eq!(report(&combined)["miou"], report(&whole)["miou"]);
}
