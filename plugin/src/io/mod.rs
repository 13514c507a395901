//! Reading and writing volumes. The format is chosen by the path's extension; every writer goes
//! through [`write_atomically`] so a reader never sees half a file.

pub mod dicom;
pub mod dicom_seg;
pub mod nifti;
pub mod nrrd;

use crate::error::{Error, ErrorKind, Result};
use crate::volume::Volume;
use flate2::read::GzDecoder;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

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
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if name.ends_with(".nii.gz") {
            Ok(Format::Nifti { gzip: true })
        } else if name.ends_with(".nii") {
            Ok(Format::Nifti { gzip: false })
        } else if name.ends_with(".nrrd") {
            Ok(Format::Nrrd { detached: false })
        } else if name.ends_with(".nhdr") {
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
    match Format::from_path(path)? {
        Format::Nifti { gzip } => nifti::write(volume, path, gzip),
        Format::Nrrd { detached } => nrrd::write(volume, path, detached),
    }
}

/// Inflates gzip data (all members), refusing more than `limit` bytes.
pub(crate) fn inflate(path: &Path, gz: &[u8], limit: u64) -> Result<Vec<u8>> {
    // Fast path: one gzip member inflated by libdeflate straight into a buffer of the size the
    // header promises. Anything else (several members, trailing bytes, too much data, corruption)
    // goes through flate2's streaming decoder, which also words the errors.
    if let Ok(size) = usize::try_from(limit) {
        let mut out = vec![0u8; size];
        if let Ok(n) = libdeflater::Decompressor::new().gzip_decompress(gz, &mut out) {
            out.truncate(n);
            return Ok(out);
        }
    }
    let mut out = Vec::new();
    let mut decoder = flate2::read::MultiGzDecoder::new(gz).take(limit.saturating_add(1));
    decoder
        .read_to_end(&mut out)
        .map_err(|e| Error::format(path, format!("gzip data is corrupt or truncated ({e})")))?;
    if out.len() as u64 > limit {
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

/// Writes `bytes` to `path` through a temporary file in the same folder, renamed into place, so an
/// interrupted write never leaves a truncated file under the final name.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        let mut err = Error::io(path, e);
        if err.kind == ErrorKind::Io {
            err.message = format!("cannot write {}", err.message);
        }
        err
    })
}

/// Converts big-endian packed values of `size` bytes to little-endian, in place.
pub(crate) fn swap_bytes(data: &mut [u8], size: usize) {
    if size > 1 {
        data.chunks_exact_mut(size).for_each(|c| c.reverse());
    }
}
