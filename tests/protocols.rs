//! `--protocol`: a training-free method's own evaluation protocol as the bundle carries it ([protocols.<name>],
//! written by the exporter from `trainer/tclseg_trainer/head_protocols.py`). The manifest's checks and what
//! `Manifest::with_protocol` makes of a bundle; `segment --protocol tcl` leaves the output as it was, byte for
//! byte; a method's protocol runs its head with logit fusion; an unknown protocol lists the choices; a protocol
//! whose graphs or head the bundle lacks is refused; `eval --protocol` takes the protocol's settings for the dataset.
//! The end-to-end test needs the setup's `.venv` (the export).

mod common;

use std::fs;
use std::path::Path;

use common::{arg, assert_ok, fixture_bundle, segment_with, stderr, tclseg, write_png};
use tclseg::eval::datasets::spec;
use tclseg::model::bundle::{Fusion, Manifest, PromptAverage, TCL_PROTOCOL};

/// A [protocols.naclip] table on the bundle's own trunk and `graph`, at `crop` with 40 templates of one kind.
fn protocol_table(graph: &str, crop: usize) -> String {
    format!(
        "\n[protocols.naclip]\nhead = \"naclip\"\ntrunk = \"image_trunk\"\ngraph = \"{graph}\"\n\
         pos_resize = \"scale\"\ncrop_size = {crop}\ncrop_stride = {}\nshort_side = 336\nlong_side_max = 2048\n\
         mean = [0.4814, 0.4578, 0.4082]\nstd = [0.2686, 0.2613, 0.2758]\nlogit_scale = 40.0\n\
         prob_thresh = 0.0\npamr = true\nfusion = \"logits\"\nprompt_average = \"unit\"\n\
         templates = [\"a photo of a {{}}.\", \"a {{}}.\"]\n\n\
         [protocols.naclip.datasets.voc]\nshort_side = 300\nlogit_scale = 65.0\nprob_thresh = 0.1\n\
         whole_image = true\n",
        crop / 2
    )
}

/// The fixture's manifest with a naclip head (on a graph it has) and, optionally, a protocol table.
fn manifest_with(protocol: &str) -> String {
    let text = fs::read_to_string(fixture_bundle().join("model.toml")).expect("manifest");
    format!(
        "{text}\n[heads.tcl]\nkind = \"tcl\"\ngraph = \"tcl_head\"\n\n[heads.naclip]\nkind = \"dense\"\n\
         graph = \"image_trunk\"\nlogit_scale = 50.0\n{protocol}"
    )
}

#[test]
fn a_protocol_becomes_the_bundles_input_prompts_and_head() {
    let m = Manifest::parse(&manifest_with(&protocol_table("image_trunk", 224))).expect("parses");
    assert_eq!(m.protocol_names(), [TCL_PROTOCOL, "naclip"]);

    // "tcl" is the bundle as it is.
    let same = m.with_protocol(TCL_PROTOCOL, None).expect("tcl");
    assert_eq!(same.input.crop_size, m.input.crop_size);
    assert_eq!(same.text.templates, m.text.templates);
    assert_eq!(same.head_names(), ["naclip", "tcl"]);

    let p = m.with_protocol("naclip", None).expect("naclip");
    assert_eq!(
        (p.input.crop_size, p.input.crop_stride, p.input.short_side),
        (224, 112, 336)
    );
    assert_eq!(p.input.mean, [0.4814, 0.4578, 0.4082]);
    assert_eq!(p.text.templates, ["a photo of a {}.", "a {}."]);
    assert_eq!(p.text.prompt_average, PromptAverage::Unit);
    assert_eq!(p.head_names(), ["naclip"], "the protocol's head alone");
    assert_eq!(p.default_head.as_deref(), Some("naclip"));
    let head = p.head_spec("naclip").expect("head");
    assert_eq!(
        (head.fusion, head.logit_scale, head.prob_thresh, head.pamr),
        (Fusion::Logits, 40.0, 0.0, false),
        "the protocol's scoring; the methods' whole-image PAMR is not run"
    );
    assert_eq!(m.text.prompt_average, PromptAverage::Raw);
    assert_eq!(
        m.head_spec("naclip").expect("head").fusion,
        Fusion::Probabilities
    );

    // A dataset's overrides, by eval's dataset name; another dataset takes the defaults.
    let voc = m.with_protocol("naclip", Some("voc")).expect("voc");
    let head = voc.head_spec("naclip").expect("head");
    assert_eq!(
        (voc.input.short_side, head.logit_scale, head.prob_thresh),
        (300, 65.0, 0.1)
    );
    let ade = m.with_protocol("naclip", Some("ade20k")).expect("ade20k");
    assert_eq!(ade.input.short_side, 336);
}

#[test]
fn an_unknown_protocol_or_one_the_bundle_cannot_run_is_refused() {
    let m = Manifest::parse(&manifest_with(&protocol_table("image_trunk", 224))).expect("parses");
    let err = m.with_protocol("sclip", None).expect_err("unknown");
    assert!(
        err.contains("no protocol 'sclip'") && err.contains("its protocols: tcl, naclip"),
        "{err}"
    );

    // A bundle without [protocols] has "tcl" alone.
    let plain = Manifest::parse(&manifest_with("")).expect("parses");
    assert_eq!(plain.protocol_names(), [TCL_PROTOCOL]);
    let err = plain.with_protocol("naclip", None).expect_err("none");
    assert!(err.contains("its protocols: tcl"), "{err}");

    // A protocol naming a graph the bundle lacks, or a head it lacks, does not parse.
    let err = Manifest::parse(&manifest_with(&protocol_table("naclip_head_224", 224)))
        .expect_err("no graph");
    assert!(
        err.contains("[protocols.naclip] needs the fp32 'naclip_head_224' graph"),
        "{err}"
    );
    let text = fs::read_to_string(fixture_bundle().join("model.toml")).expect("manifest");
    let err = Manifest::parse(&format!("{text}\n{}", protocol_table("image_trunk", 224)))
        .expect_err("no head");
    assert!(err.contains("runs head 'naclip'"), "{err}");
}

/// `segment` of `input` on `bundle` with two queries, labels and scores, plus `extra`.
fn segment(bundle: &Path, input: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["--format", "labels,scores"];
    args.extend_from_slice(extra);
    segment_with(bundle, &[input], out, &["red square", "grey wall"], &args)
}

/// A VOC-layout dataset of one 64x48 image under `root`.
fn write_voc(root: &Path) {
    let l = spec("voc").expect("voc").layout;
    let image = root.join(l.images).join(format!("a{}", l.image_suffix));
    let label = root.join(l.labels).join(format!("a{}", l.label_suffix));
    for path in [&image, &label] {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    }
    write_png(&image, 64, 48);
    image::GrayImage::from_fn(64, 48, |x, _| image::Luma([u8::from(x > 31) * 15]))
        .save(&label)
        .expect("label");
    let split = root.join(l.split.expect("split"));
    fs::create_dir_all(split.parent().expect("parent")).expect("mkdir");
    fs::write(&split, "a\n").expect("split");
}

#[test]
fn segment_and_eval_run_a_protocol_and_tcl_leaves_the_output_as_it_was() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let bundle = tmp.path().join("heads");
    assert_ok(&tclseg(&[
        "models",
        "export",
        "--random",
        "tiny",
        "--seed",
        "3",
        "--precision",
        "fp32",
        "--heads",
        "tcl,naclip",
        "--out",
        arg(&bundle),
    ]));
    // A tiny CLIP gets no protocols from the exporter (they are ViT-B/16's): add one on the bundle's own graphs.
    let manifest = bundle.join("model.toml");
    let text = fs::read_to_string(&manifest).expect("manifest");
    let crop = Manifest::parse(&text).expect("parses").input.crop_size;
    fs::write(
        &manifest,
        format!("{text}{}", protocol_table("naclip_head", crop)),
    )
    .expect("write");
    let input = tmp.path().join("in.png");
    write_png(&input, 300, 200);
    let files = |dir: &Path| -> Vec<Vec<u8>> {
        ["in.labels.png", "in.score1.png", "in.score2.png"]
            .iter()
            .map(|f| fs::read(dir.join(f)).expect("output"))
            .collect()
    };

    for head in ["tcl", "naclip"] {
        let (plain, tcl) = (
            tmp.path().join(format!("{head}-plain")),
            tmp.path().join(format!("{head}-tcl")),
        );
        assert_ok(&segment(&bundle, &input, &plain, &["--head", head]));
        assert_ok(&segment(
            &bundle,
            &input,
            &tcl,
            &["--head", head, "--protocol", "tcl"],
        ));
        assert!(
            files(&plain) == files(&tcl),
            "--protocol tcl changes nothing ({head})"
        );
    }

    let own = tmp.path().join("naclip-own");
    assert_ok(&segment(&bundle, &input, &own, &["--protocol", "naclip"]));
    assert!(
        files(&own) != files(&tmp.path().join("naclip-plain")),
        "the method's protocol scores differently"
    );

    let out = tmp.path().join("refused");
    let unknown = segment(&bundle, &input, &out, &["--protocol", "sclip"]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("its protocols: tcl, naclip"),
        "{}",
        stderr(&unknown)
    );
    let other_head = segment(
        &bundle,
        &input,
        &out,
        &["--protocol", "naclip", "--head", "tcl"],
    );
    assert!(!other_head.status.success());
    assert!(
        stderr(&other_head).contains("--protocol naclip runs head 'naclip', not --head tcl"),
        "{}",
        stderr(&other_head)
    );
    let pamr = segment(&bundle, &input, &out, &["--protocol", "naclip", "--pamr"]);
    assert!(!pamr.status.success());
    assert!(
        stderr(&pamr).contains("--pamr under --protocol naclip"),
        "{}",
        stderr(&pamr)
    );

    // eval: the protocol's settings for the dataset (the table's [protocols.naclip.datasets.voc]).
    let root = tmp.path().join("data");
    write_voc(&root);
    let report = tmp.path().join("voc.json");
    let run = tclseg(&[
        "eval",
        "--dataset",
        "voc",
        "--root",
        arg(&root),
        "--model",
        arg(&bundle),
        "--protocol",
        "naclip",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--out",
        arg(&report),
    ]);
    assert_ok(&run);
    let r: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&report).expect("report")).expect("json");
    assert_eq!(r["images"], 1);
    assert_eq!(r["pamr"], false);
    assert_eq!(
        r["background_threshold"]
            .as_f64()
            .map(|v| (v * 10.0).round()),
        Some(1.0),
        "voc's threshold under the protocol: {r}"
    );
}
