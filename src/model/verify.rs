//! One crop through every graph of a bundle: the check behind `tclseg models verify`.
//!
//! It feeds a deterministic synthetic crop and the empty prompt (SOT, EOT) through
//! text encoder → trunk → TCL head → mask head (and each training-free head) → PAMR, and checks that every output has the shape
//! ARCHITECTURE.md promises and holds finite numbers (masks within [0, 1]). It proves the bundle loads and runs
//! on this machine's ONNX Runtime; numerical parity with the PyTorch reference is the parity tests' job.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use ort::session::Session;
use ort::value::Tensor;

use super::bundle::{Bundle, HeadKind, Precision};
use super::runtime::{Graph, Runtime, SessionSpec};

/// What one graph did in the verify run.
#[derive(Debug, Clone)]
pub struct GraphRun {
    pub role: String,
    pub precision: Precision,
    pub load_ms: f64,
    pub run_ms: f64,
    pub outputs: Vec<(String, Vec<usize>)>,
}

/// A dense f32 tensor on the host.
struct HostTensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl HostTensor {
    fn to_ort(&self) -> Result<Tensor<f32>> {
        Tensor::from_array((self.shape.clone(), self.data.clone())).map_err(|e| anyhow!("{e}"))
    }
}

/// Runs one crop through all graphs at `precision` (roles without that precision use fp32).
pub fn run_one_crop(
    bundle: &Bundle,
    precision: Precision,
    threads: usize,
) -> Result<Vec<GraphRun>> {
    let runtime = Runtime::get()?;
    let m = bundle.manifest();
    let crop = m.input.crop_size;
    let grid = m.crop_grid();
    let side = m.mask_side();
    let embed = m.architecture.embed_dim;
    let width = m.architecture.vision_width;
    let mut runs = Vec::new();

    let graph = |role: &str| {
        bundle
            .graph_or_fp32(role, precision)
            .ok_or_else(|| anyhow!("bundle {} has no '{role}' graph", bundle.dir().display()))
    };
    let used = |role: &str| {
        if bundle.graph(role, precision).is_some() {
            precision
        } else {
            Precision::Fp32
        }
    };

    // Text: [SOT, EOT, 0, ...] is the empty prompt.
    let ctx = m.architecture.context_length;
    let mut tokens = vec![0i64; ctx];
    tokens[0] = m.text.sot_token;
    tokens[1] = m.text.eot_token;
    let tokens = Tensor::from_array((vec![1usize, ctx], tokens)).map_err(|e| anyhow!("{e}"))?;
    let (mut session, load_ms) = load(runtime, &graph("text_encoder")?, threads)?;
    let start = Instant::now();
    let out = session
        .run(ort::inputs!["tokens" => tokens])
        .map_err(|e| anyhow!("text_encoder: {e}"))?;
    let text = take(&out, "text_emb", "text_encoder", &[1, embed])?;
    runs.push(record(
        "text_encoder",
        used("text_encoder"),
        load_ms,
        start,
        &[("text_emb", &text)],
    ));
    let text = l2_normalize_rows(text);

    // Image: a smooth synthetic pattern, already "normalized".
    let pixels = HostTensor {
        shape: vec![1, 3, crop, crop],
        data: (0..3 * crop * crop)
            .map(|i| {
                let (c, rest) = (i / (crop * crop), i % (crop * crop));
                let (y, x) = (rest / crop, rest % crop);
                ((x as f32 * 0.031 + y as f32 * 0.017 + c as f32).sin()) * 1.5
            })
            .collect(),
    };

    let (mut session, load_ms) = load(runtime, &graph("image_trunk")?, threads)?;
    let start = Instant::now();
    let out = session
        .run(ort::inputs!["pixels" => pixels.to_ort()?])
        .map_err(|e| anyhow!("image_trunk: {e}"))?;
    let trunk = take(&out, "tokens", "image_trunk", &[1, 1 + grid * grid, width])?;
    runs.push(record(
        "image_trunk",
        used("image_trunk"),
        load_ms,
        start,
        &[("tokens", &trunk)],
    ));

    // PAMR below refines the TCL masks, else a flat 0.5 mask (a bundle of training-free heads only).
    let mut masks = HostTensor {
        shape: vec![1, 1, side, side],
        data: vec![0.5; side * side],
    };
    for name in m.head_names() {
        let Some(spec) = m.head_spec(name) else {
            continue;
        };
        if spec.kind == HeadKind::Tcl {
            masks = run_tcl(runtime, &mut runs, &graph, &used, threads, &trunk, &text, m)?;
            continue;
        }
        let role = spec.graph.as_str();
        let (mut session, load_ms) = load(runtime, &graph(role)?, threads)?;
        let start = Instant::now();
        let out = session
            .run(ort::inputs!["tokens" => trunk.to_ort()?])
            .map_err(|e| anyhow!("{role}: {e}"))?;
        let dense = take(&out, "dense", role, &[1, embed, grid, grid])?;
        check_unit_norm(&dense, embed, grid * grid, role)?;
        runs.push(record(
            role,
            used(role),
            load_ms,
            start,
            &[("dense", &dense)],
        ));
    }

    let (mut session, load_ms) = load(runtime, &graph("pamr")?, threads)?;
    let start = Instant::now();
    let out = session
        .run(ort::inputs!["pixels" => pixels.to_ort()?, "masks" => masks.to_ort()?])
        .map_err(|e| anyhow!("pamr: {e}"))?;
    let refined = take(&out, "refined", "pamr", &[1, 1, side, side])?;
    check_unit_interval(&refined, "pamr", "refined")?;
    runs.push(record(
        "pamr",
        used("pamr"),
        load_ms,
        start,
        &[("refined", &refined)],
    ));

    Ok(runs)
}

/// TCL's head and mask head on the trunk's tokens; returns the masks.
#[allow(clippy::too_many_arguments)]
fn run_tcl(
    runtime: &Runtime,
    runs: &mut Vec<GraphRun>,
    graph: &dyn Fn(&str) -> Result<std::path::PathBuf>,
    used: &dyn Fn(&str) -> Precision,
    threads: usize,
    trunk: &HostTensor,
    text: &HostTensor,
    m: &super::bundle::Manifest,
) -> Result<HostTensor> {
    let (grid, side, embed) = (m.crop_grid(), m.mask_side(), m.architecture.embed_dim);
    let (mut session, load_ms) = load(runtime, &graph("tcl_head")?, threads)?;
    let start = Instant::now();
    let out = session
        .run(ort::inputs!["tokens" => trunk.to_ort()?])
        .map_err(|e| anyhow!("tcl_head: {e}"))?;
    let dense = take(&out, "dense", "tcl_head", &[1, embed, side, side])?;
    let kp_feat = take(&out, "kp_feat", "tcl_head", &[1, embed, grid, grid])?;
    runs.push(record(
        "tcl_head",
        used("tcl_head"),
        load_ms,
        start,
        &[("dense", &dense), ("kp_feat", &kp_feat)],
    ));

    let (mut session, load_ms) = load(runtime, &graph("mask_head")?, threads)?;
    let start = Instant::now();
    let out = session
        .run(ort::inputs![
            "dense" => dense.to_ort()?,
            "kp_feat" => kp_feat.to_ort()?,
            "text" => text.to_ort()?,
        ])
        .map_err(|e| anyhow!("mask_head: {e}"))?;
    let masks = take(&out, "masks", "mask_head", &[1, 1, side, side])?;
    let kp_masks = take(&out, "kp_masks", "mask_head", &[1, 1, side, side])?;
    check_unit_interval(&masks, "mask_head", "masks")?;
    check_unit_interval(&kp_masks, "mask_head", "kp_masks")?;
    runs.push(record(
        "mask_head",
        used("mask_head"),
        load_ms,
        start,
        &[("masks", &masks), ("kp_masks", &kp_masks)],
    ));

    Ok(masks)
}

/// Every patch's feature has unit length (the head graphs normalize).
fn check_unit_norm(t: &HostTensor, dim: usize, cells: usize, graph: &str) -> Result<()> {
    for c in 0..cells {
        let norm: f32 = (0..dim)
            .map(|e| t.data[e * cells + c].powi(2))
            .sum::<f32>()
            .sqrt();
        if (norm - 1.0).abs() > 1e-2 {
            bail!("graph {graph} output 'dense' has a feature of length {norm} at cell {c}, not 1");
        }
    }
    Ok(())
}

fn load(runtime: &Runtime, graph: &Path, threads: usize) -> Result<(Session, f64)> {
    let start = Instant::now();
    let session = runtime.session(Graph::File(graph), &SessionSpec::cpu(threads))?;
    Ok((session, start.elapsed().as_secs_f64() * 1e3))
}

/// Copies output `name` out of a run after the engine's shape check, and checks every value is finite.
fn take(
    outputs: &ort::session::SessionOutputs<'_>,
    name: &str,
    graph: &str,
    expected: &[usize],
) -> Result<HostTensor> {
    let data = super::runtime::output(outputs, name, expected)
        .with_context(|| format!("graph {graph}"))?;
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        bail!("graph {graph} output '{name}' holds a non-finite value at flat index {i}");
    }
    Ok(HostTensor {
        shape: expected.to_vec(),
        data: data.to_vec(),
    })
}

fn check_unit_interval(t: &HostTensor, graph: &str, name: &str) -> Result<()> {
    if let Some(v) = t.data.iter().find(|v| !(0.0..=1.0).contains(*v)) {
        bail!("graph {graph} output '{name}' holds {v}, outside [0, 1]");
    }
    Ok(())
}

fn l2_normalize_rows(mut t: HostTensor) -> HostTensor {
    let cols = t.shape.last().copied().unwrap_or(1).max(1);
    t.data.chunks_mut(cols).for_each(super::engine::normalize);
    t
}

fn record(
    role: &str,
    precision: Precision,
    load_ms: f64,
    start: Instant,
    outputs: &[(&str, &HostTensor)],
) -> GraphRun {
    GraphRun {
        role: role.to_string(),
        precision,
        load_ms,
        run_ms: start.elapsed().as_secs_f64() * 1e3,
        outputs: outputs
            .iter()
            .map(|(name, t)| (name.to_string(), t.shape.clone()))
            .collect(),
    }
}

/// Loads every graph of every precision the bundle lists (catches a graph the verify run would not touch).
pub fn load_all_graphs(bundle: &Bundle, threads: usize) -> Result<usize> {
    let runtime = Runtime::get()?;
    let mut count = 0;
    for (role, by_precision) in &bundle.manifest().graphs {
        for (precision, file) in by_precision {
            runtime
                .session(
                    Graph::File(&bundle.dir().join(file)),
                    &SessionSpec::cpu(threads),
                )
                .with_context(|| format!("graph '{role}' ({precision})"))?;
            count += 1;
        }
    }
    Ok(count)
}
