//! Reading and writing volumes. The format is chosen by the path's extension; every writer goes
//! through [`write_atomically`] so a reader never sees half a file.

pub mod anatomy;
pub mod dicom;
pub mod dicom_seg;
pub mod dicom_walk;
pub mod files;
pub mod nifti;
pub mod nrrd;
pub mod seg_fields;

pub use files::{all_or_nothing, check_regular, read_regular, read_text, write_atomically};

use crate::error::{Error, Result, try_vec};
use crate::volume::Volume;
use flate2::read::GzDecoder;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

/// File formats lwi reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.nii` or `.nii.gz` (gzip is chosen by the `.gz` suffix on write, by content on read).
    Nifti { gzip: bool },
    /// `.nrrd` (attached header, gzip encoding) or `.nhdr` (detached header + `.raw.gz` data).
    Nrrd { detached: bool },
}

impl Format {
    pub fn from_path(path: &Path) -> Result<Format> {
        // Bytes, not UTF-8: a name need not be valid Unicode, only its ending ASCII.
        let name = path
            .file_name()
            .map(|n| n.as_encoded_bytes().to_ascii_lowercase())
            .unwrap_or_default();
        if name.ends_with(b".nii.gz") {
            Ok(Format::Nifti { gzip: true })
        } else if name.ends_with(b".nii") {
            Ok(Format::Nifti { gzip: false })
        } else if name.ends_with(b".nrrd") {
            Ok(Format::Nrrd { detached: false })
        } else if name.ends_with(b".nhdr") {
            Ok(Format::Nrrd { detached: true })
        } else {
            Err(Error::unsupported(format!(
                "{}: unknown volume format (expected .nii, .nii.gz, .nrrd or .nhdr)",
                path.display()
            )))
        }
    }
}

/// Reads a volume: a DICOM folder, DICOMDIR or file (the largest CT/MR series), else by extension.
pub fn read_volume(path: &Path) -> Result<Volume> {
    read_volume_series(path, None)
}

/// As [`read_volume`], choosing the DICOM series by its Series Instance UID.
pub fn read_volume_series(path: &Path, series_uid: Option<&str>) -> Result<Volume> {
    std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if dicom::is_dicom(path) {
        return dicom::read(path, series_uid).map(|s| s.volume);
    }
    if let Some(uid) = series_uid {
        return Err(Error::invalid(format!(
            "{}: a series UID ({uid}) applies to DICOM input only",
            path.display()
        )));
    }
    match Format::from_path(path)? {
        Format::Nifti { .. } => nifti::read(path),
        Format::Nrrd { .. } => nrrd::read(path),
    }
}

/// Writes a volume, choosing the writer by extension.
pub fn write_volume(volume: &Volume, path: &Path) -> Result<()> {
    write_with_fields(volume, path, &[])
}

/// Writes a label map whose values `names` names; as NRRD it also carries 3D Slicer's segmentation
/// fields ([`seg_fields`]), so that Slicer reads it as a segmentation with those names.
pub fn write_labels(volume: &Volume, names: &BTreeMap<u32, String>, path: &Path) -> Result<()> {
    let fields = seg_fields::segmentation_fields(volume.dims(), names);
    write_with_fields(volume, path, &fields)
}

/// The format by extension; NRRD gets `nrrd_fields` as `key:=value` lines (NIfTI has no place for them).
fn write_with_fields(volume: &Volume, path: &Path, nrrd_fields: &[(String, String)]) -> Result<()> {
    match Format::from_path(path)? {
        Format::Nifti { gzip } => nifti::write(volume, path, gzip),
        Format::Nrrd { detached } => nrrd::write(volume, path, detached, nrrd_fields),
    }
}

/// Inflates gzip data (all members), refusing more than `limit` bytes. The buffer is allocated
/// once, fallibly (a failure is `OutOfMemory`, not an abort): callers bound `limit` first.
pub(crate) fn inflate(path: &Path, gz: &[u8], limit: u64) -> Result<Vec<u8>> {
    let size = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut out = try_vec(size, 0u8, format_args!("{} inflated", path.display()))?;
    // Fast path: one gzip member inflated by libdeflate straight into a buffer of the size the
    // header promises. Anything else (several members, trailing bytes, too much data, corruption)
    // goes through flate2's streaming decoder, which also words the errors.
    if let Ok(n) = libdeflater::Decompressor::new().gzip_decompress(gz, &mut out) {
        out.truncate(n);
        return Ok(out);
    }
    out.clear();
    let mut decoder = flate2::read::MultiGzDecoder::new(gz);
    let corrupt = |e| Error::format(path, format!("gzip data is corrupt or truncated ({e})"));
    (&mut decoder)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(corrupt)?;
    let more = decoder.read(&mut [0u8]).map_err(corrupt)?;
    if more > 0 {
        return Err(Error::format(
            path,
            format!("gzip data inflates to more than the {limit} bytes expected"),
        ));
    }
    Ok(out)
}

/// The first `n` inflated bytes of gzip data (fewer if it is shorter): enough to read a header.
pub(crate) fn read_gzip_prefix(path: &Path, gz: &[u8], n: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(n);
    GzDecoder::new(gz)
        .take(n as u64)
        .read_to_end(&mut out)
        .map_err(|e| Error::format(path, format!("gzip data is corrupt ({e})")))?;
    Ok(out)
}

/// Gzip-compresses `data` at a speed-oriented level (label maps and CT compress well at 1).
pub(crate) fn deflate(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 4),
        flate2::Compression::new(1),
    );
    enc.write_all(data).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

/// Converts big-endian packed values of `size` bytes to little-endian, in place.
pub(crate) fn swap_bytes(data: &mut [u8], size: usize) {
    if size > 1 {
        data.chunks_exact_mut(size).for_each(|c| c.reverse());
    }
}
