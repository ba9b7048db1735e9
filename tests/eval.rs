//! `tclseg eval` end to end: tiny datasets written in each of the eight mmsegmentation layouts (and `folder`),
//! scored from saved predictions against an independent count, through the model on the VOC layout, the paper
//! suite's table, and every kind of broken dataset.

mod common;

use std::path::{Path, PathBuf};

use common::{arg, assert_ok, fixture_bundle, tclseg};
use tclseg::eval::datasets::{spec, PAPER_SUITE};

const W: u32 = 8;
const H: u32 = 6;

fn write_label(path: &Path, data: &[u8], w: u32, h: u32) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().expect("header");
        writer.write_image_data(data).expect("data");
    }
    std::fs::write(path, out).expect("write label");
}

fn write_image(path: &Path, w: u32, h: u32) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 30) as u8, (y * 40) as u8, 90])
    });
    img.save(path).expect("write image");
}

/// Label values for sample `i` of a dataset with `classes` label values (raw, before reduce_zero_label).
fn raw_label(i: usize, classes: usize) -> Vec<u8> {
    (0..(W * H) as usize)
        .map(|p| match (p + i) % 7 {
            0 => 255,
            k => ((k * 3 + i) % classes.min(6)) as u8,
        })
        .collect()
}

/// Writes a 2-image dataset of `key` under `root`; returns the sample ids and raw labels.
fn write_dataset(root: &Path, key: &str) -> Vec<(String, Vec<u8>)> {
    let s = spec(key).expect("dataset");
    let l = s.layout;
    let raw_classes = s.class_names().len() + usize::from(s.reduce_zero_label);
    let ids: Vec<String> = match key {
        "cityscapes" => vec![
            "frankfurt/frankfurt_000000_000001".into(),
            "lindau/lindau_000000_000002".into(),
        ],
        _ => vec!["img_a".into(), "img_b".into()],
    };
    let mut out = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        write_image(
            &root.join(l.images).join(format!("{id}{}", l.image_suffix)),
            W,
            H,
        );
        let label = raw_label(i, raw_classes);
        write_label(
            &root.join(l.labels).join(format!("{id}{}", l.label_suffix)),
            &label,
            W,
            H,
        );
        out.push((id.clone(), label));
    }
    if let Some(split) = l.split {
        let path = root.join(split);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, ids.join("\n") + "\n").expect("split");
    }
    out
}

/// A prediction that differs from the (reduced) truth in a known way.
fn prediction(truth: &[u8], classes: usize) -> Vec<u8> {
    truth
        .iter()
        .enumerate()
        .map(|(p, &t)| {
            if t == 255 {
                (p % classes) as u8
            } else if p % 5 == 0 {
                ((t as usize + 1) % classes) as u8
            } else {
                t
            }
        })
        .collect()
}

fn reduce(raw: &[u8], on: bool) -> Vec<u8> {
    raw.iter()
        .map(|&v| {
            if !on {
                v
            } else if v == 0 || v == 255 {
                255
            } else {
                v - 1
            }
        })
        .collect()
}

/// mIoU ×100 counted directly: per class, |pred ∩ truth| / |pred ∪ truth| over labelled pixels, mean over classes
/// that appear in either.
fn expected_miou(pairs: &[(Vec<u8>, Vec<u8>)], classes: usize) -> f64 {
    let (mut inter, mut union) = (vec![0u64; classes], vec![0u64; classes]);
    for (truth, pred) in pairs {
        for c in 0..classes {
            for (&t, &p) in truth.iter().zip(pred) {
                if t == 255 {
                    continue;
                }
                let (tc, pc) = (t as usize == c, p as usize == c);
                inter[c] += u64::from(tc && pc);
                union[c] += u64::from(tc || pc);
            }
        }
    }
    let ious: Vec<f64> = (0..classes)
        .filter(|&c| union[c] > 0)
        .map(|c| inter[c] as f64 / union[c] as f64)
        .collect();
    100.0 * ious.iter().sum::<f64>() / ious.len() as f64
}

/// `tclseg eval --dataset DATASET --root ROOT` through the fixture model on the CPU, then `extra`.
fn eval_with_model(dataset: &str, root: &Path, extra: &[&str]) -> std::process::Output {
    let bundle = fixture_bundle();
    let mut args = vec![
        "eval",
        "--dataset",
        dataset,
        "--root",
        arg(root),
        "--model",
        arg(&bundle),
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    tclseg(&args)
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("report")).expect("json")
}

#[test]
fn every_layout_is_read_and_scored_like_an_independent_count() {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("data");
    let preds = dir.path().join("preds");
    let mut suite_expected = Vec::new();
    for key in PAPER_SUITE {
        let s = spec(key).expect("spec");
        let classes = s.class_names().len();
        let samples = write_dataset(&root, key);
        let mut pairs = Vec::new();
        for (id, raw) in &samples {
            let truth = reduce(raw, s.reduce_zero_label);
            let pred = prediction(&truth, classes);
            write_label(&preds.join(key).join(format!("{id}.png")), &pred, W, H);
            pairs.push((truth, pred));
        }
        let want = expected_miou(&pairs, classes);
        let out_file = dir.path().join(format!("{key}.json"));
        let out = tclseg(&[
            "eval",
            "--dataset",
            key,
            "--root",
            arg(&root),
            "--predictions",
            arg(&preds.join(key)),
            "--out",
            arg(&out_file),
        ]);
        assert!(
            out.status.success(),
            "{key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = report(&out_file);
        assert_eq!(r["images"], 2, "{key}");
        assert_eq!(
            r["classes"].as_array().expect("classes").len(),
            classes,
            "{key}"
        );
        let got = r["miou"].as_f64().expect("miou");
        assert!(
            (got - want).abs() < 1e-9,
            "{key}: mIoU {got} vs counted {want}"
        );
        suite_expected.push(want);
    }
    // The whole suite in one go: the paper's columns and the average.
    let out = tclseg(&[
        "eval",
        "--suite",
        "paper",
        "--root",
        arg(&root),
        "--predictions",
        arg(&preds),
    ]);
    assert_ok(&out);
    let text = common::stdout(&out);
    for title in [
        "VOC",
        "Context",
        "Object",
        "VOC20",
        "Context59",
        "Stuff",
        "City",
        "ADE",
        "Avg",
        "paper (TCL)",
    ] {
        assert!(text.contains(title), "{title} missing:\n{text}");
    }
    let avg = suite_expected.iter().sum::<f64>() / 8.0;
    assert!(
        text.contains(&format!("{avg:.1}")),
        "average {avg:.1} missing:\n{text}"
    );
}

#[test]
fn the_model_scores_a_voc_layout_and_saves_its_predictions() {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("data");
    let l = spec("voc").expect("voc").layout;
    for (i, id) in ["a", "b"].iter().enumerate() {
        write_image(&root.join(l.images).join(format!("{id}.jpg")), 64, 48);
        let label: Vec<u8> = (0..64 * 48)
            .map(|p| if p % 3 == 0 { 15 } else { (i % 2) as u8 })
            .collect();
        write_label(
            &root.join(l.labels).join(format!("{id}.png")),
            &label,
            64,
            48,
        );
    }
    let split = root.join(l.split.expect("split"));
    std::fs::create_dir_all(split.parent().expect("parent")).expect("mkdir");
    std::fs::write(&split, "a\nb\n").expect("split");
    let saved = dir.path().join("saved");
    let out_file = dir.path().join("voc.json");
    let out = eval_with_model(
        "voc",
        &root,
        &[
            "--threads",
            "1",
            "--save-predictions",
            arg(&saved),
            "--out",
            arg(&out_file),
        ],
    );
    assert_ok(&out);
    let r = report(&out_file);
    assert_eq!(r["images"], 2);
    assert_eq!(r["pamr"], true);
    assert_eq!(
        r["background_threshold"]
            .as_f64()
            .map(|v| (v * 10.0).round()),
        Some(4.0)
    );
    assert_eq!(r["model"]["name"], "tiny-random");
    let miou = r["miou"].as_f64().expect("miou");
    assert!((0.0..=100.0).contains(&miou));
    // Rescoring the saved predictions gives the same number: the deployment path and the file path agree.
    let rescored = dir.path().join("rescored.json");
    let out = tclseg(&[
        "eval",
        "--dataset",
        "voc",
        "--root",
        arg(&root),
        "--predictions",
        arg(&saved),
        "--out",
        arg(&rescored),
    ]);
    assert_ok(&out);
    assert_eq!(report(&rescored)["miou"].as_f64(), Some(miou));
    let table = common::stdout(&out);
    assert!(
        table.contains("aeroplane") && table.contains("mIoU"),
        "{table}"
    );
}

fn eval_err(args: &[&str]) -> String {
    let out = tclseg(args);
    assert_eq!(out.status.code(), Some(1), "expected failure for {args:?}");
    common::stderr(&out)
}

#[test]
fn broken_datasets_get_errors_naming_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("data");
    let root_s = arg(&root).to_string();
    // Missing folder: the message shows the expected layout.
    let err = eval_err(&[
        "eval",
        "--dataset",
        "ade20k",
        "--root",
        &root_s,
        "--predictions",
        "x",
    ]);
    assert!(
        err.contains("ade/ADEChallengeData2016/images/validation")
            && err.contains("mmsegmentation"),
        "{err}"
    );
    let err = eval_err(&["eval", "--dataset", "imagenet", "--root", &root_s]);
    assert!(err.contains("unknown dataset 'imagenet'"), "{err}");

    let samples = write_dataset(&root, "voc");
    let preds = dir.path().join("preds");
    for (id, raw) in &samples {
        write_label(&preds.join(format!("{id}.png")), raw, W, H);
    }
    let preds_s = arg(&preds).to_string();
    let score_voc = [
        "eval",
        "--dataset",
        "voc",
        "--root",
        &root_s,
        "--predictions",
        &preds_s,
    ];
    let ok = tclseg(&score_voc);
    assert_ok(&ok);

    // A label of the wrong size.
    let l = spec("voc").expect("voc").layout;
    let label_a: PathBuf = root.join(l.labels).join("img_a.png");
    write_label(&label_a, &[0; 12], 4, 3);
    let err = eval_err(&score_voc);
    assert!(err.contains("img_a.png") && err.contains("4x3"), "{err}");
    // An unknown class index (VOC has 21 classes).
    write_label(&label_a, &[30; (W * H) as usize], W, H);
    let err = eval_err(&score_voc);
    assert!(
        err.contains("img_a.png") && err.contains("class 30"),
        "{err}"
    );
    // A label that is not a PNG.
    std::fs::write(&label_a, b"garbage").expect("write");
    let err = eval_err(&score_voc);
    assert!(err.contains("img_a.png"), "{err}");
    // A folder dataset without its class list.
    let folder = dir.path().join("mine");
    std::fs::create_dir_all(folder.join("images")).expect("mkdir");
    let err = eval_err(&[
        "eval",
        "--dataset",
        "folder",
        "--root",
        arg(&folder),
        "--predictions",
        "x",
    ]);
    assert!(err.contains("classes.txt"), "{err}");
}

#[test]
fn a_folder_dataset_with_prompts_runs_through_the_model() {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("mine");
    write_image(&root.join("images/one.png"), 40, 30);
    write_label(&root.join("labels/one.png"), &[1; 40 * 30], 40, 30);
    std::fs::write(
        root.join("classes.txt"),
        "# my classes\nbackground\nred square: a red square.; a photo of a red square.\nsky\n",
    )
    .expect("classes");
    let out_file = dir.path().join("r.json");
    let out = eval_with_model("folder", &root, &["--no-pamr", "--out", arg(&out_file)]);
    assert_ok(&out);
    let r = report(&out_file);
    let names: Vec<&str> = r["classes"]
        .as_array()
        .expect("classes")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["background", "red square", "sky"]);
    assert_eq!(r["pamr"], false);
    assert_eq!(
        r["background_threshold"]
            .as_f64()
            .map(|v| (v * 10.0).round()),
        Some(5.0)
    );
}
