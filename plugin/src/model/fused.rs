//! `leaky_relu(instance_norm(a) + skip)` fused on CUDA: statistics in one read, then one kernel that
//! reads the input (and skip) and writes the result, where ATen takes five to seven passes over
//! memory (csrc/fused_norm.cpp, compiled with NVRTC). Inference only (there is no backward); the CPU,
//! anything not covered, and any failure to build or launch the kernel use ATen's kernels. (On the
//! CPU a fused loop saved only what glibc's allocator settings save too: docs/performance.md.)

use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tch::{Kind, Tensor};

/// What is added to the normalised input before the activation.
pub enum Skip<'a> {
    None,
    /// A tensor as it is (an identity shortcut).
    Raw(&'a Tensor),
    /// A tensor after its own instance norm (a 1³-conv shortcut).
    Normed(&'a Tensor),
}

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}
static CALLS: AtomicU64 = AtomicU64::new(0);
static FAILURE: Mutex<Option<String>> = Mutex::new(None);

/// Runs `f` with the fused kernel allowed (`true`, the default) or not, on this thread.
pub fn with_fused<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    let before = ENABLED.with(|e| e.replace(enabled));
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ENABLED.with(|e| e.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

/// How many times the fused kernel has run in this process (for tests and benchmarks).
pub fn calls() -> u64 {
    CALLS.load(Ordering::Relaxed)
}

/// Why the fused kernel last failed, if it did (the fallback to ATen is silent otherwise).
pub fn last_failure() -> Option<String> {
    FAILURE.lock().map(|f| f.clone()).unwrap_or(None)
}

/// `leaky_relu(instance_norm(a) + skip)` in one pass, when it applies: inference (no gradient),
/// fusion enabled on this thread, a contiguous CUDA float32/float16/bfloat16 `a` and a skip tensor
/// of the same shape, dtype and layout. None means: use ATen.
pub fn norm_act(a: &Tensor, skip: &Skip, eps: f64, slope: f64) -> Option<Tensor> {
    if !ENABLED.with(Cell::get) || !a.device().is_cuda() || a.requires_grad() {
        return None;
    }
    let supported = matches!(a.kind(), Kind::Float | Kind::Half | Kind::BFloat16);
    if !supported || !a.is_contiguous() || a.dim() < 3 || a.numel() == 0 {
        return None;
    }
    let (mode, b) = match skip {
        Skip::None => (0, None),
        Skip::Raw(b) => (1, Some(*b)),
        Skip::Normed(b) => (2, Some(*b)),
    };
    if let Some(b) = b
        && (b.size() != a.size()
            || b.kind() != a.kind()
            || !b.is_contiguous()
            || b.requires_grad()
            || b.device() != a.device())
    {
        return None;
    }
    let y = cuda_norm_act(a, b, mode, eps, slope)?;
    CALLS.fetch_add(1, Ordering::Relaxed);
    Some(y)
}

/// The CUDA kernel through the C++ shim; None (and the reason kept) when it fails.
fn cuda_norm_act(
    a: &Tensor,
    b: Option<&Tensor>,
    mode: i32,
    eps: f64,
    slope: f64,
) -> Option<Tensor> {
    match crate::shim::fused_norm::norm_act(a, b, mode, eps as f32, slope as f32) {
        Ok(y) => Some(y),
        Err(why) => {
            if let Ok(mut f) = FAILURE.lock() {
                *f = Some(why);
            }
            None
        }
    }
}

/// Compiles the kernels to PTX for compute capability `arch` (e.g. 90) with NVRTC, touching no
/// GPU: Err with NVRTC's log when the source does not compile or NVRTC is missing.
pub fn compile_check(arch: i32) -> Result<(), String> {
    crate::shim::fused_norm::compile_check(arch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_compile_for_the_gpus_lwi_supports() {
        // NVRTC ships with libtorch's CUDA libraries; it compiles without a GPU.
        for arch in [75, 80, 90] {
            compile_check(arch).unwrap_or_else(|e| panic!("compute_{arch}: {e}"));
        }
    }

    #[test]
    fn the_cpu_uses_aten() {
        let a = Tensor::randn([2, 3, 4, 4, 4], (Kind::Float, tch::Device::Cpu));
        assert!(tch::no_grad(|| norm_act(&a, &Skip::None, 1e-5, 0.01)).is_none());
    }
}
