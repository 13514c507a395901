//! `leaky_relu(instance_norm(a) + skip)` fused: statistics in one read, then one pass that reads the
//! input (and skip) and writes the result, where ATen takes five to seven passes over memory. On CUDA
//! a kernel compiled with NVRTC (csrc/fused_norm.cpp); on the CPU (float32) loops here, parallel
//! over (batch, channel) rows. Inference only (there is no backward); anything not covered, or any
//! failure to build or launch the CUDA kernel, falls back to ATen's kernels.

use std::cell::Cell;
use std::ffi::{CStr, c_char};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

unsafe extern "C" {
    fn lwi_fused_norm_compile_check(arch: i32, err: *mut c_char, len: usize) -> i32;
    fn lwi_fused_norm_act(
        a: *const C_tensor,
        b: *const C_tensor,
        mode: i32,
        eps: f32,
        slope: f32,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> i32;
}

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
/// fusion enabled on this thread, a contiguous `a` (CUDA float32/float16/bfloat16, or CPU float32)
/// and a skip tensor of the same shape, dtype and layout. None means: use ATen.
pub fn norm_act(a: &Tensor, skip: &Skip, eps: f64, slope: f64) -> Option<Tensor> {
    if !ENABLED.with(Cell::get) || a.requires_grad() || !a.is_contiguous() || a.dim() < 3 {
        return None;
    }
    let supported = match a.device() {
        tch::Device::Cpu => a.kind() == Kind::Float,
        _ => matches!(a.kind(), Kind::Float | Kind::Half | Kind::BFloat16),
    };
    if !supported || a.numel() == 0 {
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
    let y = if a.device().is_cuda() {
        cuda_norm_act(a, b, mode, eps, slope)?
    } else {
        cpu::norm_act(a, b, mode == 2, eps, slope)
    };
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
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut err = [0 as c_char; 512];
    let b_ptr = b.map_or(std::ptr::null(), Tensor::as_ptr);
    // SAFETY: `a` and `b` are live tensors for the call; the shim writes at most `err.len()` bytes
    // (NUL-terminated) and, on success, a new heap tensor that `from_ptr` takes ownership of.
    let status = unsafe {
        lwi_fused_norm_act(
            a.as_ptr(),
            b_ptr,
            mode,
            eps as f32,
            slope as f32,
            &mut out,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if status != 0 || out.is_null() {
        // SAFETY: the shim NUL-terminates what it writes; `err` starts zeroed.
        let why = unsafe { CStr::from_ptr(err.as_ptr()) };
        if let Ok(mut f) = FAILURE.lock() {
            *f = Some(why.to_string_lossy().into_owned());
        }
        return None;
    }
    // SAFETY: `out` is a tensor the shim allocated with `new` for us to own.
    Some(unsafe { Tensor::from_ptr(out) })
}

/// Compiles the kernels to PTX for compute capability `arch` (e.g. 90) with NVRTC, touching no
/// GPU: Err with NVRTC's log when the source does not compile or NVRTC is missing.
pub fn compile_check(arch: i32) -> Result<(), String> {
    let mut err = [0 as c_char; 4096];
    // SAFETY: the shim writes at most `err.len()` NUL-terminated bytes.
    let status = unsafe { lwi_fused_norm_compile_check(arch, err.as_mut_ptr(), err.len()) };
    if status == 0 {
        Ok(())
    } else {
        // SAFETY: as above.
        Err(unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }
}

/// The CPU version: float32, rows of `S` voxels spread over libtorch's intra-op thread count.
mod cpu {
    use tch::Tensor;

    /// (mean, 1 / sqrt(biased variance + eps)) of one row. Sums in f64 around the row's first
    /// value, so a large offset does not cancel the variance away.
    #[inline(always)]
    fn stats(x: &[f32], eps: f64) -> (f32, f32) {
        let shift = x[0] as f64;
        let (mut sum, mut sq) = ([0f64; 8], [0f64; 8]);
        let chunks = x.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..8 {
                let v = c[i] as f64 - shift;
                sum[i] += v;
                sq[i] += v * v;
            }
        }
        let (mut s, mut q) = (sum.iter().sum::<f64>(), sq.iter().sum::<f64>());
        for &v in rest {
            let v = v as f64 - shift;
            s += v;
            q += v * v;
        }
        let n = x.len() as f64;
        let mean = s / n;
        let var = (q / n - mean * mean).max(0.0);
        ((mean + shift) as f32, (1.0 / (var + eps).sqrt()) as f32)
    }

    #[inline(always)]
    fn leaky(v: f32, slope: f32) -> f32 {
        if v > 0.0 { v } else { v * slope }
    }

    /// One row: y = leaky((a - ma) * ra + skip), skip = 0, b, or (b - mb) * rb.
    #[inline(always)]
    fn row_body(a: &[f32], b: Option<&[f32]>, normed: bool, y: &mut [f32], eps: f64, slope: f32) {
        let (ma, ra) = stats(a, eps);
        match b {
            None => {
                for (y, &a) in y.iter_mut().zip(a) {
                    *y = leaky((a - ma) * ra, slope);
                }
            }
            Some(b) => {
                let (mb, rb) = if normed { stats(b, eps) } else { (0.0, 1.0) };
                for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
                    *y = leaky((a - ma) * ra + (b - mb) * rb, slope);
                }
            }
        }
    }

    /// `row_body` compiled for AVX2 (the crate's baseline is SSE2); runs only where the CPU has it.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn row_avx2(
        a: &[f32],
        b: Option<&[f32]>,
        normed: bool,
        y: &mut [f32],
        eps: f64,
        slope: f32,
    ) {
        row_body(a, b, normed, y, eps, slope)
    }

    fn row(a: &[f32], b: Option<&[f32]>, normed: bool, y: &mut [f32], eps: f64, slope: f32) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { row_avx2(a, b, normed, y, eps, slope) };
        }
        row_body(a, b, normed, y, eps, slope)
    }

    pub(super) fn norm_act(
        a: &Tensor,
        b: Option<&Tensor>,
        normed: bool,
        eps: f64,
        slope: f64,
    ) -> Tensor {
        let size = a.size();
        let rows = (size[0] * size[1]) as usize;
        let n = a.numel();
        let s = n / rows;
        let out = a.empty_like();
        // SAFETY: `a`, `b` and `out` are contiguous float32 CPU tensors of `n` elements that live
        // through this function; `out` is freshly allocated, so it aliases neither input.
        let (av, bv, yv) = unsafe {
            (
                std::slice::from_raw_parts(a.data_ptr() as *const f32, n),
                b.map(|b| std::slice::from_raw_parts(b.data_ptr() as *const f32, n)),
                std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n),
            )
        };
        let threads = (tch::get_num_threads().max(1) as usize).min(rows);
        let per_thread = rows.div_ceil(threads) * s;
        std::thread::scope(|scope| {
            for (t, ys) in yv.chunks_mut(per_thread).enumerate() {
                let start = t * per_thread;
                scope.spawn(move || {
                    for (r, y) in ys.chunks_mut(s).enumerate() {
                        let at = start + r * s;
                        let b = bv.map(|b| &b[at..at + s]);
                        row(&av[at..at + s], b, normed, y, eps, slope as f32);
                    }
                });
            }
        });
        out
    }
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

    /// ATen's `leaky_relu(instance_norm(a) + skip)` in float64, the reference.
    fn aten(a: &Tensor, skip: &Skip) -> Tensor {
        let norm = |t: &Tensor| {
            t.to_kind(Kind::Double).instance_norm(
                None::<Tensor>,
                None::<Tensor>,
                None::<Tensor>,
                None::<Tensor>,
                true,
                0.1,
                1e-5,
                false,
            )
        };
        let out = norm(a);
        match skip {
            Skip::None => out,
            Skip::Raw(b) => out + b.to_kind(Kind::Double),
            Skip::Normed(b) => out + norm(b),
        }
        .leaky_relu()
    }

    #[test]
    fn the_cpu_loops_equal_aten_for_every_skip() {
        tch::manual_seed(3);
        // Odd sizes, and large offsets from zero (the variance must not cancel).
        for shape in [[2i64, 5, 17, 9, 33], [1, 16, 24, 24, 24], [3, 7, 1, 1, 2]] {
            let make =
                |offset: f64| Tensor::randn(shape, (Kind::Float, tch::Device::Cpu)) * 3.0 + offset;
            let (a, b) = (make(1000.0), make(-5.0));
            for skip in [Skip::None, Skip::Raw(&b), Skip::Normed(&b)] {
                let before = calls();
                let y = tch::no_grad(|| norm_act(&a, &skip, 1e-5, 0.01)).expect("fused on the CPU");
                assert!(calls() > before);
                let reference = aten(&a, &skip);
                // float32 inputs near 1000 carry 6e-5 of rounding, which the outputs inherit.
                let err = (y.to_kind(Kind::Double) - &reference)
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(err < 1e-4, "{shape:?}: max|Δ| {err}");
            }
        }
    }

    #[test]
    fn training_and_other_dtypes_use_aten() {
        let a =
            Tensor::randn([2, 3, 4, 4, 4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        assert!(norm_act(&a, &Skip::None, 1e-5, 0.01).is_none());
        let d = Tensor::randn([2, 3, 4, 4, 4], (Kind::Double, tch::Device::Cpu));
        assert!(norm_act(&d, &Skip::None, 1e-5, 0.01).is_none());
        let off = Tensor::randn([2, 3, 4, 4, 4], (Kind::Float, tch::Device::Cpu));
        assert!(with_fused(false, || norm_act(&off, &Skip::None, 1e-5, 0.01)).is_none());
    }
}
