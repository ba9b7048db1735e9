//! The built-in model's per-word thresholds (`[mask.query_thresholds]`, measured on the synthetic world's `val` by
//! `scripts/synthetic-world`) through the binary on the README's sample images: by default they turn some pixels to
//! background and nothing else; `--bg-thresh` (one line for every word), `--no-pamr` and queries with their own
//! prompts switch them off, as `SegmentSettings::resolve` and `Engine::embed_queries` say.

mod common;

use std::path::Path;

use tclseg::model::Bundle;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Segments the samples with the built-in bundle, the sample queries (or `queries`) and `extra` flags; returns
/// the label maps in file order.
fn labels(out: &Path, queries: &Path, extra: &[&str]) -> Vec<Vec<u8>> {
    let root = Path::new(ROOT);
    let model = root.join("models/synthetic-shapes");
    let samples = root.join("samples/shapes");
    let mut args = vec![
        "segment",
        s(&samples),
        "--queries",
        s(queries),
        "--model",
        s(&model),
        "--out",
        s(out),
        "--format",
        "labels,json",
        "--device",
        "cpu",
    ];
    args.extend(extra);
    let run = common::tclseg(&args);
    assert!(
        run.status.success(),
        "segment {extra:?}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let maps = common::label_maps(out);
    assert_eq!(maps.len(), 8, "one label map per sample");
    maps.into_iter().map(|(_, labels)| labels).collect()
}

#[test]
fn per_word_thresholds_only_add_background_and_hold_only_where_calibrated() {
    let bundle = Bundle::open(&Path::new(ROOT).join("models/synthetic-shapes")).expect("built-in");
    let mask = &bundle.manifest().mask;
    assert!(
        !mask.query_thresholds.is_empty(),
        "the built-in model carries its calibrated thresholds"
    );
    let global = format!("{}", mask.bg_thresh_pamr);
    let global_no_pamr = format!("{}", mask.bg_thresh);
    let tmp = tempfile::tempdir().expect("temp dir");
    let queries = Path::new(ROOT).join("samples/shapes/queries.toml");

    let calibrated = labels(&tmp.path().join("default"), &queries, &[]);
    let one_line = labels(
        &tmp.path().join("bg-thresh"),
        &queries,
        &["--bg-thresh", &global],
    );
    // The sidecar names the per-word thresholds that applied, and only when they did.
    let sidecar = |dir: &str| -> serde_json::Value {
        let path = tmp.path().join(dir).join("shapes-0.json");
        serde_json::from_slice(&std::fs::read(&path).expect("sidecar")).expect("sidecar json")
    };
    let applied = &sidecar("default")["settings"]["query_thresholds"];
    for (word, t) in &mask.query_thresholds {
        let got = applied[word.as_str()]
            .as_f64()
            .expect("a calibrated word in the sidecar");
        assert!(
            (got - f64::from(*t)).abs() < 1e-6,
            "{word}: {got} against {t}"
        );
    }
    assert!(sidecar("bg-thresh")["settings"]
        .get("query_thresholds")
        .is_none());
    let mut changed = 0;
    for (a, b) in calibrated.iter().zip(&one_line) {
        for (&x, &y) in a.iter().zip(b) {
            if x != y {
                assert_eq!(x, 0, "a per-word threshold turned label {y} into {x}");
                changed += 1;
            }
        }
    }
    assert!(
        changed > 0,
        "the thresholds above {global} change nothing on the samples"
    );

    // Without PAMR they were not measured: the bundle's no-PAMR threshold alone decides.
    let no_pamr = labels(&tmp.path().join("no-pamr"), &queries, &["--no-pamr"]);
    let no_pamr_one_line = labels(
        &tmp.path().join("no-pamr-bg"),
        &queries,
        &["--no-pamr", "--bg-thresh", &global_no_pamr],
    );
    assert_eq!(no_pamr, no_pamr_one_line);

    // A query prompted in its own words ("green" alone, not the bundle's templates) is another embedding, which the
    // thresholds were not measured on: with and without --bg-thresh it labels alike.
    let own = tmp.path().join("own-prompts.toml");
    let text = std::fs::read_to_string(&queries).expect("sample queries");
    let mut rewritten = String::new();
    for line in text.lines() {
        rewritten.push_str(line);
        rewritten.push('\n');
        if let Some(name) = line.strip_prefix("name = ") {
            rewritten.push_str(&format!("prompts = [{name}]\n"));
        }
    }
    std::fs::write(&own, rewritten).expect("write queries");
    let own_prompts = labels(&tmp.path().join("own"), &own, &[]);
    let own_prompts_one_line = labels(&tmp.path().join("own-bg"), &own, &["--bg-thresh", &global]);
    assert_eq!(own_prompts, own_prompts_one_line);
}
