//! ONNX Runtime: finding `libonnxruntime`, loading it once per process, and building sessions.
//!
//! `ort` is built with `load-dynamic`: nothing links against ONNX Runtime at build time, and the library is
//! opened here at run time. Any `ort` call before a successful load panics inside `ort`, so every path into ONNX
//! Runtime goes through [`Runtime::get`], which loads the library first and turns failure into an error.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;

/// Where `scripts/setup` puts the library in this source tree.
const SETUP_LIB_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.deps/onnxruntime/lib");

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

    /// A session for one graph file, with `threads` intra-op threads (0 = ONNX Runtime's default). `spin`: idle
    /// intra-op threads busy-wait for the next op (fastest when the model has the cores to itself, as in
    /// `segment`); off, they sleep and leave the cores to decoders and writers (the daemon).
    ///
    /// CUDA is requested with `error_on_failure`: a missing CUDA library or a CPU-only build is an error that
    /// names the cause, never a silent fall-back to the CPU. Callers that want "auto" catch it and decide.
    pub fn session(
        &self,
        graph: &Path,
        device: Device,
        threads: usize,
        spin: bool,
    ) -> Result<Session> {
        let mut builder = Session::builder(&self.env)
            .map_err(|e| anyhow!("{e}"))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| anyhow!("{e}"))?;
        if threads > 0 {
            builder = builder
                .with_intra_threads(threads)
                .map_err(|e| anyhow!("{e}"))?;
        }
        if !spin {
            builder = builder
                .with_intra_op_spinning(false)
                .map_err(|e| anyhow!("{e}"))?;
        }
        builder = match device {
            Device::Cuda => builder
                .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
                .map_err(|e| anyhow!("CUDA execution provider unavailable: {e}"))?,
            // No arena on the CPU: batches vary in size, and an arena keeps the largest one's memory forever.
            Device::Cpu => builder
                .with_execution_providers([ort::ep::CPU::default()
                    .with_arena_allocator(false)
                    .build()])
                .map_err(|e| anyhow!("{e}"))?,
        };
        builder
            .commit_from_file(graph)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("cannot load ONNX graph {}", graph.display()))
    }
}

/// Library locations, in the order they are tried:
/// 1. `ORT_DYLIB_PATH` (a file, as `ort` itself reads it): when set, it is the only candidate, so a wrong
///    value is reported rather than quietly replaced by another library;
/// 2. next to the executable, and in `lib/` beside it (an installed layout);
/// 3. the `.deps/onnxruntime/lib` that `scripts/setup` fills in this source tree.
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
    out.push(Path::new(SETUP_LIB_DIR).join("libonnxruntime.so"));
    out
}
