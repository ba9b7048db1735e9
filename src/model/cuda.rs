//! Getting the GPU libraries in place before ONNX Runtime's CUDA or TensorRT provider loads.
//!
//! The CUDA provider (`libonnxruntime_providers_cuda.so`, shipped beside the GPU build of `libonnxruntime`) needs
//! CUDA 13 and cuDNN 9. When one of them is missing, ONNX Runtime reports only the first unresolved name, deep
//! inside a provider error, and only when asked not to fall back silently. So this module checks first: it loads
//! every library the provider needs, in dependency order, from the folders `scripts/setup --gpu` fills (or
//! `TCLSEG_CUDA_LIB_DIR`), else from the system's search path, and names the first one it cannot load together
//! with what to do. Loaded once, the libraries stay for the life of the process, and the provider's own
//! dependencies resolve to them by soname: no `LD_LIBRARY_PATH` needed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Result};

/// Where `scripts/setup --gpu` puts the CUDA and cuDNN libraries in this source tree.
const SETUP_CUDA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.deps/cuda/lib");

/// The NVIDIA driver's library. It comes with the driver, never from a package of ours.
pub const DRIVER_LIBRARY: &str = "libcuda.so.1";

/// What the CUDA provider of ONNX Runtime 1.31 loads, in dependency order: CUDA 13 runtime, cuBLAS, cuRAND,
/// cuFFT, then cuDNN 9 and the parts of it that it opens itself.
pub const CUDA_LIBRARIES: &[&str] = &[
    "libcudart.so.13",
    "libcublasLt.so.13",
    "libcublas.so.13",
    "libcurand.so.10",
    "libcufft.so.12",
    "libcudnn.so.9",
    "libcudnn_graph.so.9",
    "libcudnn_ops.so.9",
    "libcudnn_heuristic.so.9",
    "libcudnn_engines_precompiled.so.9",
    "libcudnn_engines_runtime_compiled.so.9",
    "libcudnn_cnn.so.9",
    "libcudnn_adv.so.9",
];

/// Loaded when present, not required: cuDNN compiles some of its engines at run time with NVRTC. NVRTC's
/// builtins library is named after its minor version and is not found through NVRTC's own RUNPATH (it has
/// none), so it is loaded first, by pattern.
const OPTIONAL_LIBRARIES: &[&str] = &["libnvrtc-builtins.so.13.", "libnvrtc.so.13"];

/// What the TensorRT provider needs on top of CUDA: TensorRT 10 (it opens the plugin library by name as it runs).
pub const TENSORRT_LIBRARIES: &[&str] = &[
    "libnvinfer.so.10",
    "libnvinfer_plugin.so.10",
    "libnvonnxparser.so.10",
];

/// The provider library that only the GPU build of ONNX Runtime has.
pub const CUDA_PROVIDER: &str = "libonnxruntime_providers_cuda.so";
pub const TENSORRT_PROVIDER: &str = "libonnxruntime_providers_tensorrt.so";

/// Folders searched for the CUDA libraries, in order: `TCLSEG_CUDA_LIB_DIR` (colon-separated; e.g. where TensorRT
/// is), `lib/cuda` beside the executable (an installed layout), and the `.deps/cuda/lib` of this source tree.
pub fn library_dirs() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::env::var_os("TCLSEG_CUDA_LIB_DIR")
        .map(|dirs| std::env::split_paths(&dirs).collect())
        .unwrap_or_default();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        out.push(dir.join("lib").join("cuda"));
    }
    out.push(PathBuf::from(SETUP_CUDA_DIR));
    out
}

/// Checks that `ort_library`'s folder holds the GPU providers asked for and loads their libraries, once per
/// process (later calls return the first call's outcome).
pub fn prepare(ort_library: &Path, tensorrt: bool) -> Result<()> {
    static CUDA: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    static TENSORRT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    let dirs = library_dirs();
    let check = |provider: &str, libraries: &[&str]| -> std::result::Result<(), String> {
        provider_present(ort_library, provider).map_err(|e| format!("{e:#}"))?;
        load_all(libraries, &dirs, true)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    };
    let mut needed = vec![DRIVER_LIBRARY];
    needed.extend_from_slice(CUDA_LIBRARIES);
    CUDA.get_or_init(|| {
        check(CUDA_PROVIDER, &needed)?;
        load_optional(&dirs);
        Ok(())
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))?;
    if tensorrt {
        TENSORRT
            .get_or_init(|| check(TENSORRT_PROVIDER, TENSORRT_LIBRARIES))
            .clone()
            .map_err(|e| anyhow::anyhow!(e))?;
    }
    Ok(())
}

/// The GPU build of ONNX Runtime ships its providers as libraries beside `libonnxruntime.so`; the CPU build
/// does not.
fn provider_present(ort_library: &Path, provider: &str) -> Result<()> {
    let dir = ort_library.parent().unwrap_or(Path::new("."));
    if dir.join(provider).is_file() {
        return Ok(());
    }
    bail!(
        "the ONNX Runtime at {} has no {provider} beside it: it is the CPU-only build. Run `scripts/setup --gpu` \
         (it installs the GPU build in .deps/onnxruntime-gpu), or point ORT_DYLIB_PATH at the libonnxruntime.so \
         of the onnxruntime-gpu 1.31 wheel",
        ort_library.display()
    )
}

/// Loads `libraries` in order: from the first of `dirs` that has the file, else (when `system`) by name through
/// the system's search path. The first failure is an error naming the library, where it looked and what to do.
pub fn load_all(libraries: &[&str], dirs: &[PathBuf], system: bool) -> Result<Vec<PathBuf>> {
    let mut loaded = Vec::new();
    for &name in libraries {
        let found = dirs.iter().map(|d| d.join(name)).find(|p| p.exists());
        let target = found.clone().unwrap_or_else(|| PathBuf::from(name));
        if found.is_none() && !system {
            bail!("{}", missing_message(name, dirs, None));
        }
        match open_global(&target) {
            Ok(()) => loaded.push(target),
            Err(reason) => bail!("{}", missing_message(name, dirs, Some((&target, &reason)))),
        }
    }
    Ok(loaded)
}

/// Loads the optional libraries found in `dirs` (a name ending in '.' is a prefix); a failure is logged only.
fn load_optional(dirs: &[PathBuf]) {
    for prefix in OPTIONAL_LIBRARIES {
        let found = dirs.iter().find_map(|dir| {
            std::fs::read_dir(dir)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name().and_then(|f| f.to_str()).is_some_and(|f| {
                        f == *prefix || (prefix.ends_with('.') && f.starts_with(prefix))
                    })
                })
        });
        if let Some(path) = found {
            if let Err(reason) = open_global(&path) {
                tracing::warn!("cannot load {}: {reason}", path.display());
            }
        }
    }
}

/// dlopen with RTLD_NOW | RTLD_GLOBAL, kept open for the life of the process.
/// Whether this machine has an NVIDIA driver this process can see: its kernel module's `/proc` folder, or the
/// driver's user-space library. Without one, `device = auto` running on the CPU is the expected outcome, not a
/// problem worth a warning.
pub fn nvidia_driver_present() -> bool {
    if Path::new("/proc/driver/nvidia").exists() {
        return true;
    }
    use libloading::os::unix::{Library, RTLD_LAZY, RTLD_LOCAL};
    // SAFETY: as in `open_global`: NVIDIA's driver library, loaded as the CUDA runtime would load it; it is
    // unloaded again at once.
    unsafe { Library::open(Some(DRIVER_LIBRARY), RTLD_LAZY | RTLD_LOCAL) }.is_ok()
}

fn open_global(path: &Path) -> std::result::Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading a shared library runs its initialisers; these are NVIDIA's CUDA libraries (or whatever the
    // user put in their place), loaded exactly as ONNX Runtime's provider would load them itself.
    let library =
        unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| e.to_string())?;
    std::mem::forget(library);
    Ok(())
}

fn missing_message(name: &str, dirs: &[PathBuf], failed: Option<(&Path, &str)>) -> String {
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    let what = match failed {
        Some((path, reason)) if path.is_absolute() => {
            format!("cannot load {}: {reason}", path.display())
        }
        Some((_, reason)) => format!(
            "{name} not found in {} nor on the system library path ({reason})",
            searched.join(", ")
        ),
        None => format!("{name} not found in {}", searched.join(", ")),
    };
    if name == DRIVER_LIBRARY {
        return format!(
            "{what}. {DRIVER_LIBRARY} comes with the NVIDIA driver: this machine has no NVIDIA GPU driver, or \
             the process cannot see it (containers need the NVIDIA container toolkit). CUDA 13 needs driver \
             R580 or newer. Use --device cpu to run without a GPU"
        );
    }
    let mut hint = String::new();
    if let Some((stem, wanted)) = name.rsplit_once(".so.") {
        let others = other_versions(stem, wanted, dirs);
        if !others.is_empty() {
            hint = format!(
                " Found {} instead: this ONNX Runtime (1.31, CUDA 13, cuDNN 9) needs major version {wanted}.",
                others.join(", ")
            );
        }
    }
    if TENSORRT_LIBRARIES.contains(&name) {
        // PyPI's tensorrt-cu13-libs is a stub that downloads from NVIDIA's own package index, which setup cannot
        // reach from the machines this project builds on; so TensorRT is the user's to install.
        return format!(
            "{what}.{hint} --device tensorrt needs TensorRT 10 for CUDA 13 (tensorrt-cu13-libs 10.x from NVIDIA's \
             package index, or NVIDIA's TensorRT tarball): install it and add its lib folder to \
             TCLSEG_CUDA_LIB_DIR, or use --device cuda"
        );
    }
    format!(
        "{what}.{hint} Run `scripts/setup --gpu` (it fetches CUDA 13 and cuDNN 9 from PyPI into .deps/cuda/lib), \
         or set TCLSEG_CUDA_LIB_DIR to the folders that hold them"
    )
}

/// Other major versions of `stem` in `dirs` (e.g. libcudart.so.12 when .13 is wanted), for the error message.
fn other_versions(stem: &str, wanted: &str, dirs: &[PathBuf]) -> Vec<String> {
    let prefix = format!("{stem}.so.");
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some(version) = file.strip_prefix(&prefix) {
                if version.split('.').next() != Some(wanted) {
                    found.push(dir.join(&file).display().to_string());
                }
            }
        }
    }
    found.sort();
    found
}

/// The GPU models the NVIDIA driver reports, for keying TensorRT engine caches ("unknown-gpu" when none can be
/// read). Engines are specific to the GPU model, TensorRT and ONNX Runtime version and the graph.
pub fn gpu_models() -> String {
    let mut models: Vec<String> = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|gpu| std::fs::read_to_string(gpu.path().join("information")).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_string()))
        })
        .collect();
    models.sort();
    models.dedup();
    if models.is_empty() {
        return "unknown-gpu".to_string();
    }
    models
        .join("+")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_named_with_the_folders_searched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = load_all(&["libcudart.so.13"], &[dir.path().to_path_buf()], false)
            .expect_err("nothing to load")
            .to_string();
        assert!(err.contains("libcudart.so.13 not found"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(err.contains("scripts/setup --gpu"), "{err}");
    }

    #[test]
    fn a_missing_tensorrt_library_says_where_tensorrt_comes_from() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = load_all(TENSORRT_LIBRARIES, &[dir.path().to_path_buf()], false)
            .expect_err("nothing to load")
            .to_string();
        assert!(err.contains("libnvinfer.so.10 not found"), "{err}");
        assert!(
            err.contains("TensorRT 10") && err.contains("TCLSEG_CUDA_LIB_DIR"),
            "{err}"
        );
    }

    #[test]
    fn a_wrong_major_version_is_pointed_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("libcudart.so.12"), b"not a library").expect("write");
        let err = load_all(&["libcudart.so.13"], &[dir.path().to_path_buf()], false)
            .expect_err("only CUDA 12 present")
            .to_string();
        assert!(err.contains("libcudart.so.12"), "{err}");
        assert!(err.contains("needs major version 13"), "{err}");
    }

    #[test]
    fn a_broken_library_file_is_named_with_the_loader_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("libcublas.so.13");
        std::fs::write(&path, b"not a library").expect("write");
        let err = load_all(&["libcublas.so.13"], &[dir.path().to_path_buf()], false)
            .expect_err("garbage file")
            .to_string();
        assert!(
            err.contains(&format!("cannot load {}", path.display())),
            "{err}"
        );
    }

    #[test]
    fn the_driver_message_says_what_the_driver_is() {
        let err = load_all(&[DRIVER_LIBRARY], &[], false)
            .expect_err("not searched")
            .to_string();
        assert!(err.contains("NVIDIA driver"), "{err}");
        assert!(err.contains("--device cpu"), "{err}");
    }

    #[test]
    fn a_real_library_loads_from_a_folder() {
        // libz is on every machine this builds on (the PNG encoder links it): stand it in for a CUDA library.
        let system = [
            "/lib/x86_64-linux-gnu",
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib64",
        ]
        .iter()
        .map(|d| Path::new(d).join("libz.so.1"))
        .find(|p| p.exists());
        let Some(libz) = system else {
            panic!("libz.so.1 not found in the usual places: update this test for this system");
        };
        let dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(&libz, dir.path().join("libz.so.1")).expect("symlink");
        let loaded = load_all(&["libz.so.1"], &[dir.path().to_path_buf()], false).expect("loads");
        assert_eq!(loaded, vec![dir.path().join("libz.so.1")]);
    }

    #[test]
    fn the_cpu_build_is_told_apart_from_the_gpu_build() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lib = dir.path().join("libonnxruntime.so");
        std::fs::write(&lib, b"").expect("write");
        let err = provider_present(&lib, CUDA_PROVIDER)
            .expect_err("CPU build")
            .to_string();
        assert!(
            err.contains("CPU-only build") && err.contains(CUDA_PROVIDER),
            "{err}"
        );
        std::fs::write(dir.path().join(CUDA_PROVIDER), b"").expect("write");
        provider_present(&lib, CUDA_PROVIDER).expect("GPU build");
    }
}
