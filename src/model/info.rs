//! What identifies the model an engine runs, as outputs record it (each sidecar's `model`): the engine says it,
//! so writers need not reach into the engine's bundle, device and precision themselves.

use serde::Serialize;

use super::Engine;

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    /// sha256 of the bundle's model.toml, which pins every graph's hash.
    pub manifest_sha256: String,
    pub device: String,
    pub precision: String,
}

impl Engine {
    /// Name, version, manifest hash, device and precision of the model this engine runs.
    pub fn model_info(&self) -> ModelInfo {
        let manifest = self.bundle().manifest();
        ModelInfo {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            manifest_sha256: self.manifest_sha256().to_string(),
            device: format!("{:?}", self.device()).to_lowercase(),
            precision: self.precision().key().to_string(),
        }
    }
}
