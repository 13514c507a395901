//! csrc/fused_norm.cpp: `leaky_relu(instance_norm(a) + skip)` as CUDA kernels compiled with NVRTC.

use std::ffi::c_char;
use tch::Tensor;
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

/// Compiles the kernels to PTX for compute capability `arch` with NVRTC: Err with NVRTC's log.
pub fn compile_check(arch: i32) -> Result<(), String> {
    let mut err = [0u8; 4096];
    // SAFETY: the shim writes at most `err.len()` bytes, NUL-terminated, into `err`.
    let status = unsafe { lwi_fused_norm_compile_check(arch, err.as_mut_ptr().cast(), err.len()) };
    if status == 0 {
        Ok(())
    } else {
        Err(super::error_text(&err))
    }
}

/// The fused kernel on `a` and the skip tensor `b` (`mode` 0: none, 1: as it is, 2: normalised):
/// a new tensor, or the shim's reason for failing.
pub fn norm_act(
    a: &Tensor,
    b: Option<&Tensor>,
    mode: i32,
    eps: f32,
    slope: f32,
) -> Result<Tensor, String> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut err = [0u8; 512];
    let b = b.map_or(std::ptr::null(), Tensor::as_ptr);
    // SAFETY: `a` and `b` (or null) are live tensors borrowed for the call; the shim writes at
    // most `err.len()` NUL-terminated bytes into `err` and, on success, one new tensor to `out`.
    let status = unsafe {
        lwi_fused_norm_act(
            a.as_ptr(),
            b,
            mode,
            eps,
            slope,
            &mut out,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if status != 0 || out.is_null() {
        return Err(super::error_text(&err));
    }
    // SAFETY: `out` is a tensor the shim allocated with `new` and hands over to us to own.
    Ok(unsafe { Tensor::from_ptr(out) })
}
