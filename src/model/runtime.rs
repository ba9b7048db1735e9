//! ONNX Runtime: finding `libonnxruntime`, loading it once per process, and building sessions.
//!
//! `ort` is built with `load-dynamic`: nothing links against ONNX Runtime at build time, and the library is
//! opened here at run time. Any `ort` call before a successful load panics inside `ort`, so every path into ONNX
//! Runtime goes through [`Runtime::get`], which loads the library first and turns failure into an error.
//!
//! Also here, for the sessions it builds: reading a run's output with its shape checked (`output`), the key of
//! the TensorRT engine cache (`tensorrt_cache_dir`), and the thread that logs progress while TensorRT builds an
//! engine for minutes without a word (`Progress`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionOutputs};

use super::bundle::{Bundle, Precision};

/// Where `scripts/setup` puts the library in this source tree: the GPU build (`--gpu`) first, which runs on the
/// CPU as well, then the CPU build.
const SETUP_LIB_DIRS: [&str; 2] = [
    concat!(env!("CARGO_MANIFEST_DIR"), "/.deps/onnxruntime-gpu/lib"),
    concat!(env!("CARGO_MANIFEST_DIR"), "/.deps/onnxruntime/lib"),
];

/// The loaded ONNX Runtime and the process's one `ort` environment.
pub struct Runtime {
    env: Environment,
    library: PathBuf,
}

static RUNTIME: OnceLock<std::result::Result<Runtime, String>> = OnceLock::new();

/// Execution device for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// CUDA, and fail when it can't be had.
    Cuda,
    /// TensorRT for the image graphs (engines built once and cached), CUDA for what TensorRT does not take.
    TensorRt,
}

impl Device {
    pub fn is_gpu(self) -> bool {
        self != Device::Cpu
    }

    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::TensorRt => "tensorrt",
        }
    }
}

/// A graph to load: a bundle's file, or one of the graphs built into the binary.
#[derive(Debug, Clone, Copy)]
pub enum Graph<'a> {
    File(&'a Path),
    Embedded {
        name: &'static str,
        bytes: &'static [u8],
    },
}

impl Graph<'_> {
    fn describe(&self) -> String {
        match self {
            Graph::File(path) => path.display().to_string(),
            Graph::Embedded { name, .. } => format!("{name} (built in)"),
        }
    }
}

/// How a session runs.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    pub device: Device,
    /// Intra-op threads (0 = ONNX Runtime's default).
    pub threads: usize,
    /// Idle intra-op threads busy-wait for the next op (fastest when the model has the cores to itself, as in
    /// `segment`); off, they sleep and leave the cores to decoders and writers (the daemon).
    pub spin: bool,
    /// CUDA may run fp32 matrix products as TF32 (10-bit mantissa). Off for fp32 graphs, whose numbers must
    /// match the reference; on for fp16 runs, whose inputs are rounded harder than that anyway.
    pub tf32: bool,
    /// CPU only: let MLAS run fp32 matrix products in bf16 (ONNX Runtime's ARM64 fast math; `Precision::Bf16`).
    pub bf16_fastmath: bool,
    /// TensorRT only: where engines are cached, and the largest batch the engine's profile covers.
    pub tensorrt: Option<TensorRtSpec>,
}

impl SessionSpec {
    pub fn cpu(threads: usize) -> SessionSpec {
        SessionSpec {
            device: Device::Cpu,
            threads,
            spin: true,
            tf32: false,
            bf16_fastmath: false,
            tensorrt: None,
        }
    }

    /// The same settings with TensorRT replaced by plain CUDA, for graphs TensorRT would not help (small ones,
    /// or ones whose shapes vary beyond one optimisation profile).
    pub fn without_tensorrt(&self) -> SessionSpec {
        SessionSpec {
            device: if self.device == Device::TensorRt {
                Device::Cuda
            } else {
                self.device
            },
            tensorrt: None,
            ..self.clone()
        }
    }
}

/// TensorRT engine settings for one graph.
#[derive(Debug, Clone)]
pub struct TensorRtSpec {
    /// Folder for this bundle's engines, keyed by bundle, GPU and runtime (see `Engine::new`).
    pub cache_dir: PathBuf,
    pub fp16: bool,
    /// Optimisation profile: input name, its shape without the batch axis, and the largest batch.
    pub profile: Option<(String, Vec<usize>, usize)>,
}

impl Runtime {
    /// The process's runtime, loading the library on first use.
    pub fn get() -> Result<&'static Runtime> {
        RUNTIME
            .get_or_init(|| Runtime::load().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    fn load() -> Result<Runtime> {
        let candidates = library_candidates();
        let Some(library) = candidates.iter().find(|p| p.is_file()).cloned() else {
            let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            bail!(
                "ONNX Runtime library not found (tried: {}). Run scripts/setup, or set ORT_DYLIB_PATH to a \
                 libonnxruntime.so of version 1.31 or newer",
                tried.join(", ")
            );
        };
        // LoadDynamicError must not be turned into ort::Error: creating an ort::Error calls into the C API,
        // which would try to load the default library and panic.
        let builder = ort::init_from(&library)
            .map_err(|e| anyhow!("cannot load ONNX Runtime from {}: {e}", library.display()))?;
        let env = builder
            .with_name("tclseg")
            .with_telemetry(false)
            .build()
            .map_err(|e| anyhow!("cannot create the ONNX Runtime environment: {e}"))?;
        tracing::debug!(library = %library.display(), "ONNX Runtime loaded");
        Ok(Runtime { env, library })
    }

    pub fn library(&self) -> &Path {
        &self.library
    }

    /// A session for one graph.
    ///
    /// CUDA and TensorRT are requested with `error_on_failure`: a missing library or a CPU-only build is an error
    /// that names the cause, never a silent fall-back to the CPU. Callers that want "auto" catch it and decide.
    pub fn session(&self, graph: Graph<'_>, spec: &SessionSpec) -> Result<Session> {
        if spec.device.is_gpu() {
            super::cuda::prepare(&self.library, spec.device == Device::TensorRt)?;
        }
        let mut builder = Session::builder(&self.env)
            .map_err(|e| anyhow!("{e}"))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| anyhow!("{e}"))?;
        if spec.threads > 0 {
            builder = builder
                .with_intra_threads(spec.threads)
                .map_err(|e| anyhow!("{e}"))?;
        }
        if !spec.spin {
            builder = builder
                .with_intra_op_spinning(false)
                .map_err(|e| anyhow!("{e}"))?;
        }
        if spec.bf16_fastmath {
            builder = builder
                .with_config_entry("mlas.enable_gemm_fastmath_arm64_bfloat16", "1")
                .map_err(|e| anyhow!("{e}"))?;
        }
        let cuda = || {
            ort::ep::CUDA::default()
                .with_tf32(spec.tf32)
                .build()
                .error_on_failure()
        };
        builder = match (spec.device, &spec.tensorrt) {
            (Device::TensorRt, Some(trt)) => {
                let mut ep = ort::ep::TensorRT::default()
                    .with_fp16(trt.fp16)
                    .with_engine_cache(true)
                    .with_engine_cache_path(trt.cache_dir.display().to_string())
                    .with_timing_cache(true)
                    .with_timing_cache_path(trt.cache_dir.display().to_string())
                    .with_layer_norm_fp32_fallback(true);
                if let Some((input, shape, max_batch)) = &trt.profile {
                    let dims = |batch: usize| {
                        let rest: Vec<String> = shape.iter().map(usize::to_string).collect();
                        format!("{input}:{batch}x{}", rest.join("x"))
                    };
                    ep = ep
                        .with_profile_min_shapes(dims(1))
                        .with_profile_opt_shapes(dims((*max_batch).div_ceil(2).max(1)))
                        .with_profile_max_shapes(dims(*max_batch));
                }
                builder
                    .with_execution_providers([ep.build().error_on_failure(), cuda()])
                    .map_err(|e| anyhow!("TensorRT execution provider unavailable: {e}"))?
            }
            (Device::Cuda | Device::TensorRt, _) => builder
                .with_execution_providers([cuda()])
                .map_err(|e| anyhow!("CUDA execution provider unavailable: {e}"))?,
            // No arena on the CPU: batches vary in size, and an arena keeps the largest one's memory forever.
            (Device::Cpu, _) => builder
                .with_execution_providers([ort::ep::CPU::default()
                    .with_arena_allocator(false)
                    .build()])
                .map_err(|e| anyhow!("{e}"))?,
        };
        let committed = match graph {
            Graph::File(path) => builder.commit_from_file(path),
            Graph::Embedded { bytes, .. } => builder.commit_from_memory(bytes),
        };
        committed
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("cannot load ONNX graph {}", graph.describe()))
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

/// `$XDG_CACHE_HOME/tclseg/tensorrt/<bundle>-<manifest hash>-<precision>-<GPU models>-<ONNX Runtime>`: an engine
/// is only valid for the graph, the GPU model and the TensorRT/ONNX Runtime that built it, so each of them is in
/// the key and a change builds afresh instead of loading a stale engine. (systemd: `CacheDirectory=tclseg` with
/// `XDG_CACHE_HOME=%C`.)
pub(crate) fn tensorrt_cache_dir(
    bundle: &Bundle,
    manifest_sha256: &str,
    runtime: &Runtime,
    precision: Precision,
) -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
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
pub(crate) struct Progress {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    pub fn start(what: String) -> Progress {
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

/// Library locations, in the order they are tried:
/// 1. `ORT_DYLIB_PATH` (a file, as `ort` itself reads it): when set, it is the only candidate, so a wrong
///    value is reported rather than quietly replaced by another library;
/// 2. next to the executable, and in `lib/` beside it (an installed layout);
/// 3. the `.deps/onnxruntime-gpu/lib` and `.deps/onnxruntime/lib` that `scripts/setup` fills in this source tree.
fn library_candidates() -> Vec<PathBuf> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return vec![PathBuf::from(path)];
    }
    let mut out = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        out.push(dir.join("libonnxruntime.so"));
        out.push(dir.join("lib").join("libonnxruntime.so"));
    }
    out.extend(
        SETUP_LIB_DIRS
            .iter()
            .map(|dir| Path::new(dir).join("libonnxruntime.so")),
    );
    out
}
