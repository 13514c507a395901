//! Statuses, the thread's last error, and the guard every export runs in.

use lwi::ErrorKind;
use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

/// Version of the C ABI. Bumped on every breaking change; a host compares it with
/// [`lwi_abi_version`] before making any other call.
pub const LWI_ABI_VERSION: u32 = 1;

/// Result of every fallible call. On anything but `LWI_STATUS_OK`, [`lwi_last_error`] says what
/// went wrong and where.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LwiStatus {
    Ok = 0,
    /// A NULL pointer, a wrong size, malformed JSON, an unknown option, a value out of range.
    InvalidArgument = 1,
    /// The operating system refused: missing file, no permission, disk full.
    Io = 2,
    /// A file is corrupt, truncated or not what its name says.
    Format = 3,
    /// Valid input that lwi does not handle (e.g. 4-D or RGB images).
    Unsupported = 4,
    /// The requested device (e.g. `cuda:1`) does not exist here.
    DeviceUnavailable = 5,
    OutOfMemory = 6,
    /// The progress callback asked to stop; nothing partial was left behind.
    Cancelled = 7,
    /// A model file does not match its architecture, or the task.
    ModelIncompatible = 8,
    /// A bug in lwi; the message has details.
    Internal = 9,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn status_of(kind: ErrorKind) -> LwiStatus {
    match kind {
        ErrorKind::InvalidArgument => LwiStatus::InvalidArgument,
        ErrorKind::Io => LwiStatus::Io,
        ErrorKind::Format => LwiStatus::Format,
        ErrorKind::Unsupported => LwiStatus::Unsupported,
        ErrorKind::DeviceUnavailable => LwiStatus::DeviceUnavailable,
        ErrorKind::OutOfMemory => LwiStatus::OutOfMemory,
        ErrorKind::Cancelled => LwiStatus::Cancelled,
        ErrorKind::ModelIncompatible => LwiStatus::ModelIncompatible,
        ErrorKind::Internal => LwiStatus::Internal,
    }
}

/// Runs an export's body: maps errors to a status and the thread's last error, and turns a panic
/// into a status instead of unwinding into C (`LWI_STATUS_OUT_OF_MEMORY` when libtorch ran out of
/// memory, else `LWI_STATUS_INTERNAL`). The panic is reported through the message only: nothing
/// reaches the host's stderr.
pub(crate) fn guard(name: &str, body: impl FnOnce() -> lwi::Result<()>) -> LwiStatus {
    silence_panics();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_last_error("");
            LwiStatus::Ok
        }
        Ok(Err(e)) => {
            set_last_error(&format!("{name}: {}", e.message));
            status_of(e.kind)
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let e = lwi::error::from_panic(&what);
            set_last_error(&format!("{name}: {}", e.message));
            status_of(e.kind)
        }
    }
}

/// Panics inside liblwi are caught by [`guard`] and reported as a status and a message, so the
/// default hook's text and backtrace on stderr would only confuse the host's users. This hook
/// belongs to liblwi's own copy of the Rust runtime: the host's panics are not affected.
pub(crate) fn silence_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|_| {})));
}

/// Runs a free or a getter: a panic is caught, and the thread's last error is never touched, so
/// the message of the last failed call survives the clean-up a host does after it.
pub(crate) fn quiet<T>(fallback: T, body: impl FnOnce() -> lwi::Result<T>) -> T {
    silence_panics();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(v)) => v,
        _ => fallback,
    }
}

/// The ABI version this library implements; equal to `LWI_ABI_VERSION` of the header the host
/// was compiled with, or the host must not make other calls.
#[unsafe(no_mangle)]
pub extern "C" fn lwi_abi_version() -> u32 {
    LWI_ABI_VERSION
}

/// The message of the last failed call on this thread ("" after a successful one). It stays
/// readable until the next *fallible* call of this thread (one that returns an `LwiStatus`) fails
/// or succeeds: frees (`*_free`) and getters ([`lwi_last_error`], [`lwi_abi_version`],
/// [`lwi_version_json`], [`lwi_model_info_json`]) never change it, so a host may free its handles
/// before reading it. Owned by the library; valid until that next fallible call. Never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn lwi_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// A JSON object describing this build: `lwi_version`, `libtorch_version`, `abi_version`,
/// `cuda_available`, `cudnn_available`, `devices` (e.g. `["cpu", "cuda:0"]`), `gpus` (per CUDA
/// device: `device`, `compute_capability` e.g. 90, `bf16`: whether bf16 runs natively), `cpu`
/// (`avx512_bf16`, `amx_bf16`: the processor's bfloat16 instructions; with either, precision bf16
/// runs on the CPU), `threads`.
/// Owned by the library; valid until it is unloaded. NULL only if the library is broken. A getter:
/// it never changes [`lwi_last_error`].
#[unsafe(no_mangle)]
pub extern "C" fn lwi_version_json() -> *const c_char {
    static JSON: OnceLock<CString> = OnceLock::new();
    quiet(std::ptr::null(), || {
        let json = JSON.get_or_init(|| {
            let mut v = serde_json::to_value(lwi::engine::runtime_info()).unwrap_or_default();
            v["abi_version"] = LWI_ABI_VERSION.into();
            CString::new(v.to_string()).unwrap_or_default()
        });
        Ok(json.as_ptr())
    })
}
