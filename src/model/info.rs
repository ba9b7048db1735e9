//! What identifies the model an engine runs, as outputs record it (each sidecar's `model`): the engine says it,
//! so writers need not reach into the engine's bundle, device and precision themselves.

use serde::Serialize;

use super::Engine;
use super::SegmentSettings;

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    /// sha256 of the bundle's model.toml, which pins every graph's hash.
    pub manifest_sha256: String,
    /// The bundle head that scored the classes (`tcl`, `naclip`, ...): two pipelines on one bundle may differ
    /// only in it, so a result names it beside the bundle's hash.
    pub head: String,
    pub device: String,
    pub precision: String,
}

impl Engine {
    /// Name, version, manifest hash, head (the one `settings` select), device and precision of the model this
    /// engine runs.
    pub fn model_info(&self, settings: &SegmentSettings) -> ModelInfo {
        let manifest = self.bundle().manifest();
        ModelInfo {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            manifest_sha256: self.manifest_sha256().to_string(),
            head: self.head_name(settings),
            device: format!("{:?}", self.device()).to_lowercase(),
            precision: self.precision().key().to_string(),
        }
    }
}
