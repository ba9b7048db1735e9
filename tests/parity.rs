//! The Rust engine against the PyTorch reference (`reference.segment`) on the same weights and images:
//! golden outputs in tests/fixtures/golden, written by `python -m tclseg_trainer.fixtures`.
//!
//! Tolerances: soft scores max |Δ| ≤ 1e-4 (fp32); label maps ≥ 99.9 % equal.

use std::path::{Path, PathBuf};

use tclseg::model::{
    Bundle, DeviceChoice, Engine, EngineOptions, Precision, Query, SegmentSettings,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Reads a little-endian float32 .npy file: (shape, data).
fn read_npy_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).expect("npy file");
    assert_eq!(
        &bytes[..6],
        b"\x93NUMPY",
        "{} is an npy file",
        path.display()
    );
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).expect("header");
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .expect("shape")
        .split(')')
        .next()
        .expect("shape end");
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("dim"))
        .collect();
    let data: Vec<f32> = bytes[start + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(data.len(), shape.iter().product::<usize>());
    (shape, data)
}

#[test]
fn engine_matches_the_pytorch_reference() {
    let root = fixtures();
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("golden.json")).expect("golden.json"),
    )
    .expect("json");
    let bundle =
        Bundle::open(&root.join(golden["bundle"].as_str().expect("bundle"))).expect("bundle");
    let engine = Engine::new(
        bundle,
        EngineOptions {
            device: DeviceChoice::Cpu,
            precision: Precision::Fp32,
            threads: 1,
            crop_batch: 3,
            spin: true,
        },
    )
    .expect("engine");

    let queries: Vec<Query> = golden["queries"]
        .as_array()
        .expect("queries")
        .iter()
        .map(|q| Query::named(q.as_str().expect("name")))
        .collect();
    let text = engine.embed_queries(&queries).expect("text embeddings");
    let (shape, reference_text) =
        read_npy_f32(&root.join(golden["text_emb"].as_str().expect("text_emb")));
    assert_eq!(shape, [text.rows, text.dim]);
    let text_diff = text
        .data
        .iter()
        .zip(&reference_text)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(text_diff <= 1e-5, "text embeddings differ by {text_diff}");

    let mut report = Vec::new();
    for case in golden["cases"].as_array().expect("cases") {
        let image = image::open(root.join(case["image"].as_str().expect("image")))
            .expect("image")
            .to_rgb8();
        let settings = SegmentSettings {
            pamr: case["pamr"].as_bool().expect("pamr"),
            kp_weight: case["kp_w"].as_f64().expect("kp_w") as f32,
            background: Some(case["bg_thresh"].as_f64().expect("bg") as f32),
            keep_scores: true,
        };
        let seg = engine
            .segment_batch(&[&image], &text, &settings)
            .expect("segment")
            .remove(0);
        let (shape, expected) = read_npy_f32(&root.join(case["scores"].as_str().expect("scores")));
        assert_eq!(shape, [seg.classes, seg.height, seg.width]);
        let scores = seg.scores.as_ref().expect("scores kept");
        let max_diff = scores
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let labels = image::open(root.join(case["labels"].as_str().expect("labels")))
            .expect("labels")
            .to_luma8();
        let equal = seg
            .labels
            .iter()
            .zip(labels.as_raw())
            .filter(|(a, b)| **a == u16::from(**b))
            .count();
        let agreement = equal as f64 / seg.labels.len() as f64;
        report.push(format!(
            "{} pamr={}: max |Δscore| {max_diff:.2e}, labels {:.4} % equal",
            case["image"],
            settings.pamr,
            100.0 * agreement
        ));
        assert!(max_diff <= 1e-4, "{}", report.join("\n"));
        assert!(agreement >= 0.999, "{}", report.join("\n"));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn crops_batched_across_images_give_the_same_result() {
    let root = fixtures();
    let bundle = Bundle::open(&root.join("bundles/tiny-random")).expect("bundle");
    let options = |crop_batch| EngineOptions {
        device: DeviceChoice::Cpu,
        precision: Precision::Fp32,
        threads: 1,
        crop_batch,
        spin: true,
    };
    let one = Engine::new(bundle.clone(), options(1)).expect("engine");
    let many = Engine::new(bundle, options(8)).expect("engine");
    let a = image::open(root.join("images/small.png"))
        .expect("img")
        .to_rgb8();
    let b = image::open(root.join("images/wide.png"))
        .expect("img")
        .to_rgb8();
    let queries = [Query::named("red square"), Query::named("blue circle")];
    let settings = one.default_settings();
    let t1 = one.embed_queries(&queries).expect("text");
    let t2 = many.embed_queries(&queries).expect("text");
    let separate = [
        one.segment_batch(&[&a], &t1, &settings)
            .expect("a")
            .remove(0),
        one.segment_batch(&[&b], &t1, &settings)
            .expect("b")
            .remove(0),
    ];
    let together = many.segment_batch(&[&a, &b], &t2, &settings).expect("a+b");
    for (x, y) in separate.iter().zip(&together) {
        assert_eq!((x.width, x.height), (y.width, y.height));
        let max = x
            .best
            .iter()
            .zip(&y.best)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(max <= 1e-5, "batching changed scores by {max}");
    }
}
