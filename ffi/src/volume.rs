//! Volumes: lent by the host (`LwiVolume`) or read by lwi (`LwiVolumeHandle`), their voxel
//! types and world frames, and the exports that read, write and describe them.

use crate::args::{free_handle, hand_over, null, path_arg, series_arg, string_out};
use crate::handles;
use crate::status::{LwiStatus, guard};
use lwi::{DType, Error, Volume};
use std::ffi::{c_char, c_void};
use std::path::Path;

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

/// A volume read by lwi and owned by the library: voxels plus their place in the world.
/// Create with [`lwi_volume_read`], free with [`lwi_volume_free`].
pub struct LwiVolumeHandle {
    volume: Volume,
}

// SAFETY: hosts may read one volume from several threads; every call only reads its tensor, and
// libtorch supports concurrent reads of a tensor.
unsafe impl Sync for LwiVolumeHandle {}

pub(crate) fn dtype_code(d: DType) -> LwiDtype {
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

pub(crate) fn dtype_of(code: i32) -> lwi::Result<DType> {
    DType::ALL
        .into_iter()
        .find(|d| dtype_code(*d) as i32 == code)
        .ok_or_else(|| Error::invalid(format!("dtype {code} is not an LwiDtype")))
}

/// A voxel-to-world matrix moved between RAS (lwi's own frame) and the frame `space` names. The
/// flip of x and y is its own inverse, so one function serves the way in and the way out.
fn between_frames(m: &lwi::Affine, space: i32, what: &str) -> lwi::Result<lwi::Affine> {
    match space {
        s if s == LwiSpace::Ras as i32 => Ok(*m),
        s if s == LwiSpace::Lps as i32 => Ok(lwi::flip_lps_ras(m)),
        other => Err(Error::invalid(format!(
            "{what} {other} is neither LWI_SPACE_RAS (0) nor LWI_SPACE_LPS (1)"
        ))),
    }
}

/// Copies a borrowed `LwiVolume` into an engine volume (RAS inside).
///
/// SAFETY (callers): `v` is NULL or a valid `LwiVolume` whose `data` holds the voxels it declares.
pub(crate) unsafe fn volume_arg(v: *const LwiVolume) -> lwi::Result<Volume> {
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
    let affine = between_frames(&m, v.space, "volume->space")?;
    // SAFETY: the host lends `n` readable bytes at `data` for this call.
    let bytes = unsafe { std::slice::from_raw_parts(v.data.cast::<u8>(), n) };
    let data = dtype.tensor_from_le_bytes(bytes, v.dims)?;
    Volume::new(data, affine, dtype)
}

/// Hands the volume `read` gives to the host as a new handle.
///
/// SAFETY (callers): `out` is NULL or writable.
pub(crate) unsafe fn volume_out(
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

/// Writes a volume lent by the host (`LwiVolume`: its voxels in its dtype, its matrix in its
/// `space`) to `path` (format by extension), through a temporary name: how a host saves an array it
/// holds, a label map from [`lwi_segment`] for instance, without a handle. The library keeps no
/// pointer after returning.
///
/// # Safety
/// `volume` is NULL or valid as documented on `LwiVolume`; `path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_volume_write_lent(
    volume: *const LwiVolume,
    path: *const c_char,
) -> LwiStatus {
    guard("lwi_volume_write_lent", || {
        // SAFETY: forwarded caller contract.
        let (v, p) = unsafe { (volume_arg(volume)?, path_arg(path, "path")?) };
        lwi::io::write_volume(&v, p)
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
        let m = between_frames(&h.volume.affine, space, "space")?;
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
