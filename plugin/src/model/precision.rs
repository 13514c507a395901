//! Numeric precision of a forward pass: fp32, or autocast to bf16/fp16 — on CUDA, and bf16 on a
//! CPU whose instruction set computes it (AVX512-BF16 or AMX-BF16, through oneDNN).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    /// Autocast to bfloat16: CUDA (as fp16 before Ampere), or a CPU with AVX512-BF16 or AMX-BF16.
    Bf16,
    /// CUDA autocast to float16.
    Fp16,
    /// bf16 where the device computes it natively (a CUDA GPU from Ampere on, a CPU with
    /// AVX512-BF16 or AMX-BF16: measured faster there, docs/performance.md), fp32 elsewhere.
    Auto,
}

/// A CUDA device's compute capability as major · 10 + minor (90 for an H100), read from the driver;
/// None for the CPU or when the driver cannot say.
pub fn cuda_compute_capability(device: Device) -> Option<i32> {
    match device {
        Device::Cuda(i) => crate::shim::autocast::cuda_compute_capability(i as i32),
        _ => None,
    }
}

/// Whether `device` is a CUDA GPU that computes in bfloat16 natively: compute capability 8.0
/// (Ampere) or newer, or one whose capability cannot be read (assumed recent).
pub fn bf16_supported(device: Device) -> bool {
    device.is_cuda() && cuda_compute_capability(device).is_none_or(|cc| cc >= 80)
}

/// The bfloat16 instructions this processor offers and the operating system enabled: oneDNN runs
/// bf16 convolutions and matrix products on either; without both it would emulate them, slower
/// than fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CpuBf16 {
    /// AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake, Sapphire Rapids and later).
    pub avx512_bf16: bool,
    /// AMX-BF16 tiles (Intel Sapphire Rapids and later).
    pub amx_bf16: bool,
}

impl CpuBf16 {
    pub fn any(self) -> bool {
        self.avx512_bf16 || self.amx_bf16
    }
}

/// What this processor offers for bf16 (CPUID, and XCR0 for the state the OS saves).
#[cfg(target_arch = "x86_64")]
pub fn cpu_bf16() -> CpuBf16 {
    use std::arch::x86_64::{__cpuid_count, _xgetbv};
    // CPUID.(EAX=7,ECX=0):EDX bit 22 is AMX-BF16; the OS enables the tile state in XCR0 bits 17
    // (TILECFG) and 18 (TILEDATA), readable with XGETBV once CPUID.1:ECX bit 27 (OSXSAVE) is set.
    let osxsave = __cpuid_count(1, 0).ecx >> 27 & 1 == 1;
    // SAFETY: OSXSAVE set means the processor has XGETBV and the OS allows it.
    let xcr0 = if osxsave { unsafe { _xgetbv(0) } } else { 0 };
    let tiles_enabled = xcr0 & (0b11 << 17) == 0b11 << 17;
    CpuBf16 {
        // std's detection also checks that the OS saves the AVX-512 state.
        avx512_bf16: std::arch::is_x86_feature_detected!("avx512bf16"),
        amx_bf16: tiles_enabled && __cpuid_count(7, 0).edx >> 22 & 1 == 1,
    }
}

/// What this processor offers for bf16: nothing oneDNN accelerates off x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub fn cpu_bf16() -> CpuBf16 {
    CpuBf16 {
        avx512_bf16: false,
        amx_bf16: false,
    }
}

impl Precision {
    /// The precision that runs on `device`: `auto` resolved, bf16 as fp16 autocast on GPUs without
    /// bfloat16 (before Ampere); an error naming why when `device` cannot run what was asked (bf16
    /// on a CPU without AVX512-BF16 or AMX-BF16, fp16 off CUDA).
    pub fn check(self, device: Device) -> Result<Precision> {
        let native_bf16 = if device.is_cuda() {
            bf16_supported(device)
        } else {
            device == Device::Cpu && cpu_bf16().any()
        };
        match self {
            Precision::Fp32 => Ok(Precision::Fp32),
            Precision::Auto if native_bf16 => Ok(Precision::Bf16),
            Precision::Auto => Ok(Precision::Fp32),
            Precision::Bf16 if device.is_cuda() && !native_bf16 => Ok(Precision::Fp16),
            Precision::Bf16 | Precision::Fp16 if device.is_cuda() => Ok(self),
            Precision::Bf16 if native_bf16 => Ok(Precision::Bf16),
            Precision::Bf16 if device == Device::Cpu => Err(Error::invalid(
                "precision bf16 on the CPU needs AVX512-BF16 or AMX-BF16, and this processor has \
                 neither (`lwi info` lists what it offers): oneDNN would emulate bfloat16, slower \
                 than fp32; use fp32 or auto",
            )),
            Precision::Fp16 if device == Device::Cpu => Err(Error::invalid(
                "precision fp16 runs on CUDA only: on the CPU the reduced precision is bf16 \
                 (float32's range, oneDNN's bf16 kernels on AVX512-BF16 or AMX-BF16); use bf16, \
                 auto or fp32",
            )),
            Precision::Bf16 | Precision::Fp16 => Err(Error::invalid(format!(
                "precision {self:?} needs a CUDA device or the CPU (autocast); {device:?} runs fp32"
            ))),
        }
    }

    /// What runs on `device`, for reports: [`Precision::check`]'s answer, or what was asked when
    /// that is refused.
    pub fn on(self, device: Device) -> Precision {
        self.check(device).unwrap_or(self)
    }
}

/// Runs `f` under `precision` on `device` ([`Precision::check`]: `auto` resolved, bf16 as fp16 on
/// GPUs without bfloat16, refused with why where the device cannot run it rather than silently in
/// fp32). Autocast casts matrix products and convolutions; the result may be reduced: callers
/// cast it to float before accumulating.
pub fn with_precision<T>(precision: Precision, device: Device, f: impl FnOnce() -> T) -> Result<T> {
    let bf16 = match precision.check(device)? {
        // check never answers Auto.
        Precision::Fp32 | Precision::Auto => return Ok(f()),
        Precision::Bf16 => true,
        Precision::Fp16 => false,
    };
    use crate::shim::autocast;
    let previous = autocast::enter(device.is_cuda(), bf16)
        .ok_or_else(|| Error::internal("cannot enter autocast"))?;
    // Restores the previous autocast state even if `f` panics.
    struct Exit(autocast::Previous);
    impl Drop for Exit {
        fn drop(&mut self) {
            autocast::exit(self.0)
        }
    }
    let _exit = Exit(previous);
    Ok(f())
}

/// Runs `f`, keeping the lower-precision copies of the weights that [`with_precision`] makes in its
/// regions on this thread until `f` returns: a sliding window then casts the network's weights
/// once, not once per window (for the full UNETR on the CPU, a cast of 92.8 M parameters, ~10 % of
/// a bf16 window's forward). Only for work whose weights do not change inside `f` (inference).
pub fn with_cast_cache<T>(f: impl FnOnce() -> T) -> T {
    use crate::shim::autocast;
    // Releases the hold even if `f` panics.
    struct Release;
    impl Drop for Release {
        fn drop(&mut self) {
            autocast::cache_release()
        }
    }
    autocast::cache_hold();
    let _release = Release;
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use tch::{Kind, Tensor};

    #[test]
    fn gpu_bf16_is_read_from_the_gpu() {
        assert!(!bf16_supported(Device::Cpu));
        assert_eq!(cuda_compute_capability(Device::Cpu), None);
        assert_eq!(Precision::Fp16.on(Device::Cuda(0)), Precision::Fp16);
        assert_eq!(Precision::Fp32.on(Device::Cuda(0)), Precision::Fp32);
    }

    /// A matrix product's result type: bfloat16 under autocast, float otherwise.
    fn product_kind(precision: Precision) -> Result<Kind> {
        let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        with_precision(precision, Device::Cpu, || a.matmul(&a).kind())
    }

    #[test]
    fn cpu_bf16_runs_where_the_processor_has_it_and_is_refused_by_name_elsewhere() {
        assert_eq!(product_kind(Precision::Fp32).unwrap(), Kind::Float);
        let fp16 = product_kind(Precision::Fp16).unwrap_err();
        assert_eq!(fp16.kind, ErrorKind::InvalidArgument);
        assert!(fp16.message.contains("CUDA only"), "{}", fp16.message);
        if cpu_bf16().any() {
            assert_eq!(product_kind(Precision::Bf16).unwrap(), Kind::BFloat16);
            assert_eq!(product_kind(Precision::Auto).unwrap(), Kind::BFloat16);
            assert_eq!(Precision::Auto.on(Device::Cpu), Precision::Bf16);
        } else {
            let err = product_kind(Precision::Bf16).unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidArgument);
            assert!(
                err.message.contains("AVX512-BF16 or AMX-BF16"),
                "{}",
                err.message
            );
            assert_eq!(product_kind(Precision::Auto).unwrap(), Kind::Float);
            assert_eq!(Precision::Auto.on(Device::Cpu), Precision::Fp32);
        }
        // The region ends with the call: the next product is float again.
        assert_eq!(product_kind(Precision::Fp32).unwrap(), Kind::Float);
    }

    #[test]
    fn weights_are_cast_once_while_the_cache_is_held() {
        if !cpu_bf16().any() {
            return;
        }
        // A weight: a leaf that requires grad, as a model's variables are.
        let w = Tensor::ones([4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        let product = || {
            with_precision(Precision::Bf16, Device::Cpu, || {
                tch::no_grad(|| x.matmul(&w).double_value(&[0, 0]))
            })
            .unwrap()
        };
        let set = |v: f64| {
            let _ = tch::no_grad(|| w.shallow_clone().fill_(v));
        };
        // Without the hold each region casts the weight as it is now.
        assert_eq!(product(), 4.0);
        set(2.0);
        assert_eq!(product(), 8.0);
        // With it the first region's copy serves the next ones (hence: weights that do not change).
        with_cast_cache(|| {
            assert_eq!(product(), 8.0);
            set(3.0);
            assert_eq!(product(), 8.0);
        });
        // Released: cast afresh.
        assert_eq!(product(), 12.0);
    }

    #[test]
    fn cpu_features_agree_with_the_kernel() {
        // Linux lists the flags it enabled in /proc/cpuinfo: an independent reading of CPUID.
        let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
            return;
        };
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        let found = cpu_bf16();
        assert_eq!(found.avx512_bf16, flags.contains(&"avx512_bf16"));
        assert_eq!(found.amx_bf16, flags.contains(&"amx_bf16"));
    }
}
