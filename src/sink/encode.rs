//! One segmented image's outputs encoded in memory: the label PNG, overlay, score maps and JSON sidecar, in the
//! order `files::OutputWriter::write_unit` commits them (sidecar last).
//!
//! `encode_image` is the one place an image's outputs are encoded: `segment`, `serve` and `models bench` call it
//! (directly, or through `OutputWriter::write_image`) with their own paths and threads, so a new output or
//! sidecar field is added once. It lives apart from `files` because encoding is pure (bytes in memory) while
//! `files` is the crash-safe writing and the collision guard.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use image::RgbImage;

use super::label_png::{self, Style};
use super::overlay::{self, OverlayFormat};
use super::sidecar::{self, FrameInfo, ModelInfo, SettingsInfo, Sidecar, Timings};
use crate::model::{SegmentSettings, Segmentation};
use crate::queries::QuerySet;

/// Overlay tint: half class colour, half image.
pub const OVERLAY_ALPHA: f32 = 0.5;

/// Which files to write per image.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutputKinds {
    pub labels: bool,
    pub overlay: Option<OverlayFormat>,
    pub json: bool,
    /// One 16-bit PNG of soft scores per query (score × 65535).
    pub scores: bool,
}

/// Where one image's outputs go: `<base>.<suffix>` per kind.
#[derive(Debug, Clone)]
pub struct ImagePaths {
    pub base: PathBuf,
    /// The label map's suffix: `labels.png` (segment, serve), `png` (`models bench --save-labels`).
    pub labels_suffix: &'static str,
}

impl ImagePaths {
    /// `<base>.labels.png`, `<base>.overlay.jpg`, `<base>.score1.png`, `<base>.json`.
    pub fn new(base: PathBuf) -> ImagePaths {
        ImagePaths {
            base,
            labels_suffix: "labels.png",
        }
    }

    pub fn with_suffix(&self, suffix: &str) -> PathBuf {
        let mut name = self.base.as_os_str().to_os_string();
        name.push(".");
        name.push(suffix);
        PathBuf::from(name)
    }

    /// Every file `kinds` writes for an image segmented with `queries` queries, the sidecar (the unit's commit
    /// marker) last.
    pub fn all(&self, kinds: &OutputKinds, queries: usize) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        if kinds.labels {
            paths.push(self.with_suffix(self.labels_suffix));
        }
        if let Some(fmt) = kinds.overlay {
            paths.push(self.with_suffix(&format!("overlay.{}", fmt.extension())));
        }
        if kinds.scores {
            for q in 0..queries {
                paths.push(self.with_suffix(&format!("score{}.png", q + 1)));
            }
        }
        if kinds.json {
            paths.push(self.with_suffix("json"));
        }
        paths
    }
}

/// One segmented image and what it was segmented with.
pub struct SegmentedImage<'a> {
    pub image: &'a RgbImage,
    pub segmentation: &'a Segmentation,
    pub queries: &'a QuerySet,
    pub settings: &'a SegmentSettings,
}

/// What the sidecar says beyond the segmentation.
pub struct SidecarInfo {
    /// The input's path, or the stream's redacted URI.
    pub image: String,
    /// Daemon frames; `latency_ms` is filled in from `captured` when the sidecar is built.
    pub frame: Option<FrameInfo>,
    pub captured: Option<Instant>,
    pub model: ModelInfo,
    pub decode_ms: f64,
    pub inference_ms: f64,
}

/// Products the caller wants back even when no file of that kind is written.
#[derive(Debug, Clone, Copy, Default)]
pub struct Keep {
    /// The rendered overlay (the daemon's video).
    pub overlay: bool,
    /// The sidecar (the daemon's JSON lines, and its class results for events).
    pub sidecar: bool,
    /// The output label map (events with zones measure it).
    pub labels: bool,
}

/// One image's outputs, encoded: the unit's files, and the overlay, sidecar and label map when written or kept.
pub struct Encoded {
    pub files: Vec<OutputFile>,
    pub overlay: Option<RgbImage>,
    pub sidecar: Option<Sidecar>,
    /// The output labels (row-major), when `Keep::labels` asked for them.
    pub labels: Option<Vec<u16>>,
}

/// One file of a unit.
pub struct OutputFile {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

/// Encodes the outputs `kinds` asks for of one segmented image: label map, overlay, score maps and sidecar, in
/// unit order (sidecar last, for `OutputWriter::write_unit`), plus what `keep` asks for.
pub fn encode_image(
    paths: &ImagePaths,
    item: &SegmentedImage,
    kinds: &OutputKinds,
    keep: Keep,
    info: SidecarInfo,
) -> Result<Encoded> {
    let start = Instant::now();
    let seg = item.segmentation;
    let (w, h) = (seg.width, seg.height);
    let background = item.settings.background.is_some();
    let labels = item.queries.output_labels(seg, background);
    let palette = &item.queries.palette;
    let mut unit = Vec::new();
    if kinds.labels {
        unit.push(OutputFile {
            path: paths.with_suffix(paths.labels_suffix),
            bytes: label_png::encode(&labels, w, h, Style::Palette(palette))?,
        });
    }
    let overlay = (kinds.overlay.is_some() || keep.overlay)
        .then(|| overlay::render(item.image, &labels, palette, OVERLAY_ALPHA));
    if let (Some(fmt), Some(img)) = (kinds.overlay, &overlay) {
        unit.push(OutputFile {
            path: paths.with_suffix(&format!("overlay.{}", fmt.extension())),
            bytes: overlay::encode(img, fmt)?,
        });
    }
    if let (true, Some(scores)) = (kinds.scores, &seg.scores) {
        let offset = usize::from(background);
        for q in 0..item.queries.specs.len() {
            let plane = &scores[(q + offset) * w * h..(q + offset + 1) * w * h];
            unit.push(OutputFile {
                path: paths.with_suffix(&format!("score{}.png", q + 1)),
                bytes: label_png::encode_scores(plane, w, h)?,
            });
        }
    }
    let sidecar = (kinds.json || keep.sidecar).then(|| {
        let mut frame = info.frame;
        if let (Some(f), Some(captured)) = (frame.as_mut(), info.captured) {
            f.latency_ms = captured.elapsed().as_secs_f64() * 1e3;
        }
        Sidecar {
            image: info.image,
            frame,
            width: w,
            height: h,
            model: info.model,
            settings: SettingsInfo {
                pamr: item.settings.pamr,
                kp_weight: item.settings.kp_weight,
                background: item.settings.background,
                query_thresholds: item
                    .queries
                    .specs
                    .iter()
                    .zip(&seg.query_thresholds)
                    .filter_map(|(spec, t)| t.map(|t| (spec.name.trim().to_string(), t)))
                    .collect(),
            },
            classes: sidecar::class_results(item.queries, &labels, &seg.best, w, h),
            timings_ms: Timings {
                decode: info.decode_ms,
                inference: info.inference_ms,
                write: start.elapsed().as_secs_f64() * 1e3,
            },
        }
    });
    if let (true, Some(sidecar)) = (kinds.json, &sidecar) {
        unit.push(OutputFile {
            path: paths.with_suffix("json"),
            bytes: serde_json::to_vec_pretty(sidecar)?,
        });
    }
    Ok(Encoded {
        files: unit,
        overlay,
        sidecar,
        labels: keep.labels.then_some(labels),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_encodes_every_kind_asked_for_with_the_sidecar_last() {
        let queries = QuerySet::from_names(&["a".to_string(), "b".to_string()]).expect("queries");
        let segmentation = Segmentation {
            width: 2,
            height: 1,
            classes: 3,
            labels: vec![0, 2],
            best: vec![0.9, 0.8],
            scores: Some(vec![0.9, 0.1, 0.05, 0.1, 0.05, 0.8]),
            query_thresholds: Vec::new(),
        };
        let settings = SegmentSettings {
            pamr: false,
            kp_weight: 0.3,
            background: Some(0.5),
            keep_scores: true,
            head: None,
            query_thresholds: false,
        };
        let image = RgbImage::new(2, 1);
        let item = SegmentedImage {
            image: &image,
            segmentation: &segmentation,
            queries: &queries,
            settings: &settings,
        };
        let kinds = OutputKinds {
            labels: true,
            overlay: Some(OverlayFormat::Png),
            json: true,
            scores: true,
        };
        let info = SidecarInfo {
            image: "x.png".into(),
            frame: None,
            captured: None,
            model: ModelInfo {
                name: "m".into(),
                version: "1".into(),
                manifest_sha256: String::new(),
                head: "tcl".into(),
                device: "cpu".into(),
                precision: "fp32".into(),
            },
            decode_ms: 0.0,
            inference_ms: 0.0,
        };
        let paths = ImagePaths::new(PathBuf::from("out/x"));
        let encoded = encode_image(&paths, &item, &kinds, Keep::default(), info).expect("encode");
        let names: Vec<PathBuf> = encoded.files.iter().map(|f| f.path.clone()).collect();
        assert_eq!(names, paths.all(&kinds, queries.specs.len()));
        assert_eq!(
            names.last().map(|p| p.display().to_string()),
            Some("out/x.json".to_string())
        );
        assert!(encoded.overlay.is_some() && encoded.sidecar.is_some());
    }
}
