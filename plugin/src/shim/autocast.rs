//! csrc/autocast.cpp: autocast on CUDA or the CPU through libtorch's non-deprecated API, and the CUDA driver's
//! compute capability.

unsafe extern "C" {
    fn lwi_autocast_enter(
        cuda: i32,
        bf16: i32,
        prev_enabled: *mut i32,
        prev_dtype: *mut i32,
    ) -> i32;
    fn lwi_autocast_exit(cuda: i32, prev_enabled: i32, prev_dtype: i32);
    fn lwi_autocast_cache_hold();
    fn lwi_autocast_cache_release();
    fn lwi_cuda_compute_capability(index: i32) -> i32;
}

/// This thread's autocast state on one device type before [`enter`], which [`exit`] restores.
#[derive(Debug, Clone, Copy)]
pub struct Previous {
    cuda: i32,
    enabled: i32,
    dtype: i32,
}

/// Turns autocast on for this thread on CUDA (`cuda`) or the CPU, to bf16, else fp16; None when
/// libtorch refused.
pub fn enter(cuda: bool, bf16: bool) -> Option<Previous> {
    let (cuda, mut enabled, mut dtype) = (i32::from(cuda), 0, 0);
    // SAFETY: the shim only reads and writes libtorch's thread-local autocast state and the two
    // ints, which live for the call.
    let status = unsafe { lwi_autocast_enter(cuda, i32::from(bf16), &mut enabled, &mut dtype) };
    (status == 0).then_some(Previous {
        cuda,
        enabled,
        dtype,
    })
}

/// Restores the autocast state [`enter`] found.
pub fn exit(previous: Previous) {
    // SAFETY: the shim only writes libtorch's thread-local autocast state, from plain ints.
    unsafe { lwi_autocast_exit(previous.cuda, previous.enabled, previous.dtype) }
}

/// Keeps the weights' lower-precision copies cached across autocast regions on this thread.
pub fn cache_hold() {
    // SAFETY: the shim only increments libtorch's thread-local autocast nesting count.
    unsafe { lwi_autocast_cache_hold() }
}

/// Ends [`cache_hold`]; clears the cache when no region or hold is left on this thread.
pub fn cache_release() {
    // SAFETY: the shim only decrements libtorch's thread-local nesting count and clears its cache.
    unsafe { lwi_autocast_cache_release() }
}

/// CUDA device `index`'s compute capability as major · 10 + minor; None when the driver cannot say.
pub fn cuda_compute_capability(index: i32) -> Option<i32> {
    // SAFETY: the shim only queries the CUDA driver, and answers -1 when it cannot.
    Some(unsafe { lwi_cuda_compute_capability(index) }).filter(|&cc| cc >= 0)
}
