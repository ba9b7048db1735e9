//! The model side of tclseg: bundles, ONNX Runtime, the tokenizer, pre/post-processing and the engine.

pub mod bundle;
pub mod cpu;
pub mod cuda;
pub mod default;
pub mod device_path;
pub mod engine;
mod host_path;
pub mod info;
pub mod pamr;
pub mod preprocess;
pub mod resample;
pub mod runtime;
pub mod tokenizer;
pub mod types;
pub mod verify;

pub use bundle::{Bundle, BundleError, Manifest, Precision};
pub use cpu::{CpuFeatures, PrecisionChoice};
pub use default::resolve_bundle_dir;
pub use engine::{Engine, ImageGroup, SharedRun};
pub use runtime::{Device, Graph, Runtime, SessionSpec};
pub use types::{
    DeviceChoice, EngineOptions, Processing, Query, SegmentSettings, Segmentation,
    SettingsOverrides, TextEmbeddings,
};
