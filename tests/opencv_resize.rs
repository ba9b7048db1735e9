//! The Rust port of the official test pipeline's image preprocessing against OpenCV itself: uint8 images and
//! what `cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)` made of them, and mmcv's normalization of every
//! grey level, written by opencv-python-headless (`python -m tclseg_trainer.tools.fixtures`, tests/fixtures/opencv).
//! Bit for bit: the official pipeline rounds to whole grey levels before the model sees the image, so a resize
//! that is merely close moves the model's input by up to a grey level on most pixels.

use std::path::{Path, PathBuf};

use tclseg::model::preprocess::{pixel_statistics, prepare, rescale_size};
use tclseg::model::resample::resize_u8_bilinear;
use tclseg::model::Bundle;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn manifest() -> serde_json::Value {
    let path = fixtures().join("opencv/opencv.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("opencv.json")).expect("json")
}

fn rgb(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

#[test]
fn resize_equals_opencv_inter_linear() {
    let root = fixtures().join("opencv");
    let manifest = manifest();
    let cases = manifest["cases"].as_array().expect("cases");
    assert!(cases.len() >= 16, "the fixture lost its cases");
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let input = rgb(&root.join(case["input"].as_str().expect("input")));
        let expected = rgb(&root.join(case["output"].as_str().expect("output")));
        let size = (
            case["height"].as_u64().expect("height") as usize,
            case["width"].as_u64().expect("width") as usize,
        );
        assert_eq!(
            (expected.height() as usize, expected.width() as usize),
            size
        );
        let got = resize_u8_bilinear(
            input.as_raw(),
            3,
            (input.height() as usize, input.width() as usize),
            size,
        );
        let differing: Vec<i32> = got
            .iter()
            .zip(expected.as_raw())
            .map(|(a, b)| i32::from(*a) - i32::from(*b))
            .filter(|d| *d != 0)
            .collect();
        if !differing.is_empty() {
            let worst = differing.iter().map(|d| d.abs()).max().unwrap_or(0);
            failures.push(format!(
                "{name}: {}x{} -> {}x{}: {} of {} values differ, by up to {worst}",
                input.width(),
                input.height(),
                size.1,
                size.0,
                differing.len(),
                got.len()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "against OpenCV {}:\n{}",
        manifest["opencv"],
        failures.join("\n")
    );
}

/// The whole host preprocessing of a golden picture: OpenCV's resize at mmcv's size, then mmcv's normalization,
/// equal to the float32 values the official pipeline hands the model.
#[test]
fn prepare_equals_the_official_pipeline() {
    let root = fixtures();
    let bundle = Bundle::open(&root.join("bundles/tiny-random")).expect("bundle");
    let input = &bundle.manifest().input;
    let manifest = manifest();
    let normalized: Vec<Vec<f32>> = manifest["normalized"]
        .as_array()
        .expect("normalized")
        .iter()
        .map(|c| {
            c.as_array()
                .expect("channel")
                .iter()
                .map(|v| v.as_f64().expect("value") as f32)
                .collect()
        })
        .collect();
    assert_eq!(normalized.iter().map(Vec::len).sum::<usize>(), 3 * 256);

    // mmseg's Normalize holds the configs' mean and std as float32; so must the bundle's 0..1 statistics.
    let (mean, std) = pixel_statistics(input);
    assert_eq!(mean, [123.675f32, 116.28, 103.53]);
    assert_eq!(std, [58.395f32, 57.12, 57.375]);

    for case in manifest["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let Some(picture) = name.strip_prefix("rescale_") else {
            continue;
        };
        let original = rgb(&root.join(format!("images/{picture}.png")));
        let resized = rgb(&root
            .join("opencv")
            .join(case["output"].as_str().expect("output")));
        let (h, w) = (original.height() as usize, original.width() as usize);
        let size = rescale_size(h, w, input.short_side, input.long_side_max);
        assert_eq!(
            size,
            (resized.height() as usize, resized.width() as usize),
            "{picture}: mmcv's size"
        );
        let prepared = prepare(&original, input);
        assert_eq!((prepared.height, prepared.width), size);
        let plane = size.0 * size.1;
        for (i, px) in resized.pixels().enumerate() {
            for c in 0..3 {
                let want = normalized[c][usize::from(px[c])];
                let got = prepared.data[c * plane + i];
                assert!(
                    got.to_bits() == want.to_bits(),
                    "{picture}: pixel {i} channel {c}: {got} != official {want}"
                );
            }
        }
    }
}
