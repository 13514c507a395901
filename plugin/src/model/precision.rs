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

unsafe extern "C" {
    fn lwi_autocast_enter(bf16: i32, prev_enabled: *mut i32, prev_dtype: *mut i32) -> i32;
    fn lwi_autocast_exit(prev_enabled: i32, prev_dtype: i32);
}

/// Runs `f` under `precision` on `device`. Autocast exists on CUDA only: asking for bf16/fp16 on
/// the CPU is an error rather than a silent fp32 run.
pub fn with_precision<T>(precision: Precision, device: Device, f: impl FnOnce() -> T) -> Result<T> {
    let bf16 = match precision {
        Precision::Fp32 => return Ok(f()),
        Precision::Bf16 => 1,
        Precision::Fp16 => 0,
    };
    if !device.is_cuda() {
        return Err(Error::invalid(format!(
            "precision {precision:?} needs a CUDA device (autocast); the CPU runs fp32"
        )));
    }
    let (mut prev_enabled, mut prev_dtype) = (0, 0);
    // SAFETY: the shim only reads and writes libtorch's thread-local autocast state and the two ints.
    if unsafe { lwi_autocast_enter(bf16, &mut prev_enabled, &mut prev_dtype) } != 0 {
        return Err(Error::internal("cannot enter CUDA autocast"));
    }
    // Restores the previous autocast state even if `f` panics.
    struct Exit(i32, i32);
    impl Drop for Exit {
        fn drop(&mut self) {
            // SAFETY: pairs with the successful enter above.
            unsafe { lwi_autocast_exit(self.0, self.1) }
        }
    }
    let _exit = Exit(prev_enabled, prev_dtype);
    Ok(f())
}

#[cfg(test)]
mod tests {
    use super::*;

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
