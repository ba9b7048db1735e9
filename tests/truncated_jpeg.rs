//! A JPEG cut to its first third is an error in `segment` (the JPEG decoder would pad it with grey and carry
//! on), named in the message and the report, while the whole image beside it is segmented.

mod common;

use common::staged::noisy_image_bytes;
use common::{files_with_suffix, segment, stderr};

#[test]
fn segment_refuses_a_truncated_jpeg_by_name() {
    let tmp = tempfile::tempdir().expect("tmp");
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).expect("mkdir");
    let jpeg = noisy_image_bytes(96, 64, image::ImageFormat::Jpeg);
    std::fs::write(input.join("whole.jpg"), &jpeg).expect("write");
    std::fs::write(input.join("cut.jpg"), &jpeg[..jpeg.len() / 3]).expect("write");
    let out = tmp.path().join("out");
    let run = segment(&[&input], &out, &["red square"], &[]);
    let err = stderr(&run);
    assert_eq!(
        run.status.code(),
        Some(1),
        "a failure makes the exit status 1:\n{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("cut.jpg") && l.contains("truncated")),
        "{err}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("segment-report.json")).expect("report"))
            .expect("json");
    assert_eq!(report["failed"], 1, "{report}");
    let labels = files_with_suffix(&out, ".labels.png");
    assert_eq!(labels.len(), 1, "{labels:?}");
    assert!(labels[0].to_string_lossy().contains("whole"), "{labels:?}");
}
