//! Reading the host's arguments, and handing results back through out pointers.

use crate::handles;
use crate::status::quiet;
use lwi::Error;
use std::ffi::{CStr, CString, OsStr, c_char};
use std::os::unix::ffi::OsStrExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

pub(crate) fn null(what: &str) -> Error {
    Error::invalid(format!("{what} is NULL"))
}

/// A borrowed C string as a path (bytes taken as they are, as the OS does).
///
/// SAFETY (callers): `p` is NULL or points to a NUL-terminated string valid for the call.
pub(crate) unsafe fn path_arg<'a>(p: *const c_char, what: &str) -> lwi::Result<&'a Path> {
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
pub(crate) unsafe fn text_arg<'a>(
    p: *const c_char,
    what: &str,
    default: &'a str,
) -> lwi::Result<&'a str> {
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
pub(crate) unsafe fn hand_over<T>(
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

/// Hands the text `make` gives to the host (freed by `lwi_string_free`).
///
/// SAFETY (callers): `out_json` is NULL or writable.
pub(crate) unsafe fn string_out(
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
pub(crate) unsafe fn series_arg<'a>(uid: *const c_char) -> lwi::Result<Option<&'a str>> {
    // SAFETY: forwarded caller contract.
    let uid = unsafe { text_arg(uid, "series_uid", "")? };
    Ok(Some(uid).filter(|u| !u.is_empty()))
}

/// Frees a handle through the registry; NULL and anything not live are left alone.
pub(crate) fn free_handle<T: std::any::Any + Send + Sync>(ptr: *const T, what: &str) {
    if !ptr.is_null() {
        quiet((), || handles::release(ptr, what));
    }
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
