//! Training-free heads end to end: `tclseg models export --heads` writes head graphs on the shared trunk, `models
//! verify` runs each, `segment --head`, `eval`-style settings and `models bench --head` score with the head asked
//! for (`--against` timing another in turn), each sidecar names its head, and a head the bundle lacks is refused
//! naming the heads it has; groups of images on different heads share the trunk runs. Also the manifest's [heads]
//! checks.
//! Needs the setup's `.venv` (the export runs the Python trainer).

mod common;

use std::fs;
use std::path::Path;

use common::{arg, assert_ok, fixture_bundle, stderr, stdout, tclseg, write_png};
use tclseg::model::bundle::{Bundle, HeadId, HeadKind, Manifest};
use tclseg::model::types::{SegmentSettings, SettingsOverrides};
use tclseg::model::{
    DeviceChoice, Engine, EngineOptions, ImageGroup, Precision, Processing, Query,
};

const HEADS: &str = "naclip,tcl,maskclip,sclip,clearclip,pearl";

fn export(out: &Path) {
    export_heads(out, HEADS);
}

fn export_heads(out: &Path, heads: &str) {
    let run = tclseg(&[
        "models",
        "export",
        "--random",
        "tiny",
        "--seed",
        "5",
        "--precision",
        "fp32",
        "--heads",
        heads,
        "--out",
        arg(out),
    ]);
    assert_ok(&run);
}

/// `segment INPUT` with two queries on `bundle`, scored by `head`, on one CPU thread.
fn segment(bundle: &Path, input: &Path, out: &Path, head: &str) -> std::process::Output {
    tclseg(&[
        "segment",
        arg(input),
        "--out",
        arg(out),
        "--model",
        arg(bundle),
        "-q",
        "red square",
        "-q",
        "grey wall",
        "--head",
        head,
        "--device",
        "cpu",
        "--threads",
        "1",
    ])
}

#[test]
fn a_bundle_of_heads_exports_verifies_segments_and_benches_with_each() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let bundle_dir = tmp.path().join("heads");
    export(&bundle_dir);

    let bundle = Bundle::open(&bundle_dir).expect("bundle verifies");
    let m = bundle.manifest();
    assert_eq!(
        m.head_names(),
        ["clearclip", "maskclip", "naclip", "pearl", "sclip", "tcl"]
    );
    assert_eq!(
        m.default_head.as_deref(),
        Some("naclip"),
        "the first asked for"
    );
    let naclip = m.head_spec("naclip").expect("naclip");
    assert_eq!(
        (naclip.kind, naclip.graph.as_str()),
        (HeadKind::Dense, "naclip_head")
    );

    let verify = tclseg(&["models", "verify", arg(&bundle_dir), "--precision", "fp32"]);
    assert_ok(&verify);
    for role in [
        "naclip_head",
        "sclip_head",
        "pearl_head",
        "tcl_head",
        "mask_head",
    ] {
        assert!(
            stdout(&verify).contains(role),
            "{role} ran: {}",
            stdout(&verify)
        );
    }

    let listed = tclseg(&["models", "list", "--dir", arg(tmp.path())]);
    assert_ok(&listed);
    assert!(
        stdout(&listed).contains("clearclip,maskclip,naclip,pearl,sclip,tcl"),
        "{}",
        stdout(&listed)
    );

    let input = tmp.path().join("a.png");
    write_png(&input, 70, 50);
    let mut fractions = Vec::new();
    for head in ["naclip", "sclip", "tcl", "pearl"] {
        let out = tmp.path().join(format!("out-{head}"));
        let run = segment(&bundle_dir, &input, &out, head);
        assert_ok(&run);
        let png = image::open(out.join("a.labels.png")).expect("labels");
        assert_eq!((png.width(), png.height()), (70, 50));
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(out.join("a.json")).expect("json")).expect("json");
        let classes = json["classes"].as_array().expect("classes");
        assert_eq!(classes.len(), 3, "{head}: background + 2 queries");
        let total: f64 = classes
            .iter()
            .map(|c| c["pixel_fraction"].as_f64().expect("fraction"))
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{head}: {total}");
        fractions.push(classes[0]["pixel_fraction"].as_f64().expect("fraction"));
        assert_eq!(
            json["settings"]["pamr"],
            head == "tcl",
            "{head}: its own PAMR default"
        );
        assert_eq!(json["model"]["head"], head, "the sidecar names its head");
    }
    // A training-free head's default threshold is 0: its pixels all go to a query, never to background.
    assert_eq!(fractions[0], 0.0, "naclip: no background");

    let bad = segment(&bundle_dir, &input, &tmp.path().join("bad"), "gem");
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("no head 'gem'")
            && stderr(&bad).contains("clearclip, maskclip, naclip, pearl, sclip, tcl"),
        "{}",
        stderr(&bad)
    );

    let bench = tclseg(&[
        "models",
        "bench",
        "--model",
        arg(&bundle_dir),
        "--images",
        arg(&input),
        "--batch",
        "1",
        "--warmup",
        "0",
        "--iterations",
        "1",
        "--head",
        "clearclip",
        "--against",
        "tcl",
        "--no-pamr",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]);
    assert_ok(&bench);
    let line: serde_json::Value =
        serde_json::from_str(stdout(&bench).lines().next().unwrap_or_default())
            .expect("a JSON line");
    assert_eq!(line["batch"], 1, "{line}");
    assert_eq!(
        (&line["head"], &line["against"]["head"]),
        (&serde_json::json!("clearclip"), &serde_json::json!("tcl")),
        "{line}"
    );
    assert_eq!(
        (&line["pamr"], &line["against"]["pamr"]),
        (&serde_json::json!(false), &serde_json::json!(false)),
        "--no-pamr holds for both heads (TCL's default is on): {line}"
    );
    let ratio = line["crops_per_s_ratio"].as_f64().expect("a ratio");
    let want = line["crops_per_s"].as_f64().expect("crops/s")
        / line["against"]["crops_per_s"].as_f64().expect("crops/s");
    assert!(ratio > 0.0 && (ratio - want).abs() < 1e-9, "{line}");
}

#[test]
fn head_settings_come_from_the_head_unless_overridden() {
    let text = fs::read_to_string(fixture_bundle().join("model.toml")).expect("manifest");
    let with_heads = format!(
        "{text}\n[heads.tcl]\nkind = \"tcl\"\ngraph = \"tcl_head\"\n\n[heads.naclip]\nkind = \"dense\"\n\
         graph = \"image_trunk\"\nlogit_scale = 40.0\npamr = false\nprob_thresh = 0.2\n"
    );
    let m = Manifest::parse(&with_heads).expect("parses");
    // Without default_head, TCL is the default where the bundle has it.
    let tcl =
        SegmentSettings::resolve_head(&m, None, SettingsOverrides::default(), false).expect("tcl");
    assert_eq!(m.head(tcl.head.expect("id")).expect("head").0, "tcl");
    assert!(tcl.pamr);
    let nac =
        SegmentSettings::resolve_head(&m, Some("naclip"), SettingsOverrides::default(), false)
            .expect("naclip");
    assert_eq!(
        (nac.pamr, nac.background, nac.kp_weight),
        (false, Some(0.2), 0.0)
    );
    let given = SettingsOverrides {
        pamr: Some(true),
        bg_thresh: Some(0.5),
        kp_weight: None,
    };
    let nac = SegmentSettings::resolve_head(&m, Some("naclip"), given, false).expect("naclip");
    assert_eq!((nac.pamr, nac.background), (true, Some(0.5)));
    let err = SegmentSettings::resolve_head(&m, Some("sclip"), given, false).expect_err("no sclip");
    assert!(
        err.contains("no head 'sclip'") && err.contains("naclip, tcl"),
        "{err}"
    );

    // A fixture without [heads] is TCL's head alone.
    let plain = Manifest::parse(&text).expect("parses");
    assert_eq!(plain.head_names(), ["tcl"]);
}

#[test]
fn a_head_without_its_graph_or_a_wrong_default_is_refused() {
    let text = fs::read_to_string(fixture_bundle().join("model.toml")).expect("manifest");
    let missing = format!("{text}\n[heads.naclip]\nkind = \"dense\"\ngraph = \"naclip_head\"\n");
    let err = Manifest::parse(&missing).expect_err("no graph");
    assert!(err.contains("no 'naclip_head' graph"), "{err}");

    let bad_default = format!(
        "default_head = \"sclip\"\n{text}\n[heads.naclip]\nkind = \"dense\"\ngraph = \"image_trunk\"\n"
    );
    let err = Manifest::parse(&bad_default).expect_err("bad default");
    assert!(err.contains("default_head 'sclip'"), "{err}");

    // Without a TCL head, the TCL graphs are not required.
    let no_tcl: String = text
        .lines()
        .filter(|l| !l.starts_with("tcl_head") && !l.starts_with("mask_head"))
        .collect::<Vec<_>>()
        .join("\n");
    let dense_only =
        format!("{no_tcl}\n[heads.naclip]\nkind = \"dense\"\ngraph = \"image_trunk\"\n");
    let m =
        Manifest::parse(&dense_only).expect("a bundle of training-free heads needs no TCL graphs");
    assert_eq!(m.head_names(), ["naclip"]);
}

/// max |a − b| over the pairs.
fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f32::max)
}

/// An image with a red square on grey, `w` × `h`.
fn picture(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        if x > w / 4 && x < w / 2 && y > h / 4 && y < h / 2 {
            image::Rgb([220, 30, 30])
        } else {
            image::Rgb([120, 120, 120 + (x % 7) as u8])
        }
    })
}

#[test]
fn groups_with_different_heads_share_the_trunk_runs() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("heads");
    export_heads(&dir, "naclip,tcl,sclip");
    let engine = |crop_batch| {
        Engine::open(
            &dir,
            EngineOptions {
                device: DeviceChoice::Cpu,
                precision: Precision::Fp32,
                threads: 1,
                crop_batch,
                spin: false,
                processing: Processing::Host,
            },
        )
        .expect("engine")
    };
    let (a, b) = (picture(70, 50), picture(90, 90));
    let probe = engine(64);
    let m = probe.bundle().manifest();
    let settings = |head: &str| {
        SegmentSettings::resolve_head(m, Some(head), SettingsOverrides::default(), false)
            .expect(head)
    };
    let (naclip, tcl, sclip) = (settings("naclip"), settings("tcl"), settings("sclip"));
    let two = probe
        .embed_queries(&[Query::named("red square"), Query::named("grey wall")])
        .expect("text");
    let three = probe
        .embed_queries(&[
            Query::named("red square"),
            Query::named("grey wall"),
            Query::named("sky"),
        ])
        .expect("text");
    let (one_a, b_a, one_b) = ([&a], [&b, &a], [&b]);
    let groups = [
        ImageGroup {
            images: &one_a,
            text: &two,
            settings: &naclip,
        },
        ImageGroup {
            images: &b_a,
            text: &three,
            settings: &tcl,
        },
        ImageGroup {
            images: &one_b,
            text: &two,
            settings: &sclip,
        },
    ];
    let crops: usize = [&a, &b, &a, &b]
        .iter()
        .map(|img| tclseg::bench::crop_count(img, &m.input))
        .sum();
    assert!(crops >= 4, "{crops} crops");

    // Each group alone, all crops of a group in one run: one trunk run per group.
    let alone: Vec<_> = groups
        .iter()
        .map(|g| {
            let run = probe.segment_groups(std::slice::from_ref(g));
            assert_eq!(run.trunk_runs, 1);
            run.results
                .into_iter()
                .next()
                .expect("one group")
                .expect("segments")
        })
        .collect();
    assert_eq!(probe.trunk_runs(), 3);

    // Together: one trunk run for all three heads; and in runs of 3 crops (runs that straddle groups), as many
    // runs as the crops need — with the labels each group got alone.
    for (crop_batch, runs) in [(64, 1), (3, crops.div_ceil(3))] {
        let e = engine(crop_batch);
        let shared = e.segment_groups(&groups);
        assert_eq!(
            shared.trunk_runs, runs as u64,
            "crop_batch {crop_batch}: {crops} crops"
        );
        assert_eq!(e.trunk_runs(), runs as u64);
        for (k, (result, want)) in shared.results.into_iter().zip(&alone).enumerate() {
            let got = result.expect("segments");
            assert_eq!(got.len(), want.len());
            for (x, y) in got.iter().zip(want) {
                assert_eq!(x.classes, y.classes, "group {k}");
                assert_eq!(x.labels, y.labels, "group {k}, crop_batch {crop_batch}");
                let max = largest_difference(&x.best, &y.best);
                assert!(max <= 1e-5, "group {k}: sharing changed scores by {max}");
            }
        }
    }

    // A group whose head the bundle lacks fails alone; the others still run.
    let bad = SegmentSettings {
        head: Some(HeadId(99)),
        ..naclip
    };
    let run = probe.segment_groups(&[
        ImageGroup {
            settings: &bad,
            ..groups[0]
        },
        groups[1],
    ]);
    assert!(run.results[0]
        .as_ref()
        .is_err_and(|e| e.to_string().contains("no head 99")));
    assert_eq!(
        run.results[1].as_ref().expect("tcl runs")[0].labels,
        alone[1][0].labels
    );
}
