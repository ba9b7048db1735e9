//! The inference engine: a verified bundle's graphs in ONNX Runtime, text queries → embeddings (cached), and
//! images → per-pixel labels and soft scores, exactly as `trainer/tclseg_trainer/reference.py` computes them.
//!
//! The engine opens the sessions and hands each batch of images to one of two paths that compute the same
//! thing: `host_path` (pre- and postprocessing in native Rust: the CPU) or `device_path` (as graphs beside the
//! model, tensors kept on the device: the GPU). Both import their vocabulary from `types`, not from here.
//!
//! ONNX Runtime calls block; an `Engine` is meant to be owned by (or shared among) dedicated inference threads,
//! never a tokio worker. Sessions sit behind mutexes, so `&Engine` is usable from several threads, one run at a
//! time per graph.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use ort::session::Session;
use ort::value::Tensor;

use super::bundle::{Bundle, HeadId, HeadKind, Precision, PromptAverage};
use super::cpu::{CpuFeatures, PrecisionChoice};
use super::device_path::DevicePath;
use super::host_path;
use super::preprocess;
use super::runtime::{
    output, tensorrt_cache_dir, Device, Graph, Progress, Runtime, SessionSpec, TensorRtSpec,
};
use super::tokenizer::Tokenizer;
use super::types::{
    lock, DeviceChoice, EngineOptions, ModelGraphs, Processing, Query, SegmentSettings,
    Segmentation, SettingsOverrides, TclGraphs, TextEmbeddings,
};

/// L2 normalization eps of the official code (`us.normalize`).
const NORMALIZE_EPS: f32 = 1e-6;
/// Prompts per text-encoder run.
const TEXT_CHUNK: usize = 256;

/// Largest crop batch a TensorRT engine is built for (its optimisation profile); the device path splits bigger
/// batches.
const TENSORRT_MAX_CROPS: usize = 32;

pub struct Engine {
    bundle: Bundle,
    tokenizer: Tokenizer,
    device: Device,
    /// How the engine's sessions run on `device` (the text encoder's, opened per query set, derives from it).
    spec: SessionSpec,
    options: EngineOptions,
    /// `options.precision` resolved for `device` (never `Auto`), and why.
    precision: PrecisionChoice,
    cpu: CpuFeatures,
    manifest_sha256: String,
    model: Mutex<ModelGraphs>,
    /// Present when pre- and postprocessing run on the device, not on the host. Locked before `model`.
    device_path: Option<Mutex<DevicePath>>,
    text_cache: Mutex<HashMap<Vec<Query>, Arc<TextEmbeddings>>>,
    /// Image trunk runs so far (see `trunk_runs`).
    trunk_runs: AtomicU64,
}

/// One group of a shared run (`Engine::segment_groups`): images segmented with one query set and settings.
#[derive(Clone, Copy)]
pub struct ImageGroup<'a> {
    pub images: &'a [&'a image::RgbImage],
    pub text: &'a TextEmbeddings,
    pub settings: &'a SegmentSettings,
}

/// What `Engine::segment_groups` did: each group's segmentations (in the groups' order) and how many trunk runs
/// they took between them.
pub struct SharedRun {
    pub results: Vec<Result<Vec<Segmentation>>>,
    pub trunk_runs: u64,
}

impl Engine {
    /// Opens (and verifies) the bundle in `dir` and starts the engine on it: the one way `segment`, `serve`,
    /// `eval` and `models bench` open a model. A precision whose image graphs the bundle lacks is refused when
    /// the engine resolves it (`cpu::choose`), never run as fp32 while reported as asked.
    pub fn open(dir: &Path, options: EngineOptions) -> Result<Engine> {
        Engine::new(Bundle::open(dir)?, options)
    }

    pub fn new(bundle: Bundle, options: EngineOptions) -> Result<Engine> {
        let runtime = Runtime::get()?;
        let tokenizer = Tokenizer::from_vocab_file(&bundle.vocabulary())?;
        let manifest_path = bundle.dir().join(super::bundle::MANIFEST_FILE);
        let manifest_sha256 = super::bundle::sha256_file(&manifest_path)
            .with_context(|| format!("cannot read {}", manifest_path.display()))?;
        let device = match options.device {
            DeviceChoice::Cpu => Device::Cpu,
            // int8 and bf16 are CPU modes: `auto` need not try CUDA first to be refused.
            DeviceChoice::Auto
                if matches!(options.precision, Precision::Int8 | Precision::Bf16) =>
            {
                Device::Cpu
            }
            DeviceChoice::Cuda | DeviceChoice::Auto => Device::Cuda,
            DeviceChoice::TensorRt => Device::TensorRt,
        };
        let cpu = CpuFeatures::detect();
        let open = |device: Device| -> Result<(
            ModelGraphs,
            Option<DevicePath>,
            SessionSpec,
            PrecisionChoice,
        )> {
            let has = |p: Precision| bundle.graph("image_trunk", p).is_some();
            let choice = super::cpu::choose(options.precision, device, has, &cpu).map_err(|e| {
                anyhow!(
                    "bundle {}: --precision {}: {e}",
                    bundle.dir().display(),
                    options.precision
                )
            })?;
            let precision = choice.precision;
            if device.is_gpu() {
                // Before anything is logged about building engines: a missing library is the likelier news.
                super::cuda::prepare(runtime.library(), device == Device::TensorRt)?;
            }
            let spec = session_spec(
                &options,
                precision,
                device,
                &bundle,
                &manifest_sha256,
                runtime,
            );
            let graph = |role: &str| {
                bundle.graph_or_fp32(role, precision).ok_or_else(|| {
                    anyhow!("bundle {} has no '{role}' graph", bundle.dir().display())
                })
            };
            let session = |role: &str, input: &str, shape: Vec<usize>| -> Result<Session> {
                let mut spec = spec.clone();
                if let Some(trt) = spec.tensorrt.as_mut() {
                    trt.profile = Some((input.to_string(), shape, TENSORRT_MAX_CROPS));
                }
                let _progress = (device == Device::TensorRt).then(|| {
                    Progress::start(format!(
                        "building the TensorRT engine for {role} (once per bundle, GPU and runtime; cached in {})",
                        spec.tensorrt.as_ref().map(|t| t.cache_dir.display().to_string()).unwrap_or_default()
                    ))
                });
                runtime.session(Graph::File(&graph(role)?), &spec)
            };
            let m = bundle.manifest();
            let (crop, grid) = (m.input.crop_size, m.crop_grid());
            let width = m.architecture.vision_width;
            // The text graph is not loaded here: it runs once per query set (see embed_queries).
            let has_tcl = m
                .head_names()
                .into_iter()
                .any(|h| m.head_spec(h).is_some_and(|s| s.kind == HeadKind::Tcl));
            let tcl = if has_tcl {
                Some(TclGraphs {
                    head: session("tcl_head", "tokens", vec![1 + grid * grid, width])?,
                    // The mask head's inputs include the query count: TensorRT would need a profile per count.
                    mask_head: runtime
                        .session(Graph::File(&graph("mask_head")?), &spec.without_tensorrt())?,
                })
            } else {
                None
            };
            let model = ModelGraphs {
                trunk: session("image_trunk", "pixels", vec![3, crop, crop])?,
                tcl,
                dense: Default::default(),
            };
            // The device path runs TCL's head; the training-free heads run on the host path (their graphs on the
            // same device), so a bundle without TCL's head has no use for it.
            let on_device = has_tcl
                && match options.processing {
                    Processing::Auto => device.is_gpu(),
                    Processing::Host => false,
                    Processing::Device => true,
                };
            let device_path = on_device
                .then(|| DevicePath::new(&bundle, &spec))
                .transpose()?;
            Ok((model, device_path, spec, choice))
        };
        let (model, device_path, spec, precision) = match open(device) {
            Ok(opened) => opened,
            Err(err) if options.device == DeviceChoice::Auto => {
                // No NVIDIA driver at all: the CPU is what `auto` is expected to pick. A driver that is there
                // but unusable (CPU-only ONNX Runtime build, missing CUDA libraries) is worth a warning.
                if super::cuda::nvidia_driver_present() {
                    tracing::warn!("CUDA unavailable, running on the CPU: {err:#}");
                } else {
                    tracing::info!(
                        "no NVIDIA GPU driver on this machine: running on the CPU (CUDA: {err:#})"
                    );
                }
                open(Device::Cpu)?
            }
            Err(err) => return Err(err),
        };
        let engine = Engine {
            bundle,
            manifest_sha256,
            tokenizer,
            device: spec.device,
            spec,
            options,
            precision,
            cpu,
            model: Mutex::new(model),
            device_path: device_path.map(Mutex::new),
            text_cache: Mutex::new(HashMap::new()),
            trunk_runs: AtomicU64::new(0),
        };
        tracing::debug!(
            device = engine.device.name(),
            processing = %engine.processing(),
            precision = %engine.precision.precision,
            why = %engine.precision.reason,
            "engine ready"
        );
        Ok(engine)
    }

    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// sha256 of the bundle's model.toml (which pins every file's hash): identifies the model in outputs.
    pub fn manifest_sha256(&self) -> &str {
        &self.manifest_sha256
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// `Device` when pre- and postprocessing run beside the model on the device, `Host` when natively (never
    /// `Auto`: that is decided when the engine opens).
    pub fn processing(&self) -> Processing {
        if self.device_path.is_some() {
            Processing::Device
        } else {
            Processing::Host
        }
    }

    /// Precision of the image graphs in use (`auto` resolved).
    pub fn precision(&self) -> Precision {
        self.precision.precision
    }

    /// Why the engine runs at `precision()`: asked for, or what `auto` saw.
    pub fn precision_reason(&self) -> &str {
        &self.precision.reason
    }

    /// The CPU flags that decide the matrix kernels.
    pub fn cpu_features(&self) -> &CpuFeatures {
        &self.cpu
    }

    /// The kernels the image graphs run on, in words: MLAS's choice on the CPU, the provider on a GPU.
    pub fn kernels(&self) -> &'static str {
        match self.device {
            Device::Cpu => self.cpu.kernels(self.precision()),
            Device::Cuda => "CUDA execution provider",
            Device::TensorRt => "TensorRT execution provider",
        }
    }

    /// Default settings of the bundle's default head (TCL: PAMR on, its kp weight and background threshold).
    pub fn default_settings(&self) -> SegmentSettings {
        let m = self.bundle.manifest();
        SegmentSettings::resolve_head(m, None, SettingsOverrides::default(), false).unwrap_or_else(
            |_| SegmentSettings::resolve(&m.mask, SettingsOverrides::default(), false),
        )
    }

    /// The name of the head `settings` select (its `head`, else the bundle's default head).
    pub fn head_name(&self, settings: &SegmentSettings) -> String {
        let m = self.bundle.manifest();
        settings
            .head
            .or_else(|| m.find_head(None).ok())
            .and_then(|id| m.head(id))
            .map_or_else(
                || super::bundle::TCL_HEAD.to_string(),
                |(name, _)| name.to_string(),
            )
    }

    /// Opens a training-free head's graph on its first use (the TCL head is opened with the engine).
    fn ensure_head(&self, id: HeadId) -> Result<()> {
        let m = self.bundle.manifest();
        let (name, spec) = m
            .head(id)
            .ok_or_else(|| anyhow!("model '{}' has no head {}", m.name, id.0))?;
        if spec.kind == HeadKind::Tcl || lock(&self.model)?.dense.contains_key(&id) {
            return Ok(());
        }
        let path = self
            .bundle
            .graph_or_fp32(&spec.graph, self.options.precision)
            .ok_or_else(|| {
                anyhow!(
                    "bundle {} has no '{}' graph",
                    self.bundle.dir().display(),
                    spec.graph
                )
            })?;
        let grid = m.crop_grid();
        let mut spec_run = self.spec.clone();
        if let Some(trt) = spec_run.tensorrt.as_mut() {
            trt.profile = Some((
                "tokens".to_string(),
                vec![1 + grid * grid, m.architecture.vision_width],
                TENSORRT_MAX_CROPS,
            ));
        }
        let session = Runtime::get()?
            .session(Graph::File(&path), &spec_run)
            .with_context(|| format!("opening head '{name}'"))?;
        tracing::debug!(head = name, "head graph opened");
        lock(&self.model)?.dense.insert(id, session);
        Ok(())
    }

    /// Embeddings of a query set, computed once and cached.
    pub fn embed_queries(&self, queries: &[Query]) -> Result<Arc<TextEmbeddings>> {
        if queries.is_empty() {
            bail!("no queries given: name at least one thing to segment");
        }
        if let Some(hit) = lock(&self.text_cache)?.get(queries) {
            return Ok(Arc::clone(hit));
        }
        let m = self.bundle.manifest();
        let ctx = m.architecture.context_length;
        let dim = m.architecture.embed_dim;
        let mut prompt_tokens: Vec<i64> = Vec::new();
        let mut counts = Vec::with_capacity(queries.len());
        for q in queries {
            let prompts: Vec<String> = if q.prompts.is_empty() {
                m.text
                    .templates
                    .iter()
                    .map(|t| t.replacen("{}", &q.name, 1))
                    .collect()
            } else {
                q.prompts.clone()
            };
            counts.push(prompts.len());
            for p in &prompts {
                let n = self.tokenizer.encode(p).len() + 2;
                if n > ctx {
                    tracing::warn!(
                        "prompt '{p}' is {n} tokens; the text encoder reads {ctx}, so the rest is cut"
                    );
                }
                prompt_tokens.extend(self.tokenizer.tokenize(p, ctx));
            }
        }
        let total = prompt_tokens.len() / ctx;
        let mut emb = Vec::with_capacity(total * dim);
        {
            // Loaded for this query set and dropped after: the text encoder is the second-largest graph and
            // runs only when the queries change.
            let graph = self
                .bundle
                .graph("text_encoder", Precision::Fp32)
                .ok_or_else(|| {
                    anyhow!("bundle {} has no text encoder", self.bundle.dir().display())
                })?;
            // The text encoder's numbers are compared with stored embeddings: never TF32.
            let spec = SessionSpec {
                tf32: false,
                ..self.spec.without_tensorrt()
            };
            let mut text_session = Runtime::get()?.session(Graph::File(&graph), &spec)?;
            for start in (0..total).step_by(TEXT_CHUNK) {
                let rows = TEXT_CHUNK.min(total - start);
                let chunk = prompt_tokens[start * ctx..(start + rows) * ctx].to_vec();
                let input =
                    Tensor::from_array((vec![rows, ctx], chunk)).map_err(|e| anyhow!("{e}"))?;
                let out = text_session
                    .run(ort::inputs!["tokens" => input])
                    .map_err(|e| anyhow!("text encoder: {e}"))?;
                emb.extend_from_slice(output(&out, "text_emb", &[rows, dim])?);
            }
        }
        // Average the un-normalized prompt embeddings of each query, then normalize (TCL's recipe); under a
        // training-free method's protocol, average the normalized ones (`PromptAverage::Unit`).
        let unit = self.bundle.manifest().text.prompt_average == PromptAverage::Unit;
        let mut data = Vec::with_capacity(queries.len() * dim);
        let mut row = 0;
        for n in counts {
            let mut mean = vec![0f32; dim];
            for r in row..row + n {
                let mut prompt = emb[r * dim..(r + 1) * dim].to_vec();
                if unit {
                    normalize(&mut prompt);
                }
                for (m, v) in mean.iter_mut().zip(&prompt) {
                    *m += v;
                }
            }
            mean.iter_mut().for_each(|m| *m /= n as f32);
            normalize(&mut mean);
            data.extend(mean);
            row += n;
        }
        // A calibrated threshold belongs to the embedding it was measured with: the bundle's templates.
        let calibrated = &self.bundle.manifest().mask.query_thresholds;
        let thresholds = queries
            .iter()
            .map(|q| {
                q.prompts
                    .is_empty()
                    .then(|| calibrated.get(q.name.trim()).copied())
                    .flatten()
            })
            .collect();
        let result = Arc::new(TextEmbeddings {
            rows: queries.len(),
            dim,
            data,
            thresholds,
        });
        lock(&self.text_cache)?.insert(queries.to_vec(), Arc::clone(&result));
        Ok(result)
    }

    /// Segments several images, batching their crops together (on the device path: whole frames of one size).
    pub fn segment_batch(
        &self,
        images: &[&image::RgbImage],
        text: &TextEmbeddings,
        settings: &SegmentSettings,
    ) -> Result<Vec<Segmentation>> {
        let run = self.segment_groups(&[ImageGroup {
            images,
            text,
            settings,
        }]);
        run.results
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(anyhow!("the engine returned no result")))
    }

    /// Segments several groups of images, each with its own queries and settings (and so possibly its own
    /// head), in one run: on the host path the crops of every group go through the trunk together, `crop_batch`
    /// at a time, and each head graph then runs on its own groups' rows of the trunk's tokens — two pipelines
    /// that differ only in head pay for one trunk, not two. TCL groups on the device path run there, apart (its
    /// graphs take the trunk from the frames themselves). A group whose head cannot run fails alone; a failed
    /// trunk run fails every group that shared it.
    pub fn segment_groups(&self, groups: &[ImageGroup]) -> SharedRun {
        let m = self.bundle.manifest();
        let mut results: Vec<Option<Result<Vec<Segmentation>>>> =
            groups.iter().map(|_| None).collect();
        let mut trunk_runs = 0;
        let mut host: Vec<(usize, host_path::HostGroup)> = Vec::new();
        for (g, group) in groups.iter().enumerate() {
            let head = match self.host_head(group.settings) {
                Ok(head) => head,
                Err(e) => {
                    results[g] = Some(Err(e));
                    continue;
                }
            };
            if head.kind == HeadKind::Tcl {
                if let Some(path) = &self.device_path {
                    let run = lock(path).and_then(|mut path| {
                        self.segment_on_device(&mut path, group.images, group.text, group.settings)
                    });
                    results[g] = Some(run.map(|(segs, runs)| {
                        trunk_runs += runs;
                        segs
                    }));
                    continue;
                }
            }
            host.push((
                g,
                host_path::HostGroup {
                    images: group.images,
                    text: group.text,
                    settings: group.settings,
                    head,
                },
            ));
        }
        if !host.is_empty() {
            // Crops per run: compute bound on the CPU (measured no faster batched, and each extra crop costs
            // ~120 MB of activations); a GPU wants several.
            let crop_batch = match (self.options.crop_batch, self.device) {
                (0, Device::Cpu) => 1,
                (0, Device::Cuda | Device::TensorRt) => 8,
                (n, _) => n,
            };
            let parts: Vec<host_path::HostGroup> = host.iter().map(|(_, h)| *h).collect();
            match host_path::segment(&self.model, m, crop_batch, &parts) {
                Ok((segs, runs)) => {
                    trunk_runs += runs;
                    for ((g, _), segs) in host.iter().zip(segs) {
                        results[*g] = Some(Ok(segs));
                    }
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    for (g, _) in &host {
                        results[*g] = Some(Err(anyhow!("{why}")));
                    }
                }
            }
        }
        for (group, result) in groups.iter().zip(results.iter_mut()) {
            if let (true, Some(bg), Some(Ok(segs))) = (
                group.settings.query_thresholds,
                group.settings.background,
                result.as_mut(),
            ) {
                for seg in segs {
                    seg.apply_query_thresholds(&group.text.thresholds, bg);
                }
            }
        }
        self.trunk_runs.fetch_add(trunk_runs, Ordering::Relaxed);
        SharedRun {
            results: results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(anyhow!("a group was left out of the run"))))
                .collect(),
            trunk_runs,
        }
    }

    /// Image trunk runs since the engine opened (each on a batch of crops, shared by every head in it).
    pub fn trunk_runs(&self) -> u64 {
        self.trunk_runs.load(Ordering::Relaxed)
    }

    /// The head `settings` select, its graph opened.
    fn host_head(&self, settings: &SegmentSettings) -> Result<host_path::HostHead> {
        let m = self.bundle.manifest();
        let id = match settings.head {
            Some(id) => id,
            None => m.find_head(None).map_err(|e| anyhow!(e))?,
        };
        let (_, spec) = m
            .head(id)
            .ok_or_else(|| anyhow!("model '{}' has no head {}", m.name, id.0))?;
        if spec.kind != HeadKind::Tcl {
            self.ensure_head(id)?;
        }
        Ok(host_path::HostHead {
            id,
            kind: spec.kind,
            logit_scale: spec.logit_scale,
            fusion: spec.fusion,
        })
    }

    /// The device path: frames grouped by size (in order of first appearance), each group in runs of at most
    /// `crop_batch` crops (whole frames; TensorRT: at most its profile's batch).
    fn segment_on_device(
        &self,
        path: &mut DevicePath,
        images: &[&image::RgbImage],
        text: &TextEmbeddings,
        settings: &SegmentSettings,
    ) -> Result<(Vec<Segmentation>, u64)> {
        let manifest = self.bundle.manifest();
        let input = &manifest.input;
        let cap = match (self.options.crop_batch, self.device) {
            (0, Device::TensorRt) => TENSORRT_MAX_CROPS,
            (0, _) => usize::MAX,
            (n, Device::TensorRt) => n.min(TENSORRT_MAX_CROPS),
            (n, _) => n,
        };
        let mut groups: Vec<((u32, u32), Vec<usize>)> = Vec::new();
        for (i, img) in images.iter().enumerate() {
            let size = img.dimensions();
            match groups.iter_mut().find(|(s, _)| *s == size) {
                Some((_, members)) => members.push(i),
                None => groups.push((size, vec![i])),
            }
        }
        let mut model = lock(&self.model)?;
        let mut results: Vec<Option<Segmentation>> = images.iter().map(|_| None).collect();
        let mut trunk_runs = 0;
        for ((w, h), members) in groups {
            let windows = preprocess::windows(h as usize, w as usize, input).1.len();
            let per_run = (cap / windows).max(1);
            for chunk in members.chunks(per_run) {
                let frames: Vec<&image::RgbImage> = chunk.iter().map(|&i| images[i]).collect();
                let segs = path.segment(&mut model, manifest, &frames, text, settings)?;
                trunk_runs += 1;
                for (&i, seg) in chunk.iter().zip(segs) {
                    results[i] = Some(seg);
                }
            }
        }
        let segs = results
            .into_iter()
            .map(|r| r.ok_or_else(|| anyhow!("an image was left out of the device batches")))
            .collect::<Result<_>>()?;
        Ok((segs, trunk_runs))
    }
}

/// The session settings for the engine's graphs on `device`.
fn session_spec(
    options: &EngineOptions,
    precision: Precision,
    device: Device,
    bundle: &Bundle,
    manifest_sha256: &str,
    runtime: &Runtime,
) -> SessionSpec {
    SessionSpec {
        device,
        threads: options.threads,
        spin: options.spin,
        tf32: precision == Precision::Fp16,
        bf16_fastmath: precision == Precision::Bf16,
        tensorrt: (device == Device::TensorRt).then(|| TensorRtSpec {
            cache_dir: tensorrt_cache_dir(bundle, manifest_sha256, runtime, precision),
            fp16: precision == Precision::Fp16,
            profile: None,
        }),
    }
}

/// L2-normalizes `v` in place with the official eps.
pub(crate) fn normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(NORMALIZE_EPS);
    v.iter_mut().for_each(|x| *x /= norm);
}
