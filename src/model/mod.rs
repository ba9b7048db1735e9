//! The model side of tclseg: bundles, ONNX Runtime, and (next) the inference engine.

pub mod bundle;
pub mod runtime;
pub mod smoke;

pub use bundle::{Bundle, BundleError, Manifest, Precision};
pub use runtime::{Device, Runtime};
