//! The model bundle: a directory with `model.toml` and the files it lists (ONNX graphs, the BPE vocabulary).
//!
//! The manifest is the contract between the Python exporter (`trainer/tclseg_trainer/export.py`) and the Rust
//! runtime; ARCHITECTURE.md documents it. Opening a bundle checks the manifest's shape and every file's size and
//! sha256, so a truncated copy or a swapped graph is refused before ONNX Runtime ever sees it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The only manifest format this build reads.
pub const FORMAT: &str = "tclseg-bundle";
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "model.toml";

/// Graph roles every bundle must provide, in the order they run.
pub const REQUIRED_GRAPHS: [&str; 3] = ["text_encoder", "image_trunk", "pamr"];
/// The graphs of the TCL head: in every bundle without a `[heads]` table, and in any whose `[heads]` has a
/// `kind = "tcl"` head.
pub const TCL_GRAPHS: [&str; 2] = ["tcl_head", "mask_head"];
/// The head of a bundle without a `[heads]` table.
pub const TCL_HEAD: &str = "tcl";

/// Why a bundle can't be used. Each variant names the bundle directory and, where it applies, the file.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("model bundle {dir}: not a directory (give the folder that holds model.toml)")]
    NotADirectory { dir: PathBuf },
    #[error("model bundle {dir}: cannot read {file}: {error}")]
    Io {
        dir: PathBuf,
        file: String,
        error: std::io::Error,
    },
    #[error("model bundle {dir}: model.toml is malformed: {message}")]
    Manifest { dir: PathBuf, message: String },
    #[error(
        "model bundle {dir}: {file} is listed in model.toml but missing; re-export the bundle \
         (tclseg models export) or copy it again"
    )]
    MissingFile { dir: PathBuf, file: String },
    #[error(
        "model bundle {dir}: {file} has {found} bytes, model.toml says {expected}; the copy is truncated \
         or the file was replaced"
    )]
    SizeMismatch {
        dir: PathBuf,
        file: String,
        expected: u64,
        found: u64,
    },
    #[error(
        "model bundle {dir}: {file} has sha256 {found}, model.toml says {expected}; the file is corrupted \
         or was replaced"
    )]
    HashMismatch {
        dir: PathBuf,
        file: String,
        expected: String,
        found: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    pub architecture: Architecture,
    pub input: InputSpec,
    pub mask: MaskSpec,
    pub text: TextSpec,
    #[serde(default)]
    pub provenance: BTreeMap<String, toml::Value>,
    /// role → precision → file name.
    pub graphs: BTreeMap<String, BTreeMap<String, String>>,
    pub files: Vec<FileEntry>,
    /// The heads on the shared trunk by name (absent: TCL's head alone, as before heads existed).
    #[serde(default)]
    pub heads: BTreeMap<String, HeadSpec>,
    /// The head used when none is asked for (absent: "tcl" if the bundle has it, else the first by name).
    #[serde(default)]
    pub default_head: Option<String>,
    /// The training-free methods' own evaluation protocols by name (`--protocol`), written by the exporter from
    /// `trainer/tclseg_trainer/head_protocols.py` (absent: the bundle's own settings only, protocol "tcl").
    #[serde(default)]
    pub protocols: BTreeMap<String, ProtocolSpec>,
}

/// The protocol that is the bundle's own [input], [text] and [heads] settings: TCL's evaluation.
pub const TCL_PROTOCOL: &str = "tcl";

/// How a dense head's per-window scores become the image's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fusion {
    /// Softmax per window at the stride-4 side, probabilities averaged over windows (the bundle's own path).
    #[default]
    Probabilities,
    /// Cosine logits upsampled to the window, averaged over windows, resized to the image, then the softmax at
    /// the logit scale: the training-free methods' `forward_slide` + `postprocess_result`.
    Logits,
}

/// How a query's prompt embeddings are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptAverage {
    /// The mean of the raw embeddings, then normalised (TCL's recipe).
    #[default]
    Raw,
    /// The mean of the L2-normalised embeddings, then normalised (the training-free methods').
    Unit,
}

/// One `[protocols.<name>]` table: a method's own input, prompts and scoring, and the graphs that run it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolSpec {
    /// The head the protocol is the method of.
    pub head: String,
    /// [graphs] role of the trunk at the protocol's window and position-embedding rule.
    pub trunk: String,
    /// [graphs] role of the head's graph at the window's grid.
    pub graph: String,
    /// The position-embedding resize rule baked into `trunk` ("scale" or "size"), for the record.
    #[serde(default)]
    pub pos_resize: String,
    pub crop_size: usize,
    pub crop_stride: usize,
    pub short_side: usize,
    pub long_side_max: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub logit_scale: f32,
    pub prob_thresh: f32,
    /// The method's PAMR setting (not run under a protocol: see `Manifest::with_protocol`).
    #[serde(default)]
    pub pamr: bool,
    #[serde(default)]
    pub fusion: Fusion,
    #[serde(default)]
    pub prompt_average: PromptAverage,
    pub templates: Vec<String>,
    /// Per-dataset overrides of the method's configs (eval's dataset names).
    #[serde(default)]
    pub datasets: BTreeMap<String, ProtocolDataset>,
    /// Where each value comes from (repository@commit:path:line).
    #[serde(default)]
    pub sources: BTreeMap<String, String>,
}

/// A dataset's settings under a protocol.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolDataset {
    pub short_side: usize,
    pub logit_scale: f32,
    pub prob_thresh: f32,
    /// The method runs this dataset on the whole image in one pass; a bundle runs it at the protocol's window.
    #[serde(default)]
    pub whole_image: bool,
}

/// What kind of graph a head is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// TCL's grounder: `tcl_head` (dense + kp features) then `mask_head` (sigmoid masks), settings from [mask].
    Tcl,
    /// A training-free head (`trainer/tclseg_trainer/heads.py`): tokens -> L2-normalized dense features
    /// [B,E,G,G]; class probabilities are softmax(logit_scale · cos) over the queries.
    Dense,
}

/// One `[heads.<name>]` table: its graph role and, for a dense head, its method's own defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadSpec {
    pub kind: HeadKind,
    /// The [graphs] role of the head's graph ("tcl_head" for TCL).
    #[serde(default)]
    pub graph: String,
    /// Multiplies the cosines before the softmax over classes (dense heads).
    #[serde(default = "default_logit_scale")]
    pub logit_scale: f32,
    /// Whether PAMR refines the scores by default.
    #[serde(default)]
    pub pamr: bool,
    /// Background below this best-class probability (0: never), by default.
    #[serde(default)]
    pub prob_thresh: f32,
    /// How window scores are fused (set by a protocol; a bundle's own heads average probabilities).
    #[serde(default)]
    pub fusion: Fusion,
}

fn default_logit_scale() -> f32 {
    40.0
}

impl HeadSpec {
    fn tcl() -> HeadSpec {
        HeadSpec {
            kind: HeadKind::Tcl,
            graph: "tcl_head".to_string(),
            logit_scale: default_logit_scale(),
            pamr: true,
            prob_thresh: 0.0,
            fusion: Fusion::Probabilities,
        }
    }
}

/// A head of one bundle, by its position in `Manifest::head_names` (cheap to copy into per-call settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HeadId(pub usize);

#[derive(Debug, Clone, Deserialize)]
pub struct Architecture {
    pub kind: String,
    pub vision_width: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub patch_size: usize,
    pub train_image_size: usize,
    pub text_width: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    pub context_length: usize,
    pub vocab_size: usize,
    pub embed_dim: usize,
    pub mask_stride: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InputSpec {
    pub crop_size: usize,
    pub crop_stride: usize,
    pub short_side: usize,
    pub long_side_max: usize,
    pub pad_multiple: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl InputSpec {
    /// The official TCL test pipeline's input (448 crops at stride 224 after a 448 short-side rescale, ImageNet
    /// statistics), written once for the code that compares against it.
    pub fn official() -> InputSpec {
        InputSpec {
            crop_size: 448,
            crop_stride: 224,
            short_side: 448,
            long_side_max: 2048,
            pad_multiple: 16,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct MaskSpec {
    pub w: f32,
    pub b: f32,
    pub kp_weight: f32,
    pub kp_shift: f32,
    pub kp_scale: f32,
    pub bg_thresh_pamr: f32,
    pub bg_thresh: f32,
    pub pamr_iterations: usize,
    pub pamr_dilations: Vec<usize>,
    /// Background thresholds calibrated per query name on held-out images (TCL head, PAMR on): a query named
    /// here and prompted with the bundle's templates is background where its score is under this value, on top
    /// of `bg_thresh_pamr`. A model that knows a few words well (the built-in one) carries them; others leave
    /// the table out. An explicit `--bg-thresh`, PAMR off or background prompts turn them off.
    #[serde(default)]
    pub query_thresholds: BTreeMap<String, f32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextSpec {
    pub vocabulary: String,
    pub sot_token: i64,
    pub eot_token: i64,
    pub templates: Vec<String>,
    /// How a query's prompt embeddings are averaged (absent: TCL's raw mean; a protocol sets its method's).
    #[serde(default)]
    pub prompt_average: PromptAverage,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

/// Precision of the image graphs. fp16 graphs keep LayerNorm in fp32 and have fp32 inputs and outputs; int8
/// graphs quantize only the weight matrix products (per-channel int8 weights, activations quantized at run time)
/// and keep LayerNorm, softmax and GELU in fp32. `bf16` runs the fp32 graphs with ONNX Runtime's bf16 fast math,
/// which its CPU provider has on ARM64 only; `auto` is resolved when the engine opens (`model::cpu`). One type
/// for the daemon's `model.precision`, the `--precision` flag and the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Fp16,
    Int8,
    Bf16,
    Auto,
}

/// Graph precisions a manifest may list (`bf16` and `auto` are run modes, not graphs).
pub const GRAPH_PRECISIONS: [&str; 3] = ["fp32", "fp16", "int8"];

impl Precision {
    pub fn key(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
            Precision::Bf16 => "bf16",
            Precision::Auto => "auto",
        }
    }

    /// The manifest's key of the graphs this precision runs: bf16 fast math (and an unresolved auto) run the
    /// fp32 graphs.
    pub fn graph_key(self) -> &'static str {
        match self {
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
            Precision::Fp32 | Precision::Bf16 | Precision::Auto => "fp32",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
    }
}

/// A bundle whose manifest parsed and whose files all matched their hashes.
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
}

impl Bundle {
    /// Reads `dir/model.toml`, checks it, and checks every listed file's size and sha256.
    pub fn open(dir: &Path) -> Result<Bundle, BundleError> {
        let bundle = Bundle::open_unverified(dir)?;
        for entry in &bundle.manifest.files {
            bundle.verify_file(entry)?;
        }
        Ok(bundle)
    }

    /// Reads and checks the manifest only (no hashing): for listings, where reading gigabytes would be waste.
    pub fn open_unverified(dir: &Path) -> Result<Bundle, BundleError> {
        if !dir.is_dir() {
            return Err(BundleError::NotADirectory {
                dir: dir.to_path_buf(),
            });
        }
        let text =
            std::fs::read_to_string(dir.join(MANIFEST_FILE)).map_err(|error| BundleError::Io {
                dir: dir.to_path_buf(),
                file: MANIFEST_FILE.to_string(),
                error,
            })?;
        let manifest = Manifest::parse(&text).map_err(|message| BundleError::Manifest {
            dir: dir.to_path_buf(),
            message,
        })?;
        Ok(Bundle {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This bundle as `protocol` runs it (`Manifest::with_protocol`); "tcl" is the bundle as it is.
    pub fn with_protocol(self, protocol: &str, dataset: Option<&str>) -> Result<Bundle, String> {
        let manifest = self.manifest.with_protocol(protocol, dataset)?;
        Ok(Bundle {
            dir: self.dir,
            manifest,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The path of a graph, or None when the bundle has no such role/precision.
    pub fn graph(&self, role: &str, precision: Precision) -> Option<PathBuf> {
        self.manifest
            .graphs
            .get(role)
            .and_then(|by_precision| by_precision.get(precision.graph_key()))
            .map(|file| self.dir.join(file))
    }

    /// The graph for `role` at `precision`, falling back to fp32 for roles that only exist in fp32
    /// (text encoder, mask head, PAMR).
    pub fn graph_or_fp32(&self, role: &str, precision: Precision) -> Option<PathBuf> {
        self.graph(role, precision)
            .or_else(|| self.graph(role, Precision::Fp32))
    }

    pub fn vocabulary(&self) -> PathBuf {
        self.dir.join(&self.manifest.text.vocabulary)
    }

    /// Total size of the listed files.
    pub fn total_bytes(&self) -> u64 {
        self.manifest.files.iter().map(|f| f.bytes).sum()
    }

    fn verify_file(&self, entry: &FileEntry) -> Result<(), BundleError> {
        let path = self.dir.join(&entry.path);
        let io_err = |error| BundleError::Io {
            dir: self.dir.clone(),
            file: entry.path.clone(),
            error,
        };
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BundleError::MissingFile {
                    dir: self.dir.clone(),
                    file: entry.path.clone(),
                })
            }
            Err(e) => return Err(io_err(e)),
        };
        if meta.len() != entry.bytes {
            return Err(BundleError::SizeMismatch {
                dir: self.dir.clone(),
                file: entry.path.clone(),
                expected: entry.bytes,
                found: meta.len(),
            });
        }
        let found = sha256_file(&path).map_err(io_err)?;
        if !found.eq_ignore_ascii_case(&entry.sha256) {
            return Err(BundleError::HashMismatch {
                dir: self.dir.clone(),
                file: entry.path.clone(),
                expected: entry.sha256.clone(),
                found,
            });
        }
        Ok(())
    }
}

impl Manifest {
    /// Parses and checks a manifest. The error is one line that says what is wrong and where.
    pub fn parse(text: &str) -> Result<Manifest, String> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => format!(
                "line {}: {}",
                text[..span.start].lines().count().max(1),
                e.message()
            ),
            None => e.message().to_string(),
        })?;
        manifest.check()?;
        Ok(manifest)
    }

    fn check(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format is '{}', expected '{FORMAT}'", self.format));
        }
        if self.format_version != FORMAT_VERSION {
            return Err(format!(
                "format_version is {}, this tclseg reads {FORMAT_VERSION}; re-export the bundle with this version",
                self.format_version
            ));
        }
        let listed: BTreeMap<&str, &FileEntry> =
            self.files.iter().map(|f| (f.path.as_str(), f)).collect();
        if listed.len() != self.files.len() {
            return Err("[[files]] lists a path twice".to_string());
        }
        for entry in &self.files {
            if !is_plain_relative(&entry.path) {
                return Err(format!(
                    "[[files]] path '{}' must be a plain file name inside the bundle",
                    entry.path
                ));
            }
            if entry.sha256.len() != 64 || !entry.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "[[files]] '{}': sha256 must be 64 hex digits",
                    entry.path
                ));
            }
        }
        for (name, t) in &self.mask.query_thresholds {
            if !(t.is_finite() && *t > 0.0 && *t < 1.0) {
                return Err(format!(
                    "[mask.query_thresholds] '{name}' = {t}: a threshold must be in (0, 1)"
                ));
            }
        }
        let mut required: Vec<String> = REQUIRED_GRAPHS.iter().map(|r| r.to_string()).collect();
        for name in self.head_names() {
            let spec = self
                .head_spec(name)
                .ok_or_else(|| format!("no head '{name}'"))?;
            match spec.kind {
                HeadKind::Tcl => required.extend(TCL_GRAPHS.iter().map(|r| r.to_string())),
                HeadKind::Dense => {
                    if spec.graph.is_empty() {
                        return Err(format!("[heads.{name}] has no graph"));
                    }
                    if !(spec.logit_scale.is_finite() && spec.logit_scale > 0.0) {
                        return Err(format!("[heads.{name}] logit_scale must be positive"));
                    }
                    if !(0.0..1.0).contains(&spec.prob_thresh) {
                        return Err(format!("[heads.{name}] prob_thresh must be in [0, 1)"));
                    }
                    required.push(spec.graph.clone());
                }
            }
        }
        for (name, p) in &self.protocols {
            if !self.heads.contains_key(&p.head) {
                return Err(format!(
                    "[protocols.{name}] runs head '{}', which [heads] lacks",
                    p.head
                ));
            }
            for role in [&p.trunk, &p.graph] {
                if !self
                    .graphs
                    .get(role)
                    .is_some_and(|g| g.contains_key("fp32"))
                {
                    return Err(format!(
                        "[protocols.{name}] needs the fp32 '{role}' graph, which [graphs] lacks"
                    ));
                }
            }
            if p.crop_size == 0
                || p.crop_stride == 0
                || p.crop_stride > p.crop_size
                || p.short_side == 0
            {
                return Err(format!(
                    "[protocols.{name}] window, stride or short side is out of range"
                ));
            }
            if p.templates.is_empty() {
                return Err(format!("[protocols.{name}] has no templates"));
            }
        }
        if let Some(d) = &self.default_head {
            if !self.heads.contains_key(d) {
                return Err(format!(
                    "default_head '{d}' is not one of the heads ({})",
                    self.head_names().join(", ")
                ));
            }
        }
        for role in &required {
            let Some(by_precision) = self.graphs.get(role) else {
                return Err(format!("[graphs] has no '{role}' graph"));
            };
            if !by_precision.contains_key("fp32") {
                return Err(format!("[graphs] '{role}' has no fp32 graph"));
            }
        }
        for (role, by_precision) in &self.graphs {
            for (precision, file) in by_precision {
                if !GRAPH_PRECISIONS.contains(&precision.as_str()) {
                    return Err(format!(
                        "[graphs] '{role}' has precision '{precision}'; known: {}",
                        GRAPH_PRECISIONS.join(", ")
                    ));
                }
                if !listed.contains_key(file.as_str()) {
                    return Err(format!(
                        "[graphs] '{role}'.{precision} = '{file}' is not listed in [[files]]"
                    ));
                }
            }
        }
        if !listed.contains_key(self.text.vocabulary.as_str()) {
            return Err(format!(
                "[text] vocabulary '{}' is not listed in [[files]]",
                self.text.vocabulary
            ));
        }
        let arch = &self.architecture;
        let input = &self.input;
        if arch.patch_size == 0
            || input.crop_size == 0
            || !input.crop_size.is_multiple_of(arch.patch_size)
        {
            return Err(format!(
                "[input] crop_size {} must be a positive multiple of patch_size {}",
                input.crop_size, arch.patch_size
            ));
        }
        if input.crop_stride == 0 || input.crop_stride > input.crop_size {
            return Err(format!(
                "[input] crop_stride {} must be between 1 and crop_size {}",
                input.crop_stride, input.crop_size
            ));
        }
        if arch.mask_stride == 0 || !arch.patch_size.is_multiple_of(arch.mask_stride) {
            return Err(format!(
                "[architecture] mask_stride {} must divide patch_size {}",
                arch.mask_stride, arch.patch_size
            ));
        }
        if input.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err("[input] std values must be positive".to_string());
        }
        if arch.context_length < 2 {
            return Err("[architecture] context_length must be at least 2".to_string());
        }
        Ok(())
    }

    /// The bundle's heads, sorted by name ("tcl" alone for a bundle without a `[heads]` table). A `HeadId` is a
    /// position in this list.
    pub fn head_names(&self) -> Vec<&str> {
        if self.heads.is_empty() {
            vec![TCL_HEAD]
        } else {
            self.heads.keys().map(String::as_str).collect()
        }
    }

    /// The spec of a head by name.
    pub fn head_spec(&self, name: &str) -> Option<HeadSpec> {
        if self.heads.is_empty() {
            (name == TCL_HEAD).then(HeadSpec::tcl)
        } else {
            self.heads.get(name).cloned()
        }
    }

    /// The head `name` (None: the bundle's default head), or an error naming the heads the bundle has.
    pub fn find_head(&self, name: Option<&str>) -> Result<HeadId, String> {
        let names = self.head_names();
        let wanted = match name {
            Some(n) => n,
            None => self
                .default_head
                .as_deref()
                .or_else(|| names.iter().copied().find(|n| *n == TCL_HEAD))
                .unwrap_or(names[0]),
        };
        names
            .iter()
            .position(|n| *n == wanted)
            .map(HeadId)
            .ok_or_else(|| {
                format!(
                    "model '{}' has no head '{wanted}'; its heads: {} (export one with `tclseg models export \
                     --heads`)",
                    self.name,
                    names.join(", ")
                )
            })
    }

    /// Name and spec of a head found by `find_head`.
    pub fn head(&self, id: HeadId) -> Option<(&str, HeadSpec)> {
        let name = *self.head_names().get(id.0)?;
        Some((name, self.head_spec(name)?))
    }

    /// The protocols `--protocol` takes: "tcl" (the bundle's own settings) and its [protocols].
    pub fn protocol_names(&self) -> Vec<&str> {
        std::iter::once(TCL_PROTOCOL)
            .chain(
                self.protocols
                    .keys()
                    .map(String::as_str)
                    .filter(|n| *n != TCL_PROTOCOL),
            )
            .collect()
    }

    /// The manifest as `protocol` runs it: "tcl" returns it unchanged; a method's protocol becomes the bundle's
    /// input (window, stride, scale, CLIP's statistics), prompt templates and averaging, and its head alone, on
    /// the protocol's trunk and head graphs, with the method's logit scale, threshold and logit fusion.
    /// `dataset` (eval's dataset name) takes that dataset's overrides where the protocol has them. PAMR is off:
    /// the methods refine the whole image's logits, which the per-window path does not do. An unknown protocol
    /// is an error listing the bundle's protocols.
    pub fn with_protocol(&self, protocol: &str, dataset: Option<&str>) -> Result<Manifest, String> {
        if protocol == TCL_PROTOCOL {
            return Ok(self.clone());
        }
        let Some(p) = self.protocols.get(protocol) else {
            return Err(format!(
                "model '{}' has no protocol '{protocol}'; its protocols: {} (a CLIP ViT-B/16 bundle exported \
                 with `tclseg models export --heads {protocol}` carries the head's own)",
                self.name,
                self.protocol_names().join(", ")
            ));
        };
        let mut m = self.clone();
        let Some(mut head) = self.heads.get(&p.head).cloned() else {
            return Err(format!(
                "protocol '{protocol}' runs head '{}', which model '{}' does not have",
                p.head, self.name
            ));
        };
        let overrides = dataset.and_then(|d| p.datasets.get(d));
        if let Some(d) = overrides.filter(|d| d.whole_image) {
            tracing::warn!(
                "protocol {protocol}: the method runs dataset {} on the whole image in one pass; this bundle \
                 runs it in {} windows at stride {} (short side {})",
                dataset.unwrap_or_default(),
                p.crop_size,
                p.crop_stride,
                d.short_side
            );
        }
        m.input.crop_size = p.crop_size;
        m.input.crop_stride = p.crop_stride;
        m.input.short_side = overrides.map_or(p.short_side, |d| d.short_side);
        m.input.long_side_max = p.long_side_max;
        m.input.mean = p.mean;
        m.input.std = p.std;
        m.text.templates = p.templates.clone();
        m.text.prompt_average = p.prompt_average;
        // The roles the engine opens now name the protocol's graphs (their fp32 only: the bundle's other
        // precisions are its own trunk, at TCL's rule and crop).
        for (role, from) in [("image_trunk", &p.trunk), (&*head.graph, &p.graph)] {
            let Some(graphs) = self.graphs.get(from) else {
                return Err(format!(
                    "protocol '{protocol}': [graphs] has no '{from}' graph"
                ));
            };
            m.graphs.insert(role.to_string(), graphs.clone());
        }
        head.logit_scale = overrides.map_or(p.logit_scale, |d| d.logit_scale);
        head.prob_thresh = overrides.map_or(p.prob_thresh, |d| d.prob_thresh);
        head.pamr = false;
        head.fusion = p.fusion;
        if p.pamr {
            tracing::info!(
                "protocol {protocol}: the method's PAMR (on its whole-image logits) is not run by the bundle"
            );
        }
        m.heads = BTreeMap::from([(p.head.clone(), head)]);
        m.default_head = Some(p.head.clone());
        m.protocols.clear();
        m.check()?;
        Ok(m)
    }

    /// Patch grid of one crop (G in ARCHITECTURE.md).
    pub fn crop_grid(&self) -> usize {
        self.input.crop_size / self.architecture.patch_size
    }

    /// Side of the stride-4 mask of one crop.
    pub fn mask_side(&self) -> usize {
        self.input.crop_size / self.architecture.mask_stride
    }
}

/// True for a path like `graph.onnx`: relative, no `..`, no directories that could escape the bundle.
fn is_plain_relative(path: &str) -> bool {
    let p = Path::new(path);
    !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Streams a file through sha256 and returns the lowercase hex digest.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
