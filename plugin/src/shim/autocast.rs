//! csrc/autocast.cpp: CUDA autocast through libtorch's non-deprecated API, and the CUDA driver's
//! compute capability.

unsafe extern "C" {
    fn lwi_autocast_enter(bf16: i32, prev_enabled: *mut i32, prev_dtype: *mut i32) -> i32;
    fn lwi_autocast_exit(prev_enabled: i32, prev_dtype: i32);
    fn lwi_cuda_compute_capability(index: i32) -> i32;
}

/// This thread's autocast state before [`enter`], which [`exit`] restores.
#[derive(Debug, Clone, Copy)]
pub struct Previous(i32, i32);

/// Turns CUDA autocast on for this thread (bf16, else fp16); None when libtorch refused.
pub fn enter(bf16: bool) -> Option<Previous> {
    let (mut enabled, mut dtype) = (0, 0);
    // SAFETY: the shim only reads and writes libtorch's thread-local autocast state and the two
    // ints, which live for the call.
    let status = unsafe { lwi_autocast_enter(i32::from(bf16), &mut enabled, &mut dtype) };
    (status == 0).then_some(Previous(enabled, dtype))
}

/// Restores the autocast state [`enter`] found.
pub fn exit(previous: Previous) {
    // SAFETY: the shim only writes libtorch's thread-local autocast state, from plain ints.
    unsafe { lwi_autocast_exit(previous.0, previous.1) }
}

/// CUDA device `index`'s compute capability as major · 10 + minor; None when the driver cannot say.
pub fn cuda_compute_capability(index: i32) -> Option<i32> {
    // SAFETY: the shim only queries the CUDA driver, and answers -1 when it cannot.
    Some(unsafe { lwi_cuda_compute_capability(index) }).filter(|&cc| cc >= 0)
}
