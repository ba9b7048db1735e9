//! The inference engine: a verified bundle's graphs in ONNX Runtime, text queries → embeddings (cached), and
//! images → per-pixel labels and soft scores, exactly as `trainer/tclseg_trainer/reference.py` computes them.
//!
//! Per image: resize (short side 448) and normalize, cut the sliding windows, run the crops in batches through
//! trunk → TCL head → mask head → PAMR, blend the kp masks, upsample each crop's masks to the crop, average the
//! overlapping crops, resize to the original size, prepend the background, argmax.
//!
//! ONNX Runtime calls block; an `Engine` is meant to be owned by (or shared among) dedicated inference threads,
//! never a tokio worker. Sessions sit behind mutexes, so `&Engine` is usable from several threads, one run at a
//! time per graph.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use ort::session::{Session, SessionOutputs};
use ort::value::Tensor;

use super::bundle::{Bundle, Precision};
use super::device_path::{DevicePath, ModelSessions};
use super::preprocess::{self, Prepared};
use super::resample::{resize_planes, AxisWeights, Coordinates};
use super::runtime::{Device, Graph, Runtime, SessionSpec, TensorRtSpec};
use super::tokenizer::Tokenizer;
use super::types::{
    DeviceChoice, EngineOptions, Processing, Query, SegmentSettings, Segmentation,
    SettingsOverrides, TextEmbeddings,
};

/// L2 normalization eps of the official code (`us.normalize`).
const NORMALIZE_EPS: f32 = 1e-6;
/// Prompts per text-encoder run.
const TEXT_CHUNK: usize = 256;

struct Sessions {
    trunk: Session,
    head: Session,
    mask_head: Session,
    /// Present when pre- and postprocessing run on the device.
    device_path: Option<DevicePath>,
}

/// Largest crop batch a TensorRT engine is built for (its optimisation profile); the device path splits bigger
/// batches.
const TENSORRT_MAX_CROPS: usize = 32;

pub struct Engine {
    bundle: Bundle,
    tokenizer: Tokenizer,
    device: Device,
    /// Pre- and postprocessing run on the device (`device_path`), not on the host.
    on_device: bool,
    /// How the engine's sessions run on `device` (the text encoder's, opened per query set, derives from it).
    spec: SessionSpec,
    options: EngineOptions,
    manifest_sha256: String,
    sessions: Mutex<Sessions>,
    text_cache: Mutex<HashMap<Vec<Query>, Arc<TextEmbeddings>>>,
}

impl Engine {
    /// Opens (and verifies) the bundle in `dir` and starts the engine on it: the one way `segment`, `serve`,
    /// `eval` and `models bench` open a model. fp16 on a bundle without fp16 image graphs is refused here
    /// (the engine would otherwise run the fp32 graphs while reporting fp16).
    pub fn open(dir: &Path, options: EngineOptions) -> Result<Engine> {
        let bundle = Bundle::open(dir)?;
        if options.precision == Precision::Fp16
            && bundle.graph("image_trunk", Precision::Fp16).is_none()
        {
            bail!(
                "bundle {} has no fp16 graphs; export it with --precision fp32,fp16",
                dir.display()
            );
        }
        Engine::new(bundle, options)
    }

    pub fn new(bundle: Bundle, options: EngineOptions) -> Result<Engine> {
        let runtime = Runtime::get()?;
        let tokenizer = Tokenizer::from_vocab_file(&bundle.vocabulary())?;
        let manifest_path = bundle.dir().join(super::bundle::MANIFEST_FILE);
        let manifest_sha256 = super::bundle::sha256_file(&manifest_path)
            .with_context(|| format!("cannot read {}", manifest_path.display()))?;
        let device = match options.device {
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda | DeviceChoice::Auto => Device::Cuda,
            DeviceChoice::TensorRt => Device::TensorRt,
        };
        let open = |device: Device| -> Result<(Sessions, SessionSpec)> {
            if device.is_gpu() {
                // Before anything is logged about building engines: a missing library is the likelier news.
                super::cuda::prepare(runtime.library(), device == Device::TensorRt)?;
            }
            let spec = session_spec(&options, device, &bundle, &manifest_sha256, runtime);
            let graph = |role: &str| {
                bundle
                    .graph_or_fp32(role, options.precision)
                    .ok_or_else(|| {
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
            let sessions = Sessions {
                trunk: session("image_trunk", "pixels", vec![3, crop, crop])?,
                head: session("tcl_head", "tokens", vec![1 + grid * grid, width])?,
                // The mask head's inputs include the query count: TensorRT would need a profile per count.
                mask_head: runtime
                    .session(Graph::File(&graph("mask_head")?), &spec.without_tensorrt())?,
                device_path: None,
            };
            let on_device = match options.processing {
                Processing::Auto => device.is_gpu(),
                Processing::Host => false,
                Processing::Device => true,
            };
            let sessions = Sessions {
                device_path: on_device
                    .then(|| DevicePath::new(&bundle, &spec))
                    .transpose()?,
                ..sessions
            };
            Ok((sessions, spec))
        };
        let (sessions, spec) = match open(device) {
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
        let device = spec.device;
        tracing::debug!(
            device = device.name(),
            processing = if sessions.device_path.is_some() {
                "device"
            } else {
                "host"
            },
            "engine ready"
        );
        Ok(Engine {
            bundle,
            manifest_sha256,
            tokenizer,
            device,
            on_device: sessions.device_path.is_some(),
            spec,
            options,
            sessions: Mutex::new(sessions),
            text_cache: Mutex::new(HashMap::new()),
        })
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

    /// "device" when pre- and postprocessing run beside the model on the device, "host" when natively.
    pub fn processing(&self) -> &'static str {
        if self.on_device {
            "device"
        } else {
            "host"
        }
    }

    /// Precision of the image graphs in use.
    pub fn precision(&self) -> Precision {
        self.options.precision
    }

    /// Default settings of the bundle: PAMR on, its kp weight and background threshold.
    pub fn default_settings(&self) -> SegmentSettings {
        SegmentSettings::resolve(
            &self.bundle.manifest().mask,
            SettingsOverrides::default(),
            false,
        )
    }

    /// Embeddings of a query set, computed once and cached.
    pub fn embed_queries(&self, queries: &[Query]) -> Result<Arc<TextEmbeddings>> {
        if queries.is_empty() {
            bail!("no queries given: name at least one thing to segment");
        }
        if let Some(hit) = self.lock_cache()?.get(queries) {
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
        // Average the un-normalized prompt embeddings of each query, then normalize (TCL's recipe).
        let mut data = Vec::with_capacity(queries.len() * dim);
        let mut row = 0;
        for n in counts {
            let mut mean = vec![0f32; dim];
            for r in row..row + n {
                for (m, v) in mean.iter_mut().zip(&emb[r * dim..(r + 1) * dim]) {
                    *m += v;
                }
            }
            mean.iter_mut().for_each(|m| *m /= n as f32);
            normalize(&mut mean);
            data.extend(mean);
            row += n;
        }
        let result = Arc::new(TextEmbeddings {
            rows: queries.len(),
            dim,
            data,
        });
        self.lock_cache()?
            .insert(queries.to_vec(), Arc::clone(&result));
        Ok(result)
    }

    /// Segments several images, batching their crops together.
    pub fn segment_batch(
        &self,
        images: &[&image::RgbImage],
        text: &TextEmbeddings,
        settings: &SegmentSettings,
    ) -> Result<Vec<Segmentation>> {
        if self.on_device {
            return self.segment_on_device(&mut *self.lock_sessions()?, images, text, settings);
        }
        let input = &self.bundle.manifest().input;
        let prepared: Vec<Prepared> = images
            .iter()
            .map(|img| preprocess::prepare(img, input))
            .collect();
        let classes = text.rows;
        let mut accumulators: Vec<Accumulator> = prepared
            .iter()
            .map(|p| Accumulator::new(classes, p.height, p.width))
            .collect();
        let crops: Vec<(usize, preprocess::CropBox)> = prepared
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                preprocess::crop_boxes(p.height, p.width, input.crop_size, input.crop_stride)
                    .into_iter()
                    .map(move |b| (i, b))
            })
            .collect();
        let batch = match (self.options.crop_batch, self.device) {
            (0, Device::Cpu) => 1,
            (0, Device::Cuda | Device::TensorRt) => 8,
            (n, _) => n,
        };
        for chunk in crops.chunks(batch) {
            let pixels: Vec<f32> = chunk
                .iter()
                .flat_map(|(i, b)| preprocess::cut_crop(&prepared[*i], b, input.crop_size))
                .collect();
            let masks = self.crop_masks(pixels, chunk.len(), text, settings)?;
            let side = self.bundle.manifest().mask_side();
            let crop = input.crop_size;
            for (k, (i, b)) in chunk.iter().enumerate() {
                let m = &masks[k * classes * side * side..(k + 1) * classes * side * side];
                let up = resize_planes(
                    m,
                    classes,
                    (side, side),
                    (crop, crop),
                    Coordinates::HalfPixel,
                );
                accumulators[*i].add(&up, crop, b);
            }
        }
        images
            .iter()
            .zip(accumulators)
            .map(|(img, acc)| acc.finish(img.height() as usize, img.width() as usize, settings))
            .collect()
    }

    /// The device path: frames grouped by size (in order of first appearance), each group in runs of at most
    /// `crop_batch` crops (whole frames; TensorRT: at most its profile's batch).
    fn segment_on_device(
        &self,
        sessions: &mut Sessions,
        images: &[&image::RgbImage],
        text: &TextEmbeddings,
        settings: &SegmentSettings,
    ) -> Result<Vec<Segmentation>> {
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
        let Sessions {
            trunk,
            head,
            mask_head,
            device_path,
        } = sessions;
        let path = device_path
            .as_mut()
            .ok_or_else(|| anyhow!("the device path is not set up"))?;
        let mut results: Vec<Option<Segmentation>> = images.iter().map(|_| None).collect();
        for ((w, h), members) in groups {
            let windows = preprocess::windows(h as usize, w as usize, input).1.len();
            let per_run = (cap / windows).max(1);
            for chunk in members.chunks(per_run) {
                let frames: Vec<&image::RgbImage> = chunk.iter().map(|&i| images[i]).collect();
                let model = ModelSessions {
                    trunk: &mut *trunk,
                    head: &mut *head,
                    mask_head: &mut *mask_head,
                };
                let segs = path.segment(model, manifest, &frames, text, settings)?;
                for (&i, seg) in chunk.iter().zip(segs) {
                    results[i] = Some(seg);
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.ok_or_else(|| anyhow!("an image was left out of the device batches")))
            .collect()
    }

    /// Final stride-4 masks of a batch of crops, [B, N, side, side]: mask head, PAMR, kp blend.
    fn crop_masks(
        &self,
        mut pixels: Vec<f32>,
        crops: usize,
        text: &TextEmbeddings,
        settings: &SegmentSettings,
    ) -> Result<Vec<f32>> {
        let m = self.bundle.manifest();
        let (crop, grid, side) = (m.input.crop_size, m.crop_grid(), m.mask_side());
        let (width, dim) = (m.architecture.vision_width, m.architecture.embed_dim);
        let n = text.rows;
        let mut sessions = self.lock_sessions()?;
        let pixel_shape = vec![crops, 3, crop, crop];

        // PAMR needs the crops again after the trunk; copy them only then.
        let trunk_pixels = if settings.pamr {
            pixels.clone()
        } else {
            std::mem::take(&mut pixels)
        };
        let t0 = std::time::Instant::now();
        let input =
            Tensor::from_array((pixel_shape.clone(), trunk_pixels)).map_err(|e| anyhow!("{e}"))?;
        let out = sessions
            .trunk
            .run(ort::inputs!["pixels" => input])
            .map_err(|e| anyhow!("image trunk: {e}"))?;
        let tokens = output(&out, "tokens", &[crops, 1 + grid * grid, width])?.to_vec();
        drop(out);

        let t1 = std::time::Instant::now();
        let input = Tensor::from_array((vec![crops, 1 + grid * grid, width], tokens))
            .map_err(|e| anyhow!("{e}"))?;
        let out = sessions
            .head
            .run(ort::inputs!["tokens" => input])
            .map_err(|e| anyhow!("TCL head: {e}"))?;
        let dense = output(&out, "dense", &[crops, dim, side, side])?.to_vec();
        let kp_feat = output(&out, "kp_feat", &[crops, dim, grid, grid])?.to_vec();
        drop(out);
        let t2 = std::time::Instant::now();

        let out = sessions
            .mask_head
            .run(ort::inputs![
                "dense" => Tensor::from_array((vec![crops, dim, side, side], dense)).map_err(|e| anyhow!("{e}"))?,
                "kp_feat" => Tensor::from_array((vec![crops, dim, grid, grid], kp_feat)).map_err(|e| anyhow!("{e}"))?,
                "text" => Tensor::from_array((vec![n, dim], text.data.clone())).map_err(|e| anyhow!("{e}"))?,
            ])
            .map_err(|e| anyhow!("mask head: {e}"))?;
        let mut masks = output(&out, "masks", &[crops, n, side, side])?.to_vec();
        let kp_masks = output(&out, "kp_masks", &[crops, n, side, side])?.to_vec();
        drop(out);
        let t3 = std::time::Instant::now();

        drop(sessions);
        if settings.pamr {
            let plane = 3 * crop * crop;
            let per_crop = n * side * side;
            for (c, crop_masks) in masks.chunks_exact_mut(per_crop).enumerate() {
                super::pamr::refine(
                    &pixels[c * plane..(c + 1) * plane],
                    crop,
                    crop_masks,
                    n,
                    side,
                    &m.mask.pamr_dilations,
                    m.mask.pamr_iterations,
                );
            }
        }
        let t4 = std::time::Instant::now();
        tracing::trace!(
            crops,
            "crop timings (ms): trunk {:.1}, head {:.1}, mask head {:.1}, PAMR {:.1}",
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3,
            (t3 - t2).as_secs_f64() * 1e3,
            (t4 - t3).as_secs_f64() * 1e3
        );
        let kp = settings.kp_weight;
        if kp != 0.0 {
            for (m, k) in masks.iter_mut().zip(&kp_masks) {
                *m = kp * k + (1.0 - kp) * *m;
            }
        }
        Ok(masks)
    }

    fn lock_sessions(&self) -> Result<std::sync::MutexGuard<'_, Sessions>> {
        self.sessions
            .lock()
            .map_err(|_| anyhow!("an earlier inference panicked; the engine must be recreated"))
    }

    fn lock_cache(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, HashMap<Vec<Query>, Arc<TextEmbeddings>>>> {
        self.text_cache
            .lock()
            .map_err(|_| anyhow!("an earlier inference panicked; the engine must be recreated"))
    }
}

/// The session settings for the engine's graphs on `device`.
fn session_spec(
    options: &EngineOptions,
    device: Device,
    bundle: &Bundle,
    manifest_sha256: &str,
    runtime: &Runtime,
) -> SessionSpec {
    SessionSpec {
        device,
        threads: options.threads,
        spin: options.spin,
        tf32: options.precision == Precision::Fp16,
        tensorrt: (device == Device::TensorRt).then(|| TensorRtSpec {
            cache_dir: tensorrt_cache_dir(bundle, manifest_sha256, runtime, options.precision),
            fp16: options.precision == Precision::Fp16,
            profile: None,
        }),
    }
}

/// `$XDG_CACHE_HOME/tclseg/tensorrt/<bundle>-<manifest hash>-<precision>-<GPU models>-<ONNX Runtime>`: an engine
/// is only valid for the graph, the GPU model and the TensorRT/ONNX Runtime that built it, so each of them is in
/// the key and a change builds afresh instead of loading a stale engine. (systemd: `CacheDirectory=tclseg` with
/// `XDG_CACHE_HOME=%C`.)
fn tensorrt_cache_dir(
    bundle: &Bundle,
    manifest_sha256: &str,
    runtime: &Runtime,
    precision: Precision,
) -> std::path::PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let ort = std::fs::canonicalize(runtime.library())
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "onnxruntime".to_string());
    let name = bundle
        .dir()
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    base.join("tclseg").join("tensorrt").join(format!(
        "{name}-{}-{}-{}-{ort}",
        &manifest_sha256[..manifest_sha256.len().min(16)],
        precision.key(),
        super::cuda::gpu_models()
    ))
}

/// Logs "still working" every 15 s while something slow and silent runs (a TensorRT engine build takes minutes).
struct Progress {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(what: String) -> Progress {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let start = std::time::Instant::now();
            tracing::info!("{what}");
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(std::time::Duration::from_secs(15))
            {
                tracing::info!("{what}: {} s so far", start.elapsed().as_secs());
            }
        });
        Progress {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A run's output `name` as a slice, after checking its shape.
pub(crate) fn output<'a>(
    out: &'a SessionOutputs<'_>,
    name: &str,
    expected: &[usize],
) -> Result<&'a [f32]> {
    let value = out
        .get(name)
        .ok_or_else(|| anyhow!("graph output '{name}' missing"))?;
    let (shape, data) = value
        .try_extract_tensor::<f32>()
        .map_err(|e| anyhow!("graph output '{name}': {e}"))
        .context("the bundle's graphs do not match this tclseg")?;
    let shape: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
    if shape != expected {
        bail!("graph output '{name}' has shape {shape:?}, expected {expected:?}");
    }
    Ok(data)
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

/// Sum and count of crop scores over one prepared image, [N, h, w].
struct Accumulator {
    classes: usize,
    height: usize,
    width: usize,
    total: Vec<f32>,
    count: Vec<f32>,
}

impl Accumulator {
    fn new(classes: usize, height: usize, width: usize) -> Accumulator {
        Accumulator {
            classes,
            height,
            width,
            total: vec![0.0; classes * height * width],
            count: vec![0.0; height * width],
        }
    }

    /// Adds one crop's upsampled masks [N, crop, crop]; a box smaller than the crop sits centred in it.
    fn add(&mut self, masks: &[f32], crop: usize, b: &preprocess::CropBox) {
        let (bh, bw) = (b.y2 - b.y1, b.x2 - b.x1);
        let (top, left) = ((crop - bh) / 2, (crop - bw) / 2);
        for c in 0..self.classes {
            let plane = &masks[c * crop * crop..(c + 1) * crop * crop];
            for y in 0..bh {
                let src = &plane[(top + y) * crop + left..(top + y) * crop + left + bw];
                let row = (c * self.height + b.y1 + y) * self.width + b.x1;
                for (t, s) in self.total[row..row + bw].iter_mut().zip(src) {
                    *t += s;
                }
            }
        }
        for y in b.y1..b.y2 {
            for v in &mut self.count[y * self.width + b.x1..y * self.width + b.x2] {
                *v += 1.0;
            }
        }
    }

    /// Averages, resizes to the original size row by row, prepends the background and takes the argmax.
    fn finish(
        self,
        out_h: usize,
        out_w: usize,
        settings: &SegmentSettings,
    ) -> Result<Segmentation> {
        let (h, w, n) = (self.height, self.width, self.classes);
        let mut mean = self.total;
        for c in 0..n {
            for (v, k) in mean[c * h * w..(c + 1) * h * w].iter_mut().zip(&self.count) {
                *v /= *k;
            }
        }
        let bg = settings.background;
        let offset = usize::from(bg.is_some());
        let classes = n + offset;
        let ys = AxisWeights::new(h, out_h, Coordinates::HalfPixel);
        let xs = AxisWeights::new(w, out_w, Coordinates::HalfPixel);
        let mut labels = vec![0u16; out_h * out_w];
        let mut scores = settings
            .keep_scores
            .then(|| vec![0f32; classes * out_h * out_w]);
        let mut best_all = vec![0f32; out_h * out_w];
        let mut row = vec![0f32; out_w];
        for oy in 0..out_h {
            let best = &mut best_all[oy * out_w..(oy + 1) * out_w];
            best.fill(bg.unwrap_or(f32::NEG_INFINITY));
            let labels_row = &mut labels[oy * out_w..(oy + 1) * out_w];
            labels_row.fill(0);
            if let (Some(s), Some(v)) = (scores.as_mut(), bg) {
                s[oy * out_w..(oy + 1) * out_w].fill(v);
            }
            for c in 0..n {
                let plane = &mean[c * h * w..(c + 1) * h * w];
                let (r0, r1) = (ys.lo[oy] * w, ys.hi[oy] * w);
                super::resample::interpolate_row(
                    &plane[r0..r0 + w],
                    &plane[r1..r1 + w],
                    ys.frac[oy],
                    &xs,
                    &mut row,
                );
                let label = (c + offset) as u16;
                for ((b, l), v) in best.iter_mut().zip(labels_row.iter_mut()).zip(&row) {
                    // Strictly greater: the first class wins ties, as torch.argmax does.
                    if *v > *b || (c == 0 && bg.is_none()) {
                        *b = *v;
                        *l = label;
                    }
                }
                if let Some(s) = scores.as_mut() {
                    let at = ((c + offset) * out_h + oy) * out_w;
                    s[at..at + out_w].copy_from_slice(&row);
                }
            }
        }
        Ok(Segmentation {
            width: out_w,
            height: out_h,
            classes,
            labels,
            best: best_all,
            scores,
        })
    }
}
