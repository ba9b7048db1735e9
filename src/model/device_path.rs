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

use super::bundle::{Bundle, Manifest};
use super::preprocess::{pixel_statistics, rescale, windows};
use super::resample::{AxisWeights, Coordinates};
use super::runtime::{Device, Graph, Runtime, SessionSpec};
use super::types::{ModelGraphs, SegmentSettings, Segmentation, TextEmbeddings};

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

    /// Segments frames of one size: their windows run through the model as one batch.
    pub fn segment(
        &mut self,
        model: &mut ModelGraphs,
        manifest: &Manifest,
        frames: &[&image::RgbImage],
        text: &TextEmbeddings,
        settings: &SegmentSettings,
    ) -> Result<Vec<Segmentation>> {
        let Some(first) = frames.first() else {
            return Ok(Vec::new());
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
        let t0 = Instant::now();
        let at = self.geometry(manifest, height, width)?;
        self.text_on_device(text)?;
        let DevicePath {
            crops: crops_session,
            labels: labels_session,
            pamr: pamr_session,
            resident,
            host,
            mean,
            std,
            geometry,
            text: resident_text,
            ..
        } = self;
        let geometry = &geometry[at].1;
        let text_value = &resident_text.as_ref().expect("uploaded above").1;
        let windows = geometry.windows;
        let (h, w) = geometry.resized;
        let mut pixels = Vec::with_capacity(frames.len() * h * w * 3);
        for frame in frames {
            pixels.extend_from_slice(rescale(frame, &manifest.input).as_raw());
        }
        let image = Tensor::from_array((vec![frames.len(), h, w, 3], pixels))
            .map_err(|e| anyhow!("{e}"))?
            .into_dyn();
        let crops = run(
            crops_session,
            "crops",
            &[
                ("image", &image),
                ("rows", &geometry.crop_rows),
                ("cols", &geometry.crop_cols),
                ("mean", &*mean),
                ("std", &*std),
            ],
            &[("pixels", &*resident)],
        )?;
        let [crops] = outputs(crops)?;
        let t1 = Instant::now();
        let [tokens] = outputs(run(
            &mut model.trunk,
            "image trunk",
            &[("pixels", &crops)],
            &[("tokens", &*resident)],
        )?)?;
        let [dense, kp_feat] = outputs(run(
            &mut model.head,
            "TCL head",
            &[("tokens", &tokens)],
            &[("dense", &*resident), ("kp_feat", &*resident)],
        )?)?;
        drop(tokens);
        let [masks, kp_masks] = outputs(run(
            &mut model.mask_head,
            "mask head",
            &[
                ("dense", &dense),
                ("kp_feat", &kp_feat),
                ("text", text_value),
            ],
            &[("masks", &*resident), ("kp_masks", &*resident)],
        )?)?;
        drop((dense, kp_feat));
        let t2 = Instant::now();
        let masks = if settings.pamr {
            let [refined] = outputs(run(
                pamr_session,
                "PAMR",
                &[("pixels", &crops), ("masks", &masks)],
                &[("refined", &*resident)],
            )?)?;
            refined
        } else {
            masks
        };
        let t3 = Instant::now();
        let scalar = |v: f32| -> Result<DynValue> { Ok(host_tensor(vec![1], vec![v])?.into_dyn()) };
        let offset = i64::from(settings.background.is_some());
        let label_offset = Tensor::from_array((vec![1usize], vec![offset]))
            .map_err(|e| anyhow!("{e}"))?
            .into_dyn();
        let scores_memory: &MemoryInfo<'static> =
            if settings.keep_scores { host } else { resident };
        let wanted = [
            ("labels", &*host),
            ("best", &*host),
            ("scores", scores_memory),
        ];
        let out = run(
            labels_session,
            "labels",
            &[
                ("masks", &masks),
                ("kp_masks", &kp_masks),
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
        )?;
        let [labels, best, scores] = outputs(out)?;
        let t4 = Instant::now();
        tracing::trace!(
            frames = frames.len(),
            windows = windows * frames.len(),
            "device path (ms): crops {:.1}, model {:.1}, PAMR {:.1}, labels {:.1}",
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3,
            (t3 - t2).as_secs_f64() * 1e3,
            (t4 - t3).as_secs_f64() * 1e3
        );

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
        let classes = text.rows + usize::from(settings.background.is_some());
        let expected = frames.len() * plane;
        if labels.len() != expected || best.len() != expected {
            return Err(anyhow!(
                "labels graph returned {} labels for {} frames of {width}x{height}",
                labels.len(),
                frames.len()
            ));
        }
        (0..frames.len())
            .map(|i| {
                let scores =
                    scores.map(|s| with_background(s, i, text.rows, plane, settings.background));
                Ok(Segmentation {
                    width,
                    height,
                    classes,
                    labels: labels[i * plane..(i + 1) * plane].to_vec(),
                    best: best[i * plane..(i + 1) * plane].to_vec(),
                    scores,
                })
            })
            .collect()
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

/// The distinct spans along one axis, in window order.
fn distinct(spans: impl Iterator<Item = (usize, usize)>) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for span in spans {
        if !out.contains(&span) {
            out.push(span);
        }
    }
    out
}

/// Dense [out, in] matrix of one axis' bilinear half-pixel resampling.
fn resample_matrix(input: usize, output: usize) -> Vec<f32> {
    let axis = AxisWeights::new(input, output, Coordinates::HalfPixel);
    let mut m = vec![0f32; output * input];
    for o in 0..output {
        m[o * input + axis.lo[o]] += 1.0 - axis.frac[o];
        m[o * input + axis.hi[o]] += axis.frac[o];
    }
    m
}

/// [windows, crop, resized] of 0/1: take the window's span of the resized frame, centre it in the crop (the
/// graph zeroes the rows left empty, padding a short window with the normalized mean colour). Selecting whole
/// grey levels is exact in any float arithmetic, TF32 included. Mirrors `device_graphs.crop_matrices`.
fn crop_matrices(resized: usize, spans: &[(usize, usize)], crop: usize) -> (Vec<usize>, Vec<f32>) {
    let mut out = vec![0f32; spans.len() * crop * resized];
    for (k, &(a, b)) in spans.iter().enumerate() {
        let top = (crop - (b - a)) / 2;
        for y in a..b {
            out[(k * crop + top + y - a) * resized + y] = 1.0;
        }
    }
    (vec![spans.len(), crop, resized], out)
}

/// [windows, size, side]: upsample side→crop, place the window, divide by the number of windows covering each
/// row, resize resized→size. Mirrors `device_graphs.label_matrices`.
fn label_matrices(
    size: usize,
    resized: usize,
    spans: &[(usize, usize)],
    crop: usize,
    side: usize,
) -> (Vec<usize>, Vec<f32>) {
    let up = resample_matrix(side, crop);
    let final_axis = AxisWeights::new(resized, size, Coordinates::HalfPixel);
    let mut count = vec![0f32; resized];
    for &(a, b) in spans {
        count[a..b].iter_mut().for_each(|c| *c += 1.0);
    }
    let mut out = vec![0f32; spans.len() * size * side];
    for (k, &(a, b)) in spans.iter().enumerate() {
        let top = (crop - (b - a)) / 2;
        for o in 0..size {
            let taps = [
                (final_axis.lo[o], 1.0 - final_axis.frac[o]),
                (final_axis.hi[o], final_axis.frac[o]),
            ];
            let row = &mut out[(k * size + o) * side..(k * size + o + 1) * side];
            for (y, weight) in taps {
                if y < a || y >= b || weight == 0.0 {
                    continue;
                }
                let w = weight / count[y];
                let i = y - a + top;
                for (r, u) in row.iter_mut().zip(&up[i * side..(i + 1) * side]) {
                    *r += w * u;
                }
            }
        }
    }
    (vec![spans.len(), size, side], out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_rows_select_and_centre_the_window() {
        // 4 resized rows, one window of 2 rows (2..4) centred in a crop of 4: rows 1..3.
        let (shape, m) = crop_matrices(4, &[(2, 4)], 4);
        assert_eq!(shape, vec![1, 4, 4]);
        let row = |r: usize| &m[r * 4..(r + 1) * 4];
        assert_eq!(row(0), &[0.0; 4]);
        assert_eq!(row(1), &[0.0, 0.0, 1.0, 0.0]);
        assert_eq!(row(2), &[0.0, 0.0, 0.0, 1.0]);
        assert_eq!(row(3), &[0.0; 4]);
    }

    #[test]
    fn label_rows_average_overlapping_windows() {
        // Two windows of 4 over 6 rows overlapping on rows 2..4, no resizing anywhere (side = crop = 4).
        let (shape, m) = label_matrices(6, 6, &[(0, 4), (2, 6)], 4, 4);
        assert_eq!(shape, vec![2, 6, 4]);
        let at = |k: usize, o: usize, j: usize| m[(k * 6 + o) * 4 + j];
        assert_eq!(at(0, 0, 0), 1.0);
        assert_eq!(at(0, 2, 2), 0.5);
        assert_eq!(at(1, 2, 0), 0.5);
        assert_eq!(at(1, 5, 3), 1.0);
        assert_eq!(at(0, 5, 3), 0.0);
        // Every output row's weights sum to 1 over both windows.
        for o in 0..6 {
            let total: f32 = (0..2)
                .flat_map(|k| (0..4).map(move |j| (k, j)))
                .map(|(k, j)| at(k, o, j))
                .sum();
            assert!((total - 1.0).abs() < 1e-6, "row {o}: {total}");
        }
    }
}
