//! The CPU's matrix instructions, and the precision `auto` picks from them and from what the bundle holds.
//!
//! ONNX Runtime's CPU provider (MLAS) picks its kernels from the same flags at run time:
//! - fp32: sgemm on AVX-512F, else AVX2+FMA3, else SSE;
//! - int8 (u8 activations × s8 weights): AMX tiles when the CPU has AMX-INT8, else AVX-512 VNNI (`vpdpbusd`),
//!   else AVX-VNNI, else AVX2/AVX-512BW's `vpmaddubsw`+`vpmaddwd` (three instructions for 32 products, where an
//!   fp32 FMA does 8), else SSE;
//! - bf16: no x86 kernel at all (the session option `mlas.enable_gemm_fastmath_arm64_bfloat16` exists on ARM64
//!   builds only), so `bf16` is an ARM64 mode here.
//!
//! Measured on an AVX2-only AMD EPYC (BENCHMARKS.md, "CPU low precision"): the int8 ViT-B/16 trunk ran 1.6×
//! faster than fp32 even without VNNI, so `auto` picks int8 on AVX2 and up when the bundle has int8 graphs. On a
//! CPU without AVX2 (SSE-only MLAS kernels) nothing was measured, and `auto` keeps fp32 there.

use serde::Serialize;

use super::bundle::Precision;
use super::runtime::Device;

/// The flags that decide which matrix kernels run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    pub avx512bw: bool,
    pub avx512_vnni: bool,
    pub avx_vnni: bool,
    pub avx512_bf16: bool,
    pub amx_int8: bool,
    pub amx_bf16: bool,
    /// ARM64 BF16 (`bfmmla`), what ONNX Runtime's bf16 fast math needs.
    pub arm_bf16: bool,
}

impl CpuFeatures {
    /// This machine's flags.
    pub fn detect() -> CpuFeatures {
        #[allow(unused_mut)]
        let mut f = CpuFeatures::default();
        #[cfg(target_arch = "x86_64")]
        {
            f.avx2 = std::arch::is_x86_feature_detected!("avx2");
            f.fma = std::arch::is_x86_feature_detected!("fma");
            f.avx512f = std::arch::is_x86_feature_detected!("avx512f");
            f.avx512bw = std::arch::is_x86_feature_detected!("avx512bw");
            f.avx512_vnni = std::arch::is_x86_feature_detected!("avx512vnni");
            f.avx_vnni = std::arch::is_x86_feature_detected!("avxvnni");
            f.avx512_bf16 = std::arch::is_x86_feature_detected!("avx512bf16");
            // AMX detection is not stable in std; the kernel lists it (and only when it lets processes use it).
            let flags = linux_cpu_flags();
            f.amx_int8 = flags.iter().any(|x| x == "amx_int8");
            f.amx_bf16 = flags.iter().any(|x| x == "amx_bf16");
        }
        #[cfg(target_arch = "aarch64")]
        {
            f.arm_bf16 = std::arch::is_aarch64_feature_detected!("bf16");
        }
        f
    }

    /// int8 products with a one-instruction multiply-add (VNNI or AMX).
    pub fn vnni_or_amx(&self) -> bool {
        self.amx_int8 || self.avx512_vnni || self.avx_vnni
    }

    /// The CPUs where int8 was measured faster than fp32 (AVX2 without VNNI) or is built to be (VNNI, AMX).
    pub fn fast_int8(&self) -> bool {
        self.avx2 || self.vnni_or_amx()
    }

    /// The flags that are set, in a fixed order, for logs and `/status`.
    pub fn names(&self) -> Vec<&'static str> {
        [
            (self.avx2, "avx2"),
            (self.fma, "fma"),
            (self.avx512f, "avx512f"),
            (self.avx512bw, "avx512bw"),
            (self.avx512_vnni, "avx512_vnni"),
            (self.avx_vnni, "avx_vnni"),
            (self.avx512_bf16, "avx512_bf16"),
            (self.amx_int8, "amx_int8"),
            (self.amx_bf16, "amx_bf16"),
            (self.arm_bf16, "arm_bf16"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }

    /// The matrix kernels ONNX Runtime's CPU provider runs for `precision` on this CPU (MLAS's own dispatch).
    pub fn kernels(&self, precision: Precision) -> &'static str {
        match precision {
            Precision::Int8 if self.amx_int8 => "MLAS u8s8 AMX tiles",
            Precision::Int8 if self.avx512_vnni => "MLAS u8s8 AVX-512 VNNI (vpdpbusd)",
            Precision::Int8 if self.avx_vnni => "MLAS u8s8 AVX-VNNI (vpdpbusd)",
            Precision::Int8 if self.avx512bw => "MLAS u8s8 AVX-512BW (vpmaddubsw, no VNNI)",
            Precision::Int8 if self.avx2 => "MLAS u8s8 AVX2 (vpmaddubsw, no VNNI)",
            Precision::Int8 => "MLAS u8s8 SSE",
            Precision::Bf16 => "MLAS sgemm with ARM64 bf16 fast math",
            Precision::Fp16 => "fp16 graphs, fp32 kernels behind inserted casts",
            _ if self.avx512f => "MLAS sgemm AVX-512F",
            _ if self.avx2 && self.fma => "MLAS sgemm AVX2/FMA3",
            _ => "MLAS sgemm SSE",
        }
    }
}

/// `model.precision`/`--precision` resolved for an engine: the precision run, and why, in words for logs,
/// `models bench` and `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrecisionChoice {
    pub precision: Precision,
    pub reason: String,
}

/// Resolves `requested` for `device`, given which graph precisions the bundle holds (`has`) and the CPU's
/// flags. Errors say what to do instead; `auto` never errors and never picks a mode measured slower than fp32.
pub fn choose(
    requested: Precision,
    device: Device,
    has: impl Fn(Precision) -> bool,
    cpu: &CpuFeatures,
) -> Result<PrecisionChoice, String> {
    let pick = |precision: Precision, reason: &str| {
        Ok(PrecisionChoice {
            precision,
            reason: reason.to_string(),
        })
    };
    let missing =
        |p: Precision| format!("the bundle has no {p} graphs; export it with --precision fp32,{p}");
    match requested {
        Precision::Fp32 => pick(Precision::Fp32, "asked for"),
        Precision::Fp16 if !has(Precision::Fp16) => Err(missing(Precision::Fp16)),
        Precision::Fp16 => pick(Precision::Fp16, "asked for"),
        Precision::Int8 if device.is_gpu() => Err(
            "int8 graphs are for the CPU (their dynamic quantization has no GPU kernels in ONNX Runtime); \
             use fp16 on a GPU"
                .to_string(),
        ),
        Precision::Int8 if !has(Precision::Int8) => Err(missing(Precision::Int8)),
        Precision::Int8 if !cpu.fast_int8() => pick(
            Precision::Int8,
            "asked for; this CPU has neither AVX2 nor VNNI/AMX: int8 was never measured faster than fp32 here",
        ),
        Precision::Int8 => pick(Precision::Int8, "asked for"),
        Precision::Bf16 if device.is_gpu() => {
            Err("bf16 is a CPU mode (ARM64 fast math); use fp16 on a GPU".to_string())
        }
        Precision::Bf16 if !cpu.arm_bf16 => Err(
            "ONNX Runtime's CPU provider has bf16 matrix kernels only on ARM64 CPUs with BF16 \
             (mlas.enable_gemm_fastmath_arm64_bfloat16); on this CPU use int8 (VNNI/AMX) or fp32"
                .to_string(),
        ),
        Precision::Bf16 => pick(Precision::Bf16, "asked for"),
        Precision::Auto if device.is_gpu() && has(Precision::Fp16) => {
            pick(Precision::Fp16, "auto: a GPU, and the bundle has fp16 graphs")
        }
        Precision::Auto if device.is_gpu() => {
            pick(Precision::Fp32, "auto: a GPU, but the bundle has no fp16 graphs")
        }
        Precision::Auto if cpu.vnni_or_amx() && has(Precision::Int8) => pick(
            Precision::Int8,
            "auto: the CPU has VNNI/AMX int8 kernels and the bundle has int8 graphs",
        ),
        Precision::Auto if cpu.fast_int8() && has(Precision::Int8) => pick(
            Precision::Int8,
            "auto: AVX2 without VNNI/AMX, where int8 measured 1.6x faster than fp32, and the bundle has int8 graphs",
        ),
        Precision::Auto if cpu.fast_int8() => pick(
            Precision::Fp32,
            "auto: the CPU runs int8 faster, but the bundle has no int8 graphs (export with --precision fp32,int8)",
        ),
        // bf16 fast math is not picked on its own: it was never measured against fp32 here (no ARM64 machine).
        Precision::Auto => pick(
            Precision::Fp32,
            "auto: no AVX2 or VNNI/AMX on this CPU, where int8 was never measured faster than fp32",
        ),
    }
}

/// The `flags` line of /proc/cpuinfo (empty elsewhere, or when it can't be read).
#[cfg(target_arch = "x86_64")]
fn linux_cpu_flags() -> Vec<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("flags"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, flags)| flags.split_whitespace().map(str::to_string).collect())
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avx2_only() -> CpuFeatures {
        CpuFeatures {
            avx2: true,
            fma: true,
            ..CpuFeatures::default()
        }
    }

    fn sapphire_rapids() -> CpuFeatures {
        CpuFeatures {
            avx512f: true,
            avx512bw: true,
            avx512_vnni: true,
            avx512_bf16: true,
            amx_int8: true,
            amx_bf16: true,
            ..avx2_only()
        }
    }

    #[test]
    fn auto_follows_the_measurement_on_avx2_and_keeps_fp32_below_it() {
        // int8 measured faster than fp32 on an AVX2-only CPU (BENCHMARKS.md).
        let c = choose(Precision::Auto, Device::Cpu, |_| true, &avx2_only()).unwrap();
        assert_eq!(c.precision, Precision::Int8, "{}", c.reason);
        assert!(c.reason.contains("AVX2"), "{}", c.reason);
        // SSE only: never measured, so never picked.
        let c = choose(
            Precision::Auto,
            Device::Cpu,
            |_| true,
            &CpuFeatures::default(),
        )
        .unwrap();
        assert_eq!(c.precision, Precision::Fp32, "{}", c.reason);
    }

    #[test]
    fn auto_picks_int8_on_amx_only_when_the_bundle_has_it() {
        let cpu = sapphire_rapids();
        let with = choose(Precision::Auto, Device::Cpu, |_| true, &cpu).unwrap();
        assert_eq!(with.precision, Precision::Int8);
        let without = choose(Precision::Auto, Device::Cpu, |p| p == Precision::Fp32, &cpu).unwrap();
        assert_eq!(without.precision, Precision::Fp32);
        assert!(
            without.reason.contains("no int8 graphs"),
            "{}",
            without.reason
        );
    }

    #[test]
    fn auto_on_a_gpu_takes_fp16_when_there() {
        let fp16 = |p: Precision| p != Precision::Int8;
        let c = choose(Precision::Auto, Device::Cuda, fp16, &sapphire_rapids()).unwrap();
        assert_eq!(c.precision, Precision::Fp16);
        let c = choose(
            Precision::Auto,
            Device::Cuda,
            |p| p == Precision::Fp32,
            &avx2_only(),
        )
        .unwrap();
        assert_eq!(c.precision, Precision::Fp32);
    }

    #[test]
    fn explicit_modes_are_refused_where_they_cannot_run() {
        let only_fp32 = |p: Precision| p == Precision::Fp32;
        let err = choose(Precision::Int8, Device::Cpu, only_fp32, &sapphire_rapids()).unwrap_err();
        assert!(err.contains("--precision fp32,int8"), "{err}");
        let err = choose(Precision::Int8, Device::Cuda, |_| true, &sapphire_rapids()).unwrap_err();
        assert!(err.contains("for the CPU"), "{err}");
        let err = choose(Precision::Bf16, Device::Cpu, |_| true, &sapphire_rapids()).unwrap_err();
        assert!(err.contains("ARM64"), "{err}");
        let arm = CpuFeatures {
            arm_bf16: true,
            ..CpuFeatures::default()
        };
        let ok = choose(Precision::Bf16, Device::Cpu, only_fp32, &arm).unwrap();
        assert_eq!(ok.precision, Precision::Bf16);
        // Asked-for int8 on an SSE-only CPU runs, and says why it may be slow.
        let slow = choose(
            Precision::Int8,
            Device::Cpu,
            |_| true,
            &CpuFeatures::default(),
        )
        .unwrap();
        assert_eq!(slow.precision, Precision::Int8);
        assert!(slow.reason.contains("never measured"), "{}", slow.reason);
    }

    #[test]
    fn kernels_follow_the_flags() {
        assert_eq!(avx2_only().kernels(Precision::Fp32), "MLAS sgemm AVX2/FMA3");
        assert!(avx2_only().kernels(Precision::Int8).contains("no VNNI"));
        assert!(sapphire_rapids().kernels(Precision::Int8).contains("AMX"));
        assert_eq!(
            sapphire_rapids().names(),
            vec![
                "avx2",
                "fma",
                "avx512f",
                "avx512bw",
                "avx512_vnni",
                "avx512_bf16",
                "amx_int8",
                "amx_bf16"
            ]
        );
    }
}
