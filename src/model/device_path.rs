//! The device path: whole images through ONNX Runtime, every tensor of a batch kept where the sessions run.
//!
//! On a GPU the host path (crop cutting, mask upsampling, averaging, argmax) would move every crop and every float
//! score map across PCIe and spend host cores on per-pixel loops. Here the host resizes each frame to the
//! evaluation scale (OpenCV's uint8 bilinear, bit for bit, as the official pipeline does: a float matrix product
//! cannot reproduce its per-tap truncations), uploads it as uint8 and gets back uint16 label maps and the winning
//! scores:
//!
//! ```text
//! frames uint8 [I,h,w,3] ─▶ crops ─▶ trunk ─▶ TCL head ─▶ mask head ─▶ [PAMR] ─▶ labels ─▶ labels u16, best f32
//!                   geometry ─┘                  text ─┘ (resident)              └─ geometry
//! ```
//!
//! `crops` and `labels` are two small weight-free graphs built into the binary (written by
//! `trainer/tclseg_trainer/device_graphs.py`, which explains the maths): resampling, windowing and averaging are
//! linear and separable, so they are matrix products with matrices built here once per frame size and kept on
//! the device. Between the graphs, ONNX Runtime's I/O binding passes device tensors along without copies. The
//! same code runs on the CPU provider, which is how CPU-only CI tests it against the host path.
//!
//! A batch's frames must share one size (the engine groups them); their windows run through the model together.

use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynValue, Tensor};

mod matrices;

use super::bundle::{Bundle, Manifest};
use super::preprocess::{pixel_statistics, rescale, windows};
use super::runtime::{Device, Graph, Runtime, SessionSpec};
use super::types::{ModelGraphs, SegmentSettings, Segmentation, TextEmbeddings};
use matrices::{crop_matrices, distinct, label_matrices};

/// uint8 frames → normalized windows [I·R·C, 3, S, S].
pub const CROPS_GRAPH: &[u8] = include_bytes!("graphs/crops.onnx");
/// Stride-4 window masks → kp blend, averaged and resized scores, background, argmax → uint16 labels.
pub const LABELS_GRAPH: &[u8] = include_bytes!("graphs/labels.onnx");

/// Frame sizes whose matrices stay on the device. A daemon sees a handful; a folder of photos may see many,
/// and rebuilding a size's matrices costs far less than the frame's inference.
const GEOMETRY_CACHE: usize = 16;

pub(crate) struct DevicePath {
    crops: Session,
    labels: Session,
    pamr: Session,
    device: Device,
    /// Where intermediate tensors live: device memory on a GPU, host memory on the CPU.
    resident: MemoryInfo<'static>,
    host: MemoryInfo<'static>,
    mean: DynValue,
    std: DynValue,
    geometry: Vec<((usize, usize), Geometry)>,
    text: Option<(Vec<f32>, DynValue)>,
}

/// One frame size's matrices, on the device.
struct Geometry {
    windows: usize,
    /// The frame's size at the evaluation scale: what the host resizes to and uploads.
    resized: (usize, usize),
    crop_rows: DynValue,
    crop_cols: DynValue,
    label_rows: DynValue,
    label_cols: DynValue,
}

impl DevicePath {
    pub fn new(bundle: &Bundle, spec: &SessionSpec) -> Result<DevicePath> {
        let runtime = Runtime::get()?;
        // The small graphs run on CUDA under TensorRT too: TensorRT gains nothing on them and would build an
        // engine per frame size.
        let small = spec.without_tensorrt();
        let pamr_file = bundle
            .graph("pamr", super::bundle::Precision::Fp32)
            .ok_or_else(|| anyhow!("bundle {} has no 'pamr' graph", bundle.dir().display()))?;
        let crops = runtime.session(
            Graph::Embedded {
                name: "crops.onnx",
                bytes: CROPS_GRAPH,
            },
            &small,
        )?;
        let labels = runtime.session(
            Graph::Embedded {
                name: "labels.onnx",
                bytes: LABELS_GRAPH,
            },
            &small,
        )?;
        let pamr = runtime.session(Graph::File(&pamr_file), &small)?;
        let memory = |device: AllocationDevice<'static>| {
            MemoryInfo::new(device, 0, AllocatorType::Device, MemoryType::Default)
                .map_err(|e| anyhow!("{e}"))
        };
        let resident = memory(if spec.device.is_gpu() {
            AllocationDevice::CUDA
        } else {
            AllocationDevice::CPU
        })?;
        let (mean, std) = pixel_statistics(&bundle.manifest().input);
        Ok(DevicePath {
            crops,
            labels,
            pamr,
            device: small.device,
            resident,
            host: memory(AllocationDevice::CPU)?,
            mean: upload(small.device, host_tensor(vec![3], mean.to_vec())?)?,
            std: upload(small.device, host_tensor(vec![3], std.to_vec())?)?,
            geometry: Vec::new(),
            text: None,
        })
    }

    /// Segments frames of one size: their windows run through the model as one batch. Each step below is one
    /// graph (or a few) with its inputs and outputs left on the device; only the uint8 frames go up and the
    /// labels and best scores (and the scores, when kept) come down.
    pub fn segment(
        &mut self,
        model: &mut ModelGraphs,
        manifest: &Manifest,
        frames: &[&image::RgbImage],
        text: &TextEmbeddings,
        settings: &SegmentSettings,
    ) -> Result<Vec<Segmentation>> {
        let Some((width, height)) = one_size(frames)? else {
            return Ok(Vec::new());
        };
        let t0 = Instant::now();
        let at = self.geometry(manifest, height, width)?;
        self.text_on_device(text)?;
        let crops = self.cut_crops(at, manifest, frames)?;
        let t1 = Instant::now();
        let (masks, kp_masks) = self.run_model(model, &crops)?;
        let t2 = Instant::now();
        let masks = if settings.pamr {
            self.refine(&crops, &masks)?
        } else {
            masks
        };
        drop(crops);
        let t3 = Instant::now();
        let [labels, best, scores] = self.label(at, &masks, &kp_masks, settings)?;
        let t4 = Instant::now();
        tracing::trace!(
            frames = frames.len(),
            windows = self.geometry[at].1.windows * frames.len(),
            "device path (ms): crops {:.1}, model {:.1}, PAMR {:.1}, labels {:.1}",
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3,
            (t3 - t2).as_secs_f64() * 1e3,
            (t4 - t3).as_secs_f64() * 1e3
        );
        let shape = Shape {
            frames: frames.len(),
            width,
            height,
            queries: text.rows,
        };
        assemble(shape, settings, &labels, &best, &scores)
    }

    /// Frames → normalized windows [I·R·C, 3, S, S] on the device. The host only resizes to the evaluation scale
    /// (OpenCV's uint8 resize, which no float graph reproduces bit for bit) and uploads uint8, a quarter of the
    /// floats' bytes; windowing and normalization are the `crops` graph's matrix products.
    fn cut_crops(
        &mut self,
        at: usize,
        manifest: &Manifest,
        frames: &[&image::RgbImage],
    ) -> Result<DynValue> {
        let geometry = &self.geometry[at].1;
        let (h, w) = geometry.resized;
        let mut pixels = Vec::with_capacity(frames.len() * h * w * 3);
        for frame in frames {
            pixels.extend_from_slice(rescale(frame, &manifest.input).as_raw());
        }
        let image = Tensor::from_array((vec![frames.len(), h, w, 3], pixels))
            .map_err(|e| anyhow!("{e}"))?
            .into_dyn();
        let [crops] = outputs(run(
            &mut self.crops,
            "crops",
            &[
                ("image", &image),
                ("rows", &geometry.crop_rows),
                ("cols", &geometry.crop_cols),
                ("mean", &self.mean),
                ("std", &self.std),
            ],
            &[("pixels", &self.resident)],
        )?)?;
        Ok(crops)
    }

    /// Trunk → TCL head → mask head over all windows at once: the stride-4 masks and kp masks, both left on the
    /// device for PAMR and the labels graph. Intermediates are dropped as soon as the next graph has run, so a
    /// large batch does not hold every stage's activations at once.
    fn run_model(&self, model: &mut ModelGraphs, crops: &DynValue) -> Result<(DynValue, DynValue)> {
        let resident = &self.resident;
        let text = &self
            .text
            .as_ref()
            .ok_or_else(|| anyhow!("the text embeddings are not on the device"))?
            .1;
        let tcl = model.tcl.as_mut().ok_or_else(|| {
            anyhow!("the device path runs TCL's head only, and this bundle has none")
        })?;
        let [tokens] = outputs(run(
            &mut model.trunk,
            "image trunk",
            &[("pixels", crops)],
            &[("tokens", resident)],
        )?)?;
        let [dense, kp_feat] = outputs(run(
            &mut tcl.head,
            "TCL head",
            &[("tokens", &tokens)],
            &[("dense", resident), ("kp_feat", resident)],
        )?)?;
        drop(tokens);
        let [masks, kp_masks] = outputs(run(
            &mut tcl.mask_head,
            "mask head",
            &[("dense", &dense), ("kp_feat", &kp_feat), ("text", text)],
            &[("masks", resident), ("kp_masks", resident)],
        )?)?;
        Ok((masks, kp_masks))
    }

    /// PAMR as the bundle's graph: on the device, the native host PAMR would mean downloading every mask.
    fn refine(&mut self, crops: &DynValue, masks: &DynValue) -> Result<DynValue> {
        let [refined] = outputs(run(
            &mut self.pamr,
            "PAMR",
            &[("pixels", crops), ("masks", masks)],
            &[("refined", &self.resident)],
        )?)?;
        Ok(refined)
    }

    /// The `labels` graph: kp blend, upsampling, averaging of overlapping windows and the resize to the frame
    /// (one matrix product per axis), the background, argmax. Labels and best scores come back to the host; the
    /// full scores only when asked for (they are classes × H × W floats), else they stay on the device unread.
    fn label(
        &mut self,
        at: usize,
        masks: &DynValue,
        kp_masks: &DynValue,
        settings: &SegmentSettings,
    ) -> Result<[DynValue; 3]> {
        let geometry = &self.geometry[at].1;
        let scalar = |v: f32| -> Result<DynValue> { Ok(host_tensor(vec![1], vec![v])?.into_dyn()) };
        let offset = i64::from(settings.background.is_some());
        let label_offset = Tensor::from_array((vec![1usize], vec![offset]))
            .map_err(|e| anyhow!("{e}"))?
            .into_dyn();
        let scores_memory = if settings.keep_scores {
            &self.host
        } else {
            &self.resident
        };
        let wanted = [
            ("labels", &self.host),
            ("best", &self.host),
            ("scores", scores_memory),
        ];
        outputs(run(
            &mut self.labels,
            "labels",
            &[
                ("masks", masks),
                ("kp_masks", kp_masks),
                ("kp_weight", &scalar(settings.kp_weight)?),
                ("rows", &geometry.label_rows),
                ("cols", &geometry.label_cols),
                (
                    "background",
                    &scalar(settings.background.unwrap_or(f32::NEG_INFINITY))?,
                ),
                ("label_offset", &label_offset),
            ],
            &wanted,
        )?)
    }

    /// Puts the text embeddings on the device; uploaded again only when the query set changes.
    fn text_on_device(&mut self, text: &TextEmbeddings) -> Result<()> {
        if matches!(&self.text, Some((data, _)) if *data == text.data) {
            return Ok(());
        }
        let value = upload(
            self.device,
            host_tensor(vec![text.rows, text.dim], text.data.clone())?,
        )?;
        self.text = Some((text.data.clone(), value));
        Ok(())
    }

    /// The index of this frame size's matrices in the cache, built on first use.
    fn geometry(&mut self, manifest: &Manifest, height: usize, width: usize) -> Result<usize> {
        if let Some(at) = self
            .geometry
            .iter()
            .position(|(size, _)| *size == (height, width))
        {
            return Ok(at);
        }
        let built = self
            .build_geometry(manifest, height, width)
            .with_context(|| format!("frame size {width}x{height}"))?;
        if self.geometry.len() == GEOMETRY_CACHE {
            self.geometry.remove(0);
        }
        self.geometry.push(((height, width), built));
        Ok(self.geometry.len() - 1)
    }

    fn build_geometry(&self, manifest: &Manifest, height: usize, width: usize) -> Result<Geometry> {
        let input = &manifest.input;
        let (crop, side) = (input.crop_size, manifest.mask_side());
        let ((h, w), boxes) = windows(height, width, input);
        let rows = distinct(boxes.iter().map(|b| (b.y1, b.y2)));
        let cols = distinct(boxes.iter().map(|b| (b.x1, b.x2)));
        let upload =
            |(shape, data): (Vec<usize>, Vec<f32>)| upload(self.device, host_tensor(shape, data)?);
        Ok(Geometry {
            windows: boxes.len(),
            resized: (h, w),
            crop_rows: upload(crop_matrices(h, &rows, crop))?,
            crop_cols: upload(crop_matrices(w, &cols, crop))?,
            label_rows: upload(label_matrices(height, h, &rows, crop, side))?,
            label_cols: upload(label_matrices(width, w, &cols, crop, side))?,
        })
    }
}

/// The size all `frames` share (width, height), None when there are none: a batch's windows are cut with one
/// frame size's matrices, so mixed sizes are the caller's mistake (the engine groups frames by size).
fn one_size(frames: &[&image::RgbImage]) -> Result<Option<(usize, usize)>> {
    let Some(first) = frames.first() else {
        return Ok(None);
    };
    let (width, height) = (first.width() as usize, first.height() as usize);
    if let Some(other) = frames
        .iter()
        .find(|f| (f.width() as usize, f.height() as usize) != (width, height))
    {
        return Err(anyhow!(
            "the device path needs frames of one size per batch: {}x{} and {}x{}",
            width,
            height,
            other.width(),
            other.height()
        ));
    }
    Ok(Some((width, height)))
}

/// What `assemble` needs to know of a batch to cut the labels graph's outputs into frames.
struct Shape {
    frames: usize,
    width: usize,
    height: usize,
    queries: usize,
}

/// The labels graph's outputs ([I, H, W] labels and best scores, [I, N, H, W] scores) cut into one
/// `Segmentation` per frame, in the form the host path returns (scores with the background plane in front).
fn assemble(
    shape: Shape,
    settings: &SegmentSettings,
    labels: &DynValue,
    best: &DynValue,
    scores: &DynValue,
) -> Result<Vec<Segmentation>> {
    let Shape {
        frames,
        width,
        height,
        queries,
    } = shape;
    let plane = height * width;
    let (_, labels) = labels
        .try_extract_tensor::<u16>()
        .map_err(|e| anyhow!("labels graph output 'labels': {e}"))?;
    let (_, best) = best
        .try_extract_tensor::<f32>()
        .map_err(|e| anyhow!("labels graph output 'best': {e}"))?;
    let scores = if settings.keep_scores {
        Some(
            scores
                .try_extract_tensor::<f32>()
                .map_err(|e| anyhow!("labels graph output 'scores': {e}"))?
                .1,
        )
    } else {
        None
    };
    let classes = queries + usize::from(settings.background.is_some());
    let expected = frames * plane;
    if labels.len() != expected || best.len() != expected {
        return Err(anyhow!(
            "labels graph returned {} labels for {frames} frames of {width}x{height}",
            labels.len(),
        ));
    }
    (0..frames)
        .map(|i| {
            let scores = scores.map(|s| with_background(s, i, queries, plane, settings.background));
            Ok(Segmentation {
                width,
                height,
                classes,
                labels: labels[i * plane..(i + 1) * plane].to_vec(),
                best: best[i * plane..(i + 1) * plane].to_vec(),
                scores,
                query_thresholds: Vec::new(),
            })
        })
        .collect()
}

/// Runs one session through an I/O binding: inputs wherever they are, outputs allocated in the named memory.
fn run(
    session: &mut Session,
    what: &str,
    inputs: &[(&str, &DynValue)],
    outputs: &[(&str, &MemoryInfo<'static>)],
) -> Result<Vec<DynValue>> {
    let fail = |e: ort::Error| anyhow!("{what}: {e}");
    let mut binding = session.create_binding().map_err(fail)?;
    for (name, value) in inputs {
        binding.bind_input(*name, *value).map_err(fail)?;
    }
    for (name, memory) in outputs {
        binding.bind_output_to_device(*name, memory).map_err(fail)?;
    }
    let mut result = session.run_binding(&binding).map_err(fail)?;
    outputs
        .iter()
        .map(|(name, _)| {
            result
                .remove(*name)
                .ok_or_else(|| anyhow!("{what}: output '{name}' missing"))
        })
        .collect()
}

fn outputs<const N: usize>(values: Vec<DynValue>) -> Result<[DynValue; N]> {
    let count = values.len();
    values
        .try_into()
        .map_err(|_| anyhow!("expected {N} outputs, got {count}"))
}

fn host_tensor(shape: Vec<usize>, data: Vec<f32>) -> Result<Tensor<f32>> {
    Tensor::from_array((shape, data)).map_err(|e| anyhow!("{e}"))
}

/// A host tensor moved to where the sessions run (kept in place on the CPU).
fn upload(device: Device, tensor: Tensor<f32>) -> Result<DynValue> {
    if device.is_gpu() {
        let moved = tensor
            .to(AllocationDevice::CUDA, 0)
            .map_err(|e| anyhow!("cannot copy a tensor to the GPU: {e}"))?;
        Ok(moved.into_dyn())
    } else {
        Ok(tensor.into_dyn())
    }
}

/// Frame `i`'s scores [N, H, W] from the graph's [I, N, H, W], with the constant background plane in front when
/// there is one (as the host path returns them).
fn with_background(scores: &[f32], i: usize, n: usize, plane: usize, bg: Option<f32>) -> Vec<f32> {
    let own = &scores[i * n * plane..(i + 1) * n * plane];
    match bg {
        Some(v) => {
            let mut out = vec![v; plane];
            out.extend_from_slice(own);
            out
        }
        None => own.to_vec(),
    }
}
