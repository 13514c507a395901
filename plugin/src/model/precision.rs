//! Numeric precision of a forward pass: fp32, or CUDA autocast to bf16/fp16.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    /// CUDA autocast to bfloat16 (Ampere and newer).
    Bf16,
    /// CUDA autocast to float16.
    Fp16,
}

/// A CUDA device's compute capability as major · 10 + minor (90 for an H100), read from the driver;
/// None for the CPU or when the driver cannot say.
pub fn cuda_compute_capability(device: Device) -> Option<i32> {
    match device {
        Device::Cuda(i) => crate::shim::autocast::cuda_compute_capability(i as i32),
        _ => None,
    }
}

/// Whether `device` computes in bfloat16 natively: a CUDA GPU of compute capability 8.0 (Ampere) or
/// newer, or one whose capability cannot be read (assumed recent).
pub fn bf16_supported(device: Device) -> bool {
    device.is_cuda() && cuda_compute_capability(device).is_none_or(|cc| cc >= 80)
}

impl Precision {
    /// The precision that runs on `device`: bf16 becomes fp16 autocast on GPUs without bfloat16
    /// (before Ampere); everything else as asked.
    pub fn on(self, device: Device) -> Precision {
        if self == Precision::Bf16 && device.is_cuda() && !bf16_supported(device) {
            Precision::Fp16
        } else {
            self
        }
    }
}

/// Runs `f` under `precision` on `device` (bf16 as fp16 on GPUs without bfloat16, see
/// [`Precision::on`]). Autocast exists on CUDA only: asking for bf16/fp16 on the CPU is an error
/// rather than a silent fp32 run.
pub fn with_precision<T>(precision: Precision, device: Device, f: impl FnOnce() -> T) -> Result<T> {
    let bf16 = match precision.on(device) {
        Precision::Fp32 => return Ok(f()),
        Precision::Bf16 => true,
        Precision::Fp16 => false,
    };
    if !device.is_cuda() {
        return Err(Error::invalid(format!(
            "precision {precision:?} needs a CUDA device (autocast); the CPU runs fp32"
        )));
    }
    use crate::shim::autocast;
    let previous =
        autocast::enter(bf16).ok_or_else(|| Error::internal("cannot enter CUDA autocast"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_is_a_gpu_precision() {
        assert!(!bf16_supported(Device::Cpu));
        assert_eq!(cuda_compute_capability(Device::Cpu), None);
        // The CPU keeps what was asked, so that with_precision can refuse it by name.
        assert_eq!(Precision::Bf16.on(Device::Cpu), Precision::Bf16);
        assert_eq!(Precision::Fp16.on(Device::Cuda(0)), Precision::Fp16);
    }

    #[test]
    fn autocast_on_the_cpu_is_refused_not_ignored() {
        let err = with_precision(Precision::Bf16, Device::Cpu, || ()).unwrap_err();
        assert!(err.message.contains("CUDA"), "{}", err.message);
        assert_eq!(
            with_precision(Precision::Fp32, Device::Cpu, || 7).unwrap(),
            7
        );
    }
}
