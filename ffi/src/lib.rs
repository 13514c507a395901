//! `liblwi.so`: the C ABI of the lwi engine, a thin skin over the `lwi` crate.
//!
//! Conventions (see `include/lwi.h`, generated from this file by cbindgen):
//! - every fallible call returns an [`LwiStatus`]; the message is read with [`lwi_last_error`];
//! - no panic crosses the boundary: each export runs inside [`guard`];
//! - NULL where a pointer is required is `LWI_STATUS_INVALID_ARGUMENT`, never a crash;
//! - handles are created with an out pointer and freed by `*_free`, which accepts NULL; a freed
//!   or foreign handle is refused, never read ([`handles`]).

mod handles;

use lwi::{DType, Error, ErrorKind, Volume};
use std::cell::RefCell;
use std::ffi::{CStr, CString, OsStr, c_char, c_void};
use std::os::unix::ffi::OsStrExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
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

/// Voxel storage types.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LwiDtype {
    Uint8 = 0,
    Int8 = 1,
    Uint16 = 2,
    Int16 = 3,
    Uint32 = 4,
    Int32 = 5,
    Uint64 = 6,
    Int64 = 7,
    Float32 = 8,
    Float64 = 9,
}

/// World frames a voxel-to-world matrix can be expressed in. 3D Slicer speaks RAS; ITK, DICOM and
/// SimpleITK speak LPS. Passed as `int32_t` so an out-of-range value is an error, not undefined
/// behaviour.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LwiSpace {
    /// +x Right, +y Anterior, +z Superior (NIfTI, Slicer).
    Ras = 0,
    /// +x Left, +y Posterior, +z Superior (DICOM, ITK).
    Lps = 1,
}

/// One progress report of a long call. Strings are owned by the library and valid during the
/// callback only.
#[repr(C)]
pub struct LwiProgress {
    /// `sizeof(LwiProgress)` as the library was built; fields are only ever appended.
    pub struct_size: u32,
    /// What is running: "preprocess", "infer", "resample", "train", "validate", ...
    pub stage: *const c_char,
    pub done: u64,
    /// 0 when unknown.
    pub total: u64,
    /// Training epoch, or -1.
    pub epoch: i64,
    /// Loss and metric of the last step, or NaN.
    pub loss: f64,
    pub metric: f64,
    pub message: *const c_char,
    /// This process's rank in a data-parallel training job, or -1 for a single process.
    pub rank: i32,
}

/// Progress callback: return 0 to go on, anything else to cancel (the call then returns
/// `LWI_STATUS_CANCELLED` and leaves no partial output).
pub type LwiProgressFn =
    Option<unsafe extern "C" fn(user: *mut c_void, progress: *const LwiProgress) -> i32>;

/// A volume lent by the host for the duration of one call: `data` holds dims\[0\]·dims\[1\]·dims\[2\]
/// voxels of `dtype` (an `LwiDtype`), x fastest; `affine` maps voxel (i, j, k) to world mm in
/// `space` (`LWI_SPACE_RAS` as Slicer, `LWI_SPACE_LPS` as ITK), row-major.
#[repr(C)]
pub struct LwiVolume {
    /// `sizeof(LwiVolume)`: lets the library refuse a struct from a different header.
    pub struct_size: u32,
    pub dtype: i32,
    pub dims: [i64; 3],
    pub data: *const c_void,
    pub affine: [f64; 16],
    pub space: i32,
}

/// Where work runs (device, CPU threads). Create with [`lwi_engine_create`], free with
/// [`lwi_engine_free`]. Models loaded through an engine live on its device.
pub struct LwiEngine {
    engine: lwi::engine::Engine,
}

/// A model loaded from a model file. Create with [`lwi_model_load`], free with [`lwi_model_free`].
/// Segmenting reads the model only: several threads may segment with one model at once (tested
/// with two threads, shared and separate models); freeing it while a call runs is the host's bug.
pub struct LwiModel {
    model: lwi::bundle::Model,
    /// `lwi_model_info_json`'s text, made on first request and owned by the model.
    info: OnceLock<CString>,
}

/// A volume read by lwi and owned by the library: voxels plus their place in the world.
/// Create with [`lwi_volume_read`], free with [`lwi_volume_free`].
pub struct LwiVolumeHandle {
    volume: Volume,
}

// SAFETY: hosts may use one handle from several threads (the C ABI allows it). Every call only
// reads a handle's tensors and modules, and libtorch supports concurrent reads of a tensor; the one
// lazily written field, `LwiModel::info`, is a `OnceLock`.
unsafe impl Sync for LwiEngine {}
unsafe impl Sync for LwiModel {}
unsafe impl Sync for LwiVolumeHandle {}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
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
fn guard(name: &str, body: impl FnOnce() -> lwi::Result<()>) -> LwiStatus {
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
fn silence_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|_| {})));
}

fn null(what: &str) -> Error {
    Error::invalid(format!("{what} is NULL"))
}

/// A borrowed C string as a path (bytes taken as they are, as the OS does).
///
/// SAFETY (callers): `p` is NULL or points to a NUL-terminated string valid for the call.
unsafe fn path_arg<'a>(p: *const c_char, what: &str) -> lwi::Result<&'a Path> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    if bytes.is_empty() {
        return Err(Error::invalid(format!("{what} is empty")));
    }
    Ok(Path::new(OsStr::from_bytes(bytes)))
}

/// A borrowed C string as UTF-8 text; NULL reads as `default`.
///
/// SAFETY (callers): `p` is NULL or points to a NUL-terminated string valid for the call.
unsafe fn text_arg<'a>(p: *const c_char, what: &str, default: &'a str) -> lwi::Result<&'a str> {
    if p.is_null() {
        return Ok(default);
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Error::invalid(format!("{what} is not UTF-8")))
}

/// The out-parameter convention of every call that hands something to the host: `*out` is
/// cleared first (so it is NULL on any failure), then set to what `make` returns.
///
/// SAFETY (callers): `out` is NULL or writable.
unsafe fn hand_over<T>(
    out: *mut *mut T,
    what: &str,
    make: impl FnOnce() -> lwi::Result<*mut T>,
) -> lwi::Result<()> {
    if out.is_null() {
        return Err(null(what));
    }
    // SAFETY: `out` is non-NULL and writable by the caller's contract.
    unsafe { *out = std::ptr::null_mut() };
    let made = make()?;
    // SAFETY: as above.
    unsafe { *out = made };
    Ok(())
}

/// Hands the volume `read` gives to the host as a new handle.
///
/// SAFETY (callers): `out` is NULL or writable.
unsafe fn volume_out(
    out: *mut *mut LwiVolumeHandle,
    read: impl FnOnce() -> lwi::Result<Volume>,
) -> lwi::Result<()> {
    // SAFETY: forwarded caller contract.
    unsafe {
        hand_over(out, "out", || {
            Ok(handles::hand_out(LwiVolumeHandle { volume: read()? }))
        })
    }
}

/// Hands the text `make` gives to the host (freed by `lwi_string_free`).
///
/// SAFETY (callers): `out_json` is NULL or writable.
unsafe fn string_out(
    out_json: *mut *mut c_char,
    make: impl FnOnce() -> lwi::Result<String>,
) -> lwi::Result<()> {
    let text = || {
        CString::new(make()?)
            .map(CString::into_raw)
            .map_err(|e| Error::internal(e.to_string()))
    };
    // SAFETY: forwarded caller contract.
    unsafe { hand_over(out_json, "out_json", text) }
}

/// A series UID argument: NULL or "" means the default series.
///
/// SAFETY (callers): `uid` is NULL or a NUL-terminated string.
unsafe fn series_arg<'a>(uid: *const c_char) -> lwi::Result<Option<&'a str>> {
    // SAFETY: forwarded caller contract.
    let uid = unsafe { text_arg(uid, "series_uid", "")? };
    Ok(Some(uid).filter(|u| !u.is_empty()))
}

/// Runs a free or a getter: a panic is caught, and the thread's last error is never touched, so
/// the message of the last failed call survives the clean-up a host does after it.
fn quiet<T>(fallback: T, body: impl FnOnce() -> lwi::Result<T>) -> T {
    silence_panics();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(v)) => v,
        _ => fallback,
    }
}

/// Frees a handle through the registry; NULL and anything not live are left alone.
fn free_handle<T: std::any::Any + Send + Sync>(ptr: *const T, what: &str) {
    if !ptr.is_null() {
        quiet((), || handles::release(ptr, what));
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
/// device: `device`, `compute_capability` e.g. 90, `bf16`: whether bf16 runs natively), `threads`.
/// Owned by the library; valid until it is unloaded. NULL only if the library is broken. A getter:
/// it never changes [`lwi_last_error`].
#[unsafe(no_mangle)]
pub extern "C" fn lwi_version_json() -> *const c_char {
    static JSON: OnceLock<CString> = OnceLock::new();
    quiet(std::ptr::null(), || {
        let json = JSON.get_or_init(|| {
            let mut v = serde_json::to_value(lwi::runtime::runtime_info()).unwrap_or_default();
            v["abi_version"] = LWI_ABI_VERSION.into();
            CString::new(v.to_string()).unwrap_or_default()
        });
        Ok(json.as_ptr())
    })
}

/// Reads the volume at `in_path` and writes it to `out_path`, formats chosen by extension
/// (`.nii`, `.nii.gz`, `.nrrd`, `.nhdr`); `in_path` may also be DICOM (a folder, a DICOMDIR or a
/// `.dcm` file: the largest CT/MR series). World geometry is kept exactly; the output is written
/// to a temporary name and renamed, so a failure leaves no partial file.
///
/// # Safety
/// `in_path` and `out_path` are NULL or NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_volume_convert(
    in_path: *const c_char,
    out_path: *const c_char,
) -> LwiStatus {
    guard("lwi_volume_convert", || {
        // SAFETY: forwarded caller contract.
        let (src, dst) = unsafe {
            (
                path_arg(in_path, "in_path")?,
                path_arg(out_path, "out_path")?,
            )
        };
        lwi::io::write_volume(&lwi::io::read_volume(src)?, dst)
    })
}

/// Reads a volume (NIfTI, NRRD, or DICOM: a folder, a DICOMDIR or a `.dcm` file, the largest
/// CT/MR series) into a new handle stored in `*out` (set to NULL on failure). Free it with
/// [`lwi_volume_free`].
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_volume_read(
    path: *const c_char,
    out: *mut *mut LwiVolumeHandle,
) -> LwiStatus {
    guard("lwi_volume_read", || {
        // SAFETY: forwarded caller contract.
        unsafe { volume_out(out, || lwi::io::read_volume(path_arg(path, "path")?)) }
    })
}

/// As [`lwi_volume_read`], choosing the DICOM series of a folder by its Series Instance UID
/// (NULL or "" for the default: the largest CT/MR series). A UID with non-DICOM input is refused.
///
/// # Safety
/// `path` and `series_uid` are NULL or NUL-terminated strings; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_volume_read_series(
    path: *const c_char,
    series_uid: *const c_char,
    out: *mut *mut LwiVolumeHandle,
) -> LwiStatus {
    guard("lwi_volume_read_series", || {
        // SAFETY: forwarded caller contract.
        unsafe {
            volume_out(out, || {
                lwi::io::read_volume_series(path_arg(path, "path")?, series_arg(series_uid)?)
            })
        }
    })
}

/// Reads one DICOM series from a list of `count` files (as a PACS export or a host's own file
/// selection gives them; order does not matter), choosing by Series Instance UID as
/// [`lwi_volume_read_series`] does. Files that are not readable images are passed over; none left is
/// `LWI_STATUS_FORMAT` naming them.
///
/// # Safety
/// `paths` is NULL or points to `count` pointers, each NULL or a NUL-terminated string; `series_uid`
/// is NULL or a NUL-terminated string; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_volume_read_dicom_files(
    paths: *const *const c_char,
    count: usize,
    series_uid: *const c_char,
    out: *mut *mut LwiVolumeHandle,
) -> LwiStatus {
    guard("lwi_volume_read_dicom_files", || {
        let read = || {
            if paths.is_null() {
                return Err(null("paths"));
            }
            if count == 0 {
                return Err(Error::invalid("count is 0: no files given"));
            }
            // SAFETY: `paths` holds `count` pointers by the caller's contract.
            let list = unsafe { std::slice::from_raw_parts(paths, count) };
            let files = list
                .iter()
                .enumerate()
                // SAFETY: each entry is NULL or a NUL-terminated string by the caller's contract.
                .map(|(i, &p)| {
                    unsafe { path_arg(p, &format!("paths[{i}]")) }.map(Path::to_path_buf)
                })
                .collect::<lwi::Result<Vec<_>>>()?;
            // SAFETY: forwarded caller contract.
            let uid = unsafe { series_arg(series_uid)? };
            Ok(lwi::io::dicom::read_files(&files, uid)?.volume)
        };
        // SAFETY: forwarded caller contract.
        unsafe { volume_out(out, read) }
    })
}

/// The DICOM series under `path` (a folder searched recursively, a DICOMDIR or a file) as JSON:
/// `{"series": [{"series_uid", "modality", "description", "rows", "columns", "slices", "files"}…],
/// "skipped": [{"file", "reason"}…]}`, largest series first. Free with [`lwi_string_free`].
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out_json` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_dicom_series_json(
    path: *const c_char,
    out_json: *mut *mut c_char,
) -> LwiStatus {
    guard("lwi_dicom_series_json", || {
        let list = || {
            // SAFETY: forwarded caller contract.
            let (series, skipped) = lwi::io::dicom::list(unsafe { path_arg(path, "path")? })?;
            let skipped: Vec<_> = skipped
                .iter()
                .map(|(f, why)| serde_json::json!({"file": f.display().to_string(), "reason": why}))
                .collect();
            Ok(serde_json::json!({"series": series, "skipped": skipped}).to_string())
        };
        // SAFETY: forwarded caller contract.
        unsafe { string_out(out_json, list) }
    })
}

/// Writes the volume to `path` (format by extension), through a temporary name.
///
/// # Safety
/// `volume` is NULL or a live handle; `path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_volume_write(
    volume: *const LwiVolumeHandle,
    path: *const c_char,
) -> LwiStatus {
    guard("lwi_volume_write", || {
        let h = handles::borrow(volume, "volume")?;
        // SAFETY: forwarded caller contract.
        let p = unsafe { path_arg(path, "path")? };
        lwi::io::write_volume(&h.volume, p)
    })
}

/// Voxels along x, y, z (x varies fastest in [`lwi_volume_copy_voxels`]).
///
/// # Safety
/// `volume` is NULL or a live handle; `dims` is NULL or points to 3 writable `int64_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_volume_dims(
    volume: *const LwiVolumeHandle,
    dims: *mut i64,
) -> LwiStatus {
    guard("lwi_volume_dims", || {
        let h = handles::borrow(volume, "volume")?;
        if dims.is_null() {
            return Err(null("dims"));
        }
        // SAFETY: `dims` points to 3 writable values by the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(h.volume.dims().as_ptr(), dims, 3) };
        Ok(())
    })
}

fn dtype_code(d: DType) -> LwiDtype {
    match d {
        DType::U8 => LwiDtype::Uint8,
        DType::I8 => LwiDtype::Int8,
        DType::U16 => LwiDtype::Uint16,
        DType::I16 => LwiDtype::Int16,
        DType::U32 => LwiDtype::Uint32,
        DType::I32 => LwiDtype::Int32,
        DType::U64 => LwiDtype::Uint64,
        DType::I64 => LwiDtype::Int64,
        DType::F32 => LwiDtype::Float32,
        DType::F64 => LwiDtype::Float64,
    }
}

/// The voxel type (scaled NIfTI data reads as float32, or float64 for float64 files).
///
/// # Safety
/// `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_volume_dtype(
    volume: *const LwiVolumeHandle,
    out: *mut LwiDtype,
) -> LwiStatus {
    guard("lwi_volume_dtype", || {
        let h = handles::borrow(volume, "volume")?;
        if out.is_null() {
            return Err(null("out"));
        }
        // SAFETY: `out` is writable by the caller's contract.
        unsafe { *out = dtype_code(h.volume.dtype) };
        Ok(())
    })
}

/// The 4×4 voxel-to-world matrix, row-major, in millimetres: `world = M · (i, j, k, 1)`, with world
/// in RAS (`space` = `LWI_SPACE_RAS`) or LPS (`LWI_SPACE_LPS`).
///
/// # Safety
/// `out` is NULL or points to 16 writable doubles.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_volume_affine(
    volume: *const LwiVolumeHandle,
    space: i32,
    out: *mut f64,
) -> LwiStatus {
    guard("lwi_volume_affine", || {
        let h = handles::borrow(volume, "volume")?;
        if out.is_null() {
            return Err(null("out"));
        }
        let m = match space {
            s if s == LwiSpace::Ras as i32 => h.volume.affine,
            s if s == LwiSpace::Lps as i32 => lwi::flip_lps_ras(&h.volume.affine),
            other => {
                return Err(Error::invalid(format!(
                    "space {other} is neither LWI_SPACE_RAS (0) nor LWI_SPACE_LPS (1)"
                )));
            }
        };
        let flat: Vec<f64> = m.iter().flatten().copied().collect();
        // SAFETY: `out` points to 16 writable doubles by the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(flat.as_ptr(), out, 16) };
        Ok(())
    })
}

/// Copies the voxels into `dst` in the volume's dtype, x fastest then y then z (the layout of
/// NIfTI, ITK and VTK buffers). `dst_bytes` must equal dims\[0\]·dims\[1\]·dims\[2\]·sizeof(dtype).
///
/// # Safety
/// `dst` is NULL or points to `dst_bytes` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_volume_copy_voxels(
    volume: *const LwiVolumeHandle,
    dst: *mut c_void,
    dst_bytes: usize,
) -> LwiStatus {
    guard("lwi_volume_copy_voxels", || {
        let h = handles::borrow(volume, "volume")?;
        if dst.is_null() {
            return Err(null("dst"));
        }
        let need = h.volume.dtype.byte_size(h.volume.dims())?;
        if dst_bytes != need {
            return Err(Error::invalid(format!(
                "dst_bytes is {dst_bytes}; this volume needs exactly {need}"
            )));
        }
        let bytes = h.volume.dtype.le_bytes_from_tensor(&h.volume.data)?;
        // SAFETY: `dst` has `dst_bytes` == bytes.len() writable bytes by the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst.cast::<u8>(), bytes.len()) };
        Ok(())
    })
}

/// Frees a handle from [`lwi_volume_read`]. NULL is a no-op.
///
/// A pointer that is not a live volume (freed already) is left alone. Never changes
/// [`lwi_last_error`].
#[unsafe(no_mangle)]
pub extern "C" fn lwi_volume_free(volume: *mut LwiVolumeHandle) {
    free_handle(volume, "volume");
}

/// Writes a synthetic CT dataset (MSD / nnU-Net layout: `imagesTr/`, `labelsTr/`, `dataset.json`)
/// under `out_dir`. `options_json` (NULL for defaults) is an object with optional keys `cases`
/// (default 4), `seed` (0), `size` (\[96, 96, 64\]) and `spacing` (mm, per case jittered by default).
/// Same options, same bytes.
///
/// # Safety
/// `out_dir` and `options_json` are NULL or NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_phantom_dataset(
    out_dir: *const c_char,
    options_json: *const c_char,
) -> LwiStatus {
    guard("lwi_phantom_dataset", || {
        // SAFETY: forwarded caller contract.
        let (dir, json) = unsafe {
            (
                path_arg(out_dir, "out_dir")?,
                text_arg(options_json, "options_json", "{}")?,
            )
        };
        let opts: lwi::phantom::PhantomOptions = lwi::options::parse(json, "options_json")?;
        lwi::phantom::write_dataset(dir, &opts).map(|_| ())
    })
}

/// Creates an engine. `options_json` (NULL or "" for defaults) may hold `device` (`"auto"` — the
/// first GPU if any, else the CPU —, `"cpu"` or `"cuda:N"`) and `threads` (libtorch's CPU thread
/// pool, per process). A GPU that is not there is `LWI_STATUS_DEVICE_UNAVAILABLE`.
///
/// # Safety
/// `options_json` is NULL or a NUL-terminated string; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_engine_create(
    options_json: *const c_char,
    out: *mut *mut LwiEngine,
) -> LwiStatus {
    guard("lwi_engine_create", || {
        let create = || {
            // SAFETY: forwarded caller contract.
            let json = unsafe { text_arg(options_json, "options_json", "")? };
            let engine = lwi::engine::Engine::from_json(json)?;
            Ok(handles::hand_out(LwiEngine { engine }))
        };
        // SAFETY: forwarded caller contract.
        unsafe { hand_over(out, "out", create) }
    })
}

/// Frees an engine. NULL is a no-op. Models loaded through it stay valid.
///
/// A pointer that is not a live engine is left alone. Never changes [`lwi_last_error`].
#[unsafe(no_mangle)]
pub extern "C" fn lwi_engine_free(engine: *mut LwiEngine) {
    free_handle(engine, "engine");
}

/// Loads a model file onto the engine's device. The file's metadata decides the architecture;
/// every tensor must then be present with its exact shape, and no other: a missing, extra or
/// misshapen tensor is `LWI_STATUS_MODEL_INCOMPATIBLE` naming it. A file that is not a model file
/// is `LWI_STATUS_FORMAT`.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_model_load(
    engine: *const LwiEngine,
    path: *const c_char,
    out: *mut *mut LwiModel,
) -> LwiStatus {
    guard("lwi_model_load", || {
        let load = || {
            let engine = handles::borrow(engine, "engine")?;
            // SAFETY: forwarded caller contract.
            let path = unsafe { path_arg(path, "path")? };
            let model = lwi::bundle::Model::load(path, engine.engine.device)?;
            Ok(handles::hand_out(LwiModel {
                model,
                info: OnceLock::new(),
            }))
        };
        // SAFETY: forwarded caller contract.
        unsafe { hand_over(out, "out", load) }
    })
}

/// A JSON object describing the model: `arch` ("unetr" or "unetr_pp"), `config` (the
/// architecture's keyword arguments, docs/models.md), `labels`
/// (value → name), `preprocessing`, `stage`, `provenance`, `parameters`, `device`. Owned by the
/// model, valid until [`lwi_model_free`]. NULL if `model` is NULL or not a live model. A getter: it
/// never changes [`lwi_last_error`].
#[unsafe(no_mangle)]
pub extern "C" fn lwi_model_info_json(model: *const LwiModel) -> *const c_char {
    quiet(std::ptr::null(), || {
        let m = handles::borrow(model, "model")?;
        Ok(m.info
            .get_or_init(|| CString::new(m.model.info_json().to_string()).unwrap_or_default())
            .as_ptr())
    })
}

/// Frees a model. NULL is a no-op.
///
/// A pointer that is not a live model is left alone; never changes [`lwi_last_error`]. A call still
/// using the model on another thread keeps it until that call returns.
#[unsafe(no_mangle)]
pub extern "C" fn lwi_model_free(model: *mut LwiModel) {
    free_handle(model, "model");
}

/// Converts a PyTorch checkpoint into an lwi model file at `out_path`: UNETR (`.pt`; MONAI 1.6.1 or
/// LWI-VMS key layout, plain or under `state_dict`) or UNETR++ (an nnU-Net v1 checkpoint such as
/// `model_final_checkpoint.model`, or a plain state dict; tied `F.*` accepted only when equal to
/// `E.*`). The pickle is parsed without executing anything. `options_json` holds `arch` ("unetr"
/// or "unetr_pp"), `arch_config` (the upstream constructor's keyword arguments), `labels`
/// (`{"0": "background", …}`), and optionally `spacing` (mm, default \[1.5, 1.5, 2.0\]; per stored
/// voxel axis for UNETR++) and `window` (HU, default \[-175, 250\]); for UNETR++ also `plans` (the
/// checkpoint's nnU-Net plans pickle: spacing, patch check, CT normalisation) or
/// `ct_normalization` (\[percentile_00_5, percentile_99_5, mean, sd\]). docs/models.md.
///
/// # Safety
/// Each argument is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_model_import(
    checkpoint_path: *const c_char,
    options_json: *const c_char,
    out_path: *const c_char,
) -> LwiStatus {
    guard("lwi_model_import", || {
        // SAFETY: forwarded caller contract.
        let (src, json, dst) = unsafe {
            (
                path_arg(checkpoint_path, "checkpoint_path")?,
                text_arg(options_json, "options_json", "")?,
                path_arg(out_path, "out_path")?,
            )
        };
        lwi::import::import(src, json)?.save(dst)
    })
}

/// Runs the raw network on a tensor (no preprocessing): `in_path` is a safetensors file holding `x`
/// `[B, C, D, H, W]` (float, the network's channels and `img_size`); every output is written to the
/// safetensors file `out_path` under its name — `logits` (UNETR), `out1`, `out2`, `out3` (UNETR++,
/// deep supervision included), `recon` and `t1`…`t4` for an init-train model — through a temporary
/// name. `options_json` is NULL or `{}` (reserved).
///
/// # Safety
/// The strings are NULL or NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_forward(
    model: *const LwiModel,
    in_path: *const c_char,
    out_path: *const c_char,
    options_json: *const c_char,
) -> LwiStatus {
    guard("lwi_forward", || {
        let m = handles::borrow(model, "model")?;
        // SAFETY: forwarded caller contract.
        let (src, dst, json) = unsafe {
            (
                path_arg(in_path, "in_path")?,
                path_arg(out_path, "out_path")?,
                text_arg(options_json, "options_json", "")?,
            )
        };
        lwi::options::parse::<lwi::forward::ForwardOptions>(json, "options_json")?;
        lwi::forward::forward_file(&m.model, src, dst).map(|_| ())
    })
}

/// Adapts a C progress callback to the engine's progress sink.
struct CallbackSink {
    callback: LwiProgressFn,
    user: *mut c_void,
}

impl lwi::events::Progress for CallbackSink {
    fn report(&mut self, e: &lwi::events::Event) -> bool {
        let Some(f) = self.callback else { return true };
        let stage = CString::new(e.stage).unwrap_or_default();
        let message = CString::new(e.message.replace('\0', " ")).unwrap_or_default();
        let p = LwiProgress {
            struct_size: std::mem::size_of::<LwiProgress>() as u32,
            stage: stage.as_ptr(),
            done: e.done,
            total: e.total,
            epoch: e.epoch.map_or(-1, |v| v as i64),
            loss: e.loss.unwrap_or(f64::NAN),
            metric: e.metric.unwrap_or(f64::NAN),
            message: message.as_ptr(),
            rank: e.rank.map_or(-1, |r| r as i32),
        };
        // SAFETY: the host promised a callable function; `p` and its strings live across the call.
        unsafe { f(self.user, &p) == 0 }
    }
}

fn dtype_of(code: i32) -> lwi::Result<DType> {
    DType::ALL
        .into_iter()
        .find(|d| dtype_code(*d) as i32 == code)
        .ok_or_else(|| Error::invalid(format!("dtype {code} is not an LwiDtype")))
}

/// Copies a borrowed `LwiVolume` into an engine volume (RAS inside).
///
/// SAFETY (callers): `v` is NULL or a valid `LwiVolume` whose `data` holds the voxels it declares.
unsafe fn volume_arg(v: *const LwiVolume) -> lwi::Result<Volume> {
    // SAFETY: a non-NULL pointer is valid by the caller's contract; struct_size is read first.
    let v = unsafe { v.as_ref() }.ok_or_else(|| null("volume"))?;
    if v.struct_size as usize != std::mem::size_of::<LwiVolume>() {
        return Err(Error::invalid(format!(
            "volume->struct_size is {}, this library's LwiVolume has {} bytes: rebuild against this lwi.h",
            v.struct_size,
            std::mem::size_of::<LwiVolume>()
        )));
    }
    let dtype = dtype_of(v.dtype)?;
    let n = dtype
        .byte_size(v.dims)
        .map_err(|e| Error::invalid(format!("volume->{}", e.message)))?;
    if v.data.is_null() {
        return Err(null("volume->data"));
    }
    let m: lwi::Affine = std::array::from_fn(|r| std::array::from_fn(|c| v.affine[4 * r + c]));
    let affine = match v.space {
        s if s == LwiSpace::Ras as i32 => m,
        s if s == LwiSpace::Lps as i32 => lwi::flip_lps_ras(&m),
        other => {
            return Err(Error::invalid(format!(
                "volume->space {other} is neither LWI_SPACE_RAS nor LWI_SPACE_LPS"
            )));
        }
    };
    // SAFETY: the host lends `n` readable bytes at `data` for this call.
    let bytes = unsafe { std::slice::from_raw_parts(v.data.cast::<u8>(), n) };
    let data = dtype.tensor_from_le_bytes(bytes, v.dims)?;
    Volume::new(data, affine, dtype)
}

/// Segments a volume lent by the host into `out_labels`, a caller-allocated buffer of the input's
/// dims in `out_dtype` (`LWI_DTYPE_UINT8` or `LWI_DTYPE_UINT16`; `out_bytes` must be exactly its
/// size), x fastest, on the input's own grid. `options_json` (NULL for defaults): `overlap` (0.5),
/// `blend` ("gaussian" | "constant"), `sw_batch` (1 on the CPU, 4 on CUDA), `tta_axes` (\[\]), `resample`
/// ("scores" | "nearest"), `precision` ("fp32" | "bf16" | "fp16", autocast on CUDA), `slab` (32),
/// `largest_component` (false), `max_gpu_accumulator_mb` (none: the sums stay on the GPU, and move
/// to the CPU with a warning event only on out-of-memory), `save_preprocessed` (a path),
/// `fused_norm` (true: on CUDA, lwi's fused normalisation kernel; false: ATen's kernels), `mirror`
/// (models of the nnU-Net pipeline, UNETR++: average each window over the 8 mirrorings; default true;
/// docs/models.md).
/// `progress` may be NULL. The library keeps no pointer after returning.
///
/// # Safety
/// `volume` is NULL or valid as documented on `LwiVolume`; `out_labels`
/// is NULL or holds `out_bytes` writable bytes; `options_json` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_segment(
    model: *const LwiModel,
    volume: *const LwiVolume,
    out_labels: *mut c_void,
    out_dtype: i32,
    out_bytes: usize,
    options_json: *const c_char,
    progress: LwiProgressFn,
    user: *mut c_void,
) -> LwiStatus {
    guard("lwi_segment", || {
        let m = handles::borrow(model, "model")?;
        // SAFETY: forwarded caller contract.
        let (input, json) = unsafe {
            (
                volume_arg(volume)?,
                text_arg(options_json, "options_json", "")?,
            )
        };
        let out_type = dtype_of(out_dtype)?;
        if !matches!(out_type, DType::U8 | DType::U16) {
            return Err(Error::invalid(
                "out_dtype must be LWI_DTYPE_UINT8 or LWI_DTYPE_UINT16",
            ));
        }
        let need = out_type.byte_size(input.dims())?;
        if out_labels.is_null() {
            return Err(null("out_labels"));
        }
        if out_bytes != need {
            return Err(Error::invalid(format!(
                "out_bytes is {out_bytes}; the labels need exactly {need}"
            )));
        }
        if out_type == DType::U8 && m.model.meta.arch.out_channels() > 256 {
            return Err(Error::invalid(
                "the model has more than 256 classes: use LWI_DTYPE_UINT16",
            ));
        }
        let opts = lwi::segment::SegmentOptions::from_json(json)?;
        let labels = lwi::segment::segment(
            &m.model,
            &input,
            &opts,
            &mut CallbackSink {
                callback: progress,
                user,
            },
        )?;
        let bytes = out_type.le_bytes_from_tensor(&labels.data)?;
        // SAFETY: `out_labels` has `out_bytes` == bytes.len() writable bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), out_labels.cast::<u8>(), bytes.len())
        };
        Ok(())
    })
}

/// Segments the volume file `in_path` (`.nii`, `.nii.gz`, `.nrrd`, `.nhdr`, or DICOM: a folder, a
/// DICOMDIR or a `.dcm` file; `"series"` in the options picks a series) into the label file
/// `out_path` (format by extension; `.dcm` writes a DICOM Segmentation referencing a DICOM input)
/// on the input's grid, written through a temporary name, plus
/// `OUT_PATH.json` (lwi version, model hash, device, precision, options, timings) unless
/// `options_json` has `"manifest": false`. Other options as [`lwi_segment`].
///
/// # Safety
/// The strings are NULL or NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_segment_file(
    model: *const LwiModel,
    in_path: *const c_char,
    out_path: *const c_char,
    options_json: *const c_char,
    progress: LwiProgressFn,
    user: *mut c_void,
) -> LwiStatus {
    guard("lwi_segment_file", || {
        let m = handles::borrow(model, "model")?;
        // SAFETY: forwarded caller contract.
        let (src, dst, json) = unsafe {
            (
                path_arg(in_path, "in_path")?,
                path_arg(out_path, "out_path")?,
                text_arg(options_json, "options_json", "")?,
            )
        };
        let opts = lwi::segment::SegmentOptions::from_json(json)?;
        lwi::segment::segment_file(
            &m.model,
            src,
            dst,
            &opts,
            &mut CallbackSink {
                callback: progress,
                user,
            },
        )
        .map(|_| ())
    })
}

/// Scores a prediction against a reference: two label files on the same grid, or two folders
/// whose files are matched by name. `options_json` (NULL for defaults) may hold `labels` (a list of
/// label values; default: every non-zero label present). On success `*out_json` receives the report
/// (per-case, per-label `dice` and `hd95` in mm, per-label means, `synapse_8_mean`); free it with
/// [`lwi_string_free`].
///
/// # Safety
/// The strings are NULL or NUL-terminated; `out_json` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_evaluate(
    pred_path: *const c_char,
    ref_path: *const c_char,
    options_json: *const c_char,
    out_json: *mut *mut c_char,
) -> LwiStatus {
    guard("lwi_evaluate", || {
        let report = || {
            // SAFETY: forwarded caller contract.
            let (pred, reference, json) = unsafe {
                (
                    path_arg(pred_path, "pred_path")?,
                    path_arg(ref_path, "ref_path")?,
                    text_arg(options_json, "options_json", "{}")?,
                )
            };
            let opts: lwi::metrics::EvaluateOptions = lwi::options::parse(json, "options_json")?;
            Ok(lwi::metrics::evaluate(pred, reference, opts.labels.as_deref())?.to_string())
        };
        // SAFETY: forwarded caller contract.
        unsafe { string_out(out_json, report) }
    })
}

/// Frees a string the library returned through an out pointer. NULL is a no-op.
///
/// # Safety
/// `s` is NULL or a string from lwi not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: made by CString::into_raw in this library, freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { CString::from_raw(s) })));
    }
}

/// Runs `train` for `stage` with a JSON configuration and a progress callback.
fn train_call(
    stage: lwi::bundle::Stage,
    engine: *const LwiEngine,
    config_json: *const c_char,
    progress: LwiProgressFn,
    user: *mut c_void,
) -> lwi::Result<()> {
    let engine = handles::borrow(engine, "engine")?;
    // SAFETY: forwarded caller contract of the two exports below.
    let json = unsafe { text_arg(config_json, "config_json", "")? };
    if json.trim().is_empty() {
        return Err(null("config_json"));
    }
    let cfg = lwi::train::TrainConfig::from_json(json)?;
    lwi::train::train(
        stage,
        &cfg,
        engine.engine.device,
        &mut CallbackSink {
            callback: progress,
            user,
        },
    )
    .map(|_| ())
}

/// Stage 1, learnable weight initialization: trains UNETR on the pretext task (depth-slab
/// shuffling + cube masking; reconstruction + order prediction) and writes a model file with stage
/// `init` and the order heads. `config_json` holds `dataset` and `out` (required) and any of the
/// training options (docs/training.md); the engine's device is used unless `device` is given.
/// Checkpoints go to `OUT.ckpt` every `checkpoint_every` epochs; `"resume": true` continues from
/// one. A non-zero return from `progress` stops within one iteration with `LWI_STATUS_CANCELLED`,
/// leaving the last checkpoint intact.
///
/// Data-parallel training (docs/distributed.md): under torchrun (`RANK`, `WORLD_SIZE`,
/// `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or an srun step (`SLURM_PROCID`,
/// `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`, the address from the node list) each process calling
/// this is one rank of a job over libtorch's c10d (Gloo; NCCL on CUDA). A host that starts the
/// ranks itself says so in the config: `"distributed": {"rank": R, "world_size": W,
/// "local_rank": L, "master_addr": "HOST", "master_port": P}`, with `"backend"` ("auto", "gloo",
/// "nccl"), `"timeout_s"` (a step's collectives, default 60) and `"wait_s"` (joining, validation,
/// checkpoints; default 1800); `"enabled": false` ignores the environment. `batch_size` is per
/// rank; every rank must pass the same config (its own rank, device and threads aside) or all
/// fail; rank 0 alone writes files; progress events carry `rank` (-1 for one process). A rank that
/// fails, dies or stops answering ends the others with `LWI_STATUS_IO` within `timeout_s`.
///
/// # Safety
/// `config_json` is NULL or a NUL-terminated string; `progress` may be NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_init_train(
    engine: *const LwiEngine,
    config_json: *const c_char,
    progress: LwiProgressFn,
    user: *mut c_void,
) -> LwiStatus {
    guard("lwi_init_train", || {
        train_call(
            lwi::bundle::Stage::Init,
            engine,
            config_json,
            progress,
            user,
        )
    })
}

/// Stage 2, fine-tuning for segmentation: from `init` (an init-train model: every tensor kept but
/// the output conv, fresh for the dataset's classes) or from scratch when `init` is absent. Loss
/// DiceCE; validation Dice on the dataset's `validation` list every `val_every` epochs, the best
/// model kept as `NAME.best.safetensors`. Otherwise as [`lwi_init_train`].
///
/// # Safety
/// As [`lwi_init_train`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_fine_tune(
    engine: *const LwiEngine,
    config_json: *const c_char,
    progress: LwiProgressFn,
    user: *mut c_void,
) -> LwiStatus {
    guard("lwi_fine_tune", || {
        train_call(
            lwi::bundle::Stage::Segmentation,
            engine,
            config_json,
            progress,
            user,
        )
    })
}
