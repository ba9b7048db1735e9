//! The engine's vocabulary, shared by the engine and both of its paths (host and device): how to open an engine
//! (`EngineOptions` and its enums), what to segment with (`Query`, `TextEmbeddings`, `SegmentSettings`) and what
//! comes back (`Segmentation`). Kept apart from `engine.rs` so that `host_path.rs` and `device_path.rs` import these
//! and not the engine that calls them.

use std::sync::{Mutex, MutexGuard};

use anyhow::{anyhow, Result};
use ort::session::Session;

use super::bundle::{HeadId, HeadKind, Manifest, MaskSpec, Precision};

/// Which execution device to use: one type for the daemon's `model.device`, the `--device` flag and the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when it works, else the CPU, with the reason logged.
    #[default]
    Auto,
    Cpu,
    /// CUDA or refuse to start.
    Cuda,
    /// TensorRT for the image graphs (engines built on first use and cached), CUDA for the rest, or refuse to
    /// start.
    #[value(name = "tensorrt")]
    TensorRt,
}

/// Where pre- and postprocessing run: `model.processing` and `--processing`, and (`Host` or `Device`, never
/// `Auto`) what `Engine::processing` says an engine does. Written out by its serde name, as it is read.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Deserialize,
    serde::Serialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Processing {
    /// The device path on a GPU, the host path on the CPU.
    #[default]
    Auto,
    /// Native Rust on the host: resize, windows, upsampling, averaging, argmax (and native PAMR).
    Host,
    /// As graphs beside the model, tensors kept on the device (see `device_path`); on the CPU, for tests.
    Device,
}

impl Processing {
    /// The name `model.processing` and `--processing` take.
    pub fn key(self) -> &'static str {
        match self {
            Processing::Auto => "auto",
            Processing::Host => "host",
            Processing::Device => "device",
        }
    }
}

impl std::fmt::Display for Processing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
    }
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub device: DeviceChoice,
    pub precision: Precision,
    /// Intra-op threads per session (0: ONNX Runtime's default).
    pub threads: usize,
    /// Crops per trunk/head run (crops are batched across images); 0 picks per device: 1 on the CPU (compute
    /// bound: measured no faster batched, and each extra crop costs ~120 MB of activations), 8 on CUDA.
    pub crop_batch: usize,
    /// Idle ONNX Runtime threads busy-wait for work (see `SessionSpec::spin`).
    pub spin: bool,
    pub processing: Processing,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: DeviceChoice::Cpu,
            precision: Precision::Fp32,
            threads: 0,
            crop_batch: 0,
            spin: true,
            processing: Processing::Auto,
        }
    }
}

/// One text query: a name, and the prompts to embed (empty: the bundle's templates around the name).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Query {
    pub name: String,
    pub prompts: Vec<String>,
}

impl Query {
    pub fn named(name: impl Into<String>) -> Query {
        Query {
            name: name.into(),
            prompts: Vec::new(),
        }
    }
}

/// Normalized text embeddings, one row per query, [N, E].
#[derive(Debug, Clone)]
pub struct TextEmbeddings {
    pub rows: usize,
    pub dim: usize,
    pub data: Vec<f32>,
    /// Per row, the bundle's calibrated threshold for that query (`MaskSpec::query_thresholds`), if any.
    pub thresholds: Vec<Option<f32>>,
}

/// Per-call settings.
#[derive(Debug, Clone, Copy)]
pub struct SegmentSettings {
    pub pamr: bool,
    pub kp_weight: f32,
    /// A constant background score prepended as class 0; None: no background class.
    pub background: Option<f32>,
    /// Keep the per-class soft scores at the original size (memory: classes × H × W floats).
    pub keep_scores: bool,
    /// The head that scores the classes (None: the bundle's default head). See `Manifest::find_head`.
    pub head: Option<HeadId>,
    /// Apply the bundle's per-query thresholds (`MaskSpec::query_thresholds`, carried by
    /// `TextEmbeddings::thresholds`) on top of `background`: only where they were calibrated, i.e. the TCL head
    /// with PAMR and the bundle's own background threshold.
    pub query_thresholds: bool,
}

/// What a command line or a pipeline's config sets of `SegmentSettings`; None takes the bundle's default.
#[derive(Debug, Clone, Copy, Default)]
pub struct SettingsOverrides {
    pub pamr: Option<bool>,
    pub bg_thresh: Option<f32>,
    pub kp_weight: Option<f32>,
}

impl SegmentSettings {
    /// The one rule for settings against a bundle: PAMR on unless turned off; the background threshold given,
    /// else the bundle's for PAMR on or off; no threshold class when the queries bring background prompts
    /// (their label 0 is the background); the bundle's kp weight unless given; the bundle's per-query
    /// thresholds only with PAMR on, the bundle's background threshold and no background prompts (the setting
    /// they were calibrated in). Scores are not kept.
    pub fn resolve(
        mask: &MaskSpec,
        overrides: SettingsOverrides,
        background_prompts: bool,
    ) -> SegmentSettings {
        let pamr = overrides.pamr.unwrap_or(true);
        let background = (!background_prompts).then(|| {
            overrides.bg_thresh.unwrap_or(if pamr {
                mask.bg_thresh_pamr
            } else {
                mask.bg_thresh
            })
        });
        SegmentSettings {
            pamr,
            kp_weight: overrides.kp_weight.unwrap_or(mask.kp_weight),
            background,
            keep_scores: false,
            head: None,
            query_thresholds: pamr && overrides.bg_thresh.is_none() && !background_prompts,
        }
    }

    /// `resolve` for a named head (None: the bundle's default). TCL's head takes [mask]'s defaults as above; a
    /// training-free head takes its own from [heads.<name>]: PAMR as its method evaluates, background below its
    /// probability threshold (0: none wins), no kp blend. An unknown head is an error naming the bundle's heads.
    pub fn resolve_head(
        manifest: &Manifest,
        head: Option<&str>,
        overrides: SettingsOverrides,
        background_prompts: bool,
    ) -> Result<SegmentSettings, String> {
        let id = manifest.find_head(head)?;
        let (_, spec) = manifest
            .head(id)
            .ok_or_else(|| format!("head {} of '{}' is missing", id.0, manifest.name))?;
        let settings = match spec.kind {
            HeadKind::Tcl => {
                SegmentSettings::resolve(&manifest.mask, overrides, background_prompts)
            }
            HeadKind::Dense => SegmentSettings {
                pamr: overrides.pamr.unwrap_or(spec.pamr),
                kp_weight: 0.0,
                background: (!background_prompts)
                    .then(|| overrides.bg_thresh.unwrap_or(spec.prob_thresh)),
                keep_scores: false,
                head: None,
                query_thresholds: false,
            },
        };
        Ok(SegmentSettings {
            head: Some(id),
            ..settings
        })
    }
}

/// The result for one image.
#[derive(Debug, Clone)]
pub struct Segmentation {
    pub width: usize,
    pub height: usize,
    /// Number of classes, background included when it was asked for.
    pub classes: usize,
    /// Row-major class index per pixel.
    pub labels: Vec<u16>,
    /// The winning class's score per pixel.
    pub best: Vec<f32>,
    /// [classes, H, W] when `keep_scores`.
    pub scores: Option<Vec<f32>>,
    /// Per query, the bundle's per-word threshold that was applied to these labels (empty: none were).
    pub query_thresholds: Vec<Option<f32>>,
}

impl Segmentation {
    /// Pixels whose winning query scores under that query's threshold become background (class 0, the constant
    /// `background` score), for labels that have a background class in front. The soft scores are left as the
    /// model gave them.
    pub fn apply_query_thresholds(&mut self, thresholds: &[Option<f32>], background: f32) {
        if thresholds.iter().all(Option::is_none) {
            return;
        }
        self.query_thresholds = thresholds.to_vec();
        for (label, best) in self.labels.iter_mut().zip(self.best.iter_mut()) {
            let threshold = match (*label as usize).checked_sub(1) {
                Some(q) => thresholds.get(q).copied().flatten(),
                None => None,
            };
            if threshold.is_some_and(|t| *best < t) {
                *label = 0;
                *best = background;
            }
        }
    }
}

/// The model's image graphs as sessions, run by both paths (the text encoder is opened per query set). The
/// engine owns them behind a mutex: one run at a time per graph.
pub(crate) struct ModelGraphs {
    pub trunk: Session,
    /// TCL's head and mask head (None in a bundle of training-free heads only).
    pub tcl: Option<TclGraphs>,
    /// The training-free heads' graphs opened so far, by head (each opened on its first use).
    pub dense: std::collections::BTreeMap<HeadId, Session>,
}

pub(crate) struct TclGraphs {
    pub head: Session,
    pub mask_head: Session,
}

/// Locks one of the engine's mutexes; a poisoned one means a run panicked half-way and left its sessions in an
/// unknown state, so the engine is refused from then on.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    mutex
        .lock()
        .map_err(|_| anyhow!("an earlier inference panicked; the engine must be recreated"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processing_is_written_by_the_name_it_is_read_by() {
        for p in [Processing::Auto, Processing::Host, Processing::Device] {
            let written = serde_json::to_value(p).expect("serialises");
            assert_eq!(written, serde_json::json!(p.to_string()));
            let read: Processing = serde_json::from_value(written).expect("reads back");
            assert_eq!(read, p);
            let parsed = <Processing as clap::ValueEnum>::from_str(p.key(), false);
            assert_eq!(parsed, Ok(p));
        }
    }

    fn mask() -> MaskSpec {
        MaskSpec {
            w: 1.0,
            b: 0.0,
            kp_weight: 0.3,
            kp_shift: 0.0,
            kp_scale: 1.0,
            bg_thresh_pamr: 0.4,
            bg_thresh: 0.5,
            pamr_iterations: 10,
            pamr_dilations: vec![1, 2],
            query_thresholds: Default::default(),
        }
    }

    #[test]
    fn settings_take_the_bundle_defaults_unless_overridden() {
        let d = SegmentSettings::resolve(&mask(), SettingsOverrides::default(), false);
        assert_eq!((d.pamr, d.kp_weight, d.background), (true, 0.3, Some(0.4)));
        let no_pamr = SettingsOverrides {
            pamr: Some(false),
            ..Default::default()
        };
        let s = SegmentSettings::resolve(&mask(), no_pamr, false);
        assert_eq!((s.pamr, s.background), (false, Some(0.5)));
        let given = SettingsOverrides {
            pamr: None,
            bg_thresh: Some(0.7),
            kp_weight: Some(0.1),
        };
        let s = SegmentSettings::resolve(&mask(), given, false);
        assert_eq!((s.kp_weight, s.background), (0.1, Some(0.7)));
        // Background prompts bring their own background: no threshold class.
        let s = SegmentSettings::resolve(&mask(), given, true);
        assert_eq!(s.background, None);
        assert!(!s.keep_scores);
    }

    #[test]
    fn per_query_thresholds_hold_only_where_they_were_calibrated() {
        let on = |o: SettingsOverrides, prompts: bool| {
            SegmentSettings::resolve(&mask(), o, prompts).query_thresholds
        };
        assert!(on(SettingsOverrides::default(), false));
        let no_pamr = SettingsOverrides {
            pamr: Some(false),
            ..Default::default()
        };
        assert!(!on(no_pamr, false), "calibrated with PAMR");
        let own_threshold = SettingsOverrides {
            bg_thresh: Some(0.6),
            ..Default::default()
        };
        assert!(
            !on(own_threshold, false),
            "--bg-thresh sets one threshold for all"
        );
        assert!(
            !on(SettingsOverrides::default(), true),
            "background prompts"
        );
    }

    #[test]
    fn a_query_under_its_threshold_becomes_background() {
        // Background class 0 (constant 0.4), queries 1 and 2; query 1 is calibrated to 0.6.
        let mut seg = Segmentation {
            width: 4,
            height: 1,
            classes: 3,
            labels: vec![1, 1, 2, 0],
            best: vec![0.55, 0.65, 0.45, 0.4],
            scores: None,
            query_thresholds: Vec::new(),
        };
        seg.apply_query_thresholds(&[Some(0.6), None], 0.4);
        assert_eq!(seg.labels, vec![0, 1, 2, 0]);
        assert_eq!(seg.best, vec![0.4, 0.65, 0.45, 0.4]);
        assert_eq!(seg.query_thresholds, vec![Some(0.6), None]);
    }
}
