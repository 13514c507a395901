//! csrc/dist.cpp: libtorch's TCPStore and c10d process group (Gloo or NCCL), one per process.
//! Each fallible function writes the shim's message into `err` and returns its status (0: done).

use std::ffi::{CStr, c_char};
use tch::Tensor;
use torch_sys::C_tensor;

type CTensor = *const C_tensor;

unsafe extern "C" {
    fn lwi_dist_init(
        backend: *const c_char,
        addr: *const c_char,
        port: i32,
        rank: i32,
        world: i32,
        store_server: i32,
        device_index: i32,
        timeout_ms: i64,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn lwi_dist_all_reduce(
        ts: *const CTensor,
        n: usize,
        bucket_bytes: i64,
        average: i32,
        timeout_ms: i64,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn lwi_dist_broadcast(
        ts: *const CTensor,
        n: usize,
        root: i32,
        bucket_bytes: i64,
        timeout_ms: i64,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn lwi_dist_barrier(timeout_ms: i64, err: *mut c_char, len: usize) -> i32;
    fn lwi_dist_destroy();
    fn lwi_dist_active() -> i32;
    fn lwi_dist_nccl_usable() -> i32;
    fn lwi_dist_use_device(index: i32, err: *mut c_char, len: usize) -> i32;
    #[allow(clippy::too_many_arguments)]
    fn lwi_dist_sync_batch_norm(
        x: CTensor,
        weight: CTensor,
        bias: CTensor,
        running_mean: CTensor,
        running_var: CTensor,
        momentum: f64,
        eps: f64,
        timeout_ms: i64,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> i32;
}

/// Where this process is in its job: rank, world size, whether it hosts the store, its GPU.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    pub port: i32,
    pub rank: i32,
    pub world: i32,
    pub store_server: bool,
    pub device_index: i32,
}

/// Joins (or, as rank 0 with `store_server`, hosts) the job's store at `addr` and builds the
/// `backend` ("gloo" or "nccl") process group.
pub fn init(backend: &CStr, addr: &CStr, m: Member, timeout_ms: i64, err: &mut [u8]) -> i32 {
    // SAFETY: both strings are NUL-terminated and live for the call; the shim writes at most
    // `err.len()` bytes into `err`.
    unsafe {
        lwi_dist_init(
            backend.as_ptr(),
            addr.as_ptr(),
            m.port,
            m.rank,
            m.world,
            i32::from(m.store_server),
            m.device_index,
            timeout_ms,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    }
}

fn pointers(ts: &[Tensor]) -> Vec<CTensor> {
    ts.iter().map(Tensor::as_ptr).collect()
}

/// Sums `ts` in place over the ranks (divided by the world size when `average`), in buckets.
pub fn all_reduce(
    ts: &[Tensor],
    bucket_bytes: i64,
    average: bool,
    timeout_ms: i64,
    err: &mut [u8],
) -> i32 {
    let ptrs = pointers(ts);
    // SAFETY: `ptrs` holds `ptrs.len()` pointers to tensors borrowed for the call, which the shim
    // writes in place; it writes at most `err.len()` bytes into `err`.
    unsafe {
        lwi_dist_all_reduce(
            ptrs.as_ptr(),
            ptrs.len(),
            bucket_bytes,
            i32::from(average),
            timeout_ms,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    }
}

/// Overwrites `ts` with rank `root`'s, in buckets.
pub fn broadcast(
    ts: &[Tensor],
    root: i32,
    bucket_bytes: i64,
    timeout_ms: i64,
    err: &mut [u8],
) -> i32 {
    let ptrs = pointers(ts);
    // SAFETY: as in `all_reduce`.
    unsafe {
        lwi_dist_broadcast(
            ptrs.as_ptr(),
            ptrs.len(),
            root,
            bucket_bytes,
            timeout_ms,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    }
}

pub fn barrier(timeout_ms: i64, err: &mut [u8]) -> i32 {
    // SAFETY: the shim writes at most `err.len()` bytes into `err`.
    unsafe { lwi_dist_barrier(timeout_ms, err.as_mut_ptr().cast(), err.len()) }
}

/// Makes GPU `index` this thread's current device.
pub fn use_device(index: i32, err: &mut [u8]) -> i32 {
    // SAFETY: the shim writes at most `err.len()` bytes into `err`.
    unsafe { lwi_dist_use_device(index, err.as_mut_ptr().cast(), err.len()) }
}

/// Ends the process group (none: nothing happens).
pub fn destroy() {
    // SAFETY: the shim takes no arguments and tolerates being called without a group.
    unsafe { lwi_dist_destroy() }
}

/// Whether this process is in a job of more than one rank.
pub fn active() -> bool {
    // SAFETY: a query of the shim's own state, without arguments.
    unsafe { lwi_dist_active() != 0 }
}

/// Whether NCCL is built in and the loaded libtorch has CUDA.
pub fn nccl_usable() -> bool {
    // SAFETY: a query without arguments.
    unsafe { lwi_dist_nccl_usable() == 1 }
}

/// PyTorch's `SyncBatchNorm` over the ranks' batches: the normalised `x` (the running statistics
/// updated in place), or None with the shim's message in `err`.
pub fn sync_batch_norm(
    x: &Tensor,
    [weight, bias, running_mean, running_var]: [&Tensor; 4],
    momentum: f64,
    eps: f64,
    timeout_ms: i64,
    err: &mut [u8],
) -> Option<Tensor> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: the five tensors are borrowed for the call (the running statistics written in
    // place); the shim writes at most `err.len()` bytes into `err` and, on success, one new tensor
    // to `out`.
    let status = unsafe {
        lwi_dist_sync_batch_norm(
            x.as_ptr(),
            weight.as_ptr(),
            bias.as_ptr(),
            running_mean.as_ptr(),
            running_var.as_ptr(),
            momentum,
            eps,
            timeout_ms,
            &mut out,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if status != 0 || out.is_null() {
        return None;
    }
    // SAFETY: on success `out` is a tensor the shim allocated and hands over to us to own.
    Some(unsafe { Tensor::from_ptr(out) })
}
