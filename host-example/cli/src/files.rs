//! Files the command line names: volume and DICOM inputs, JSON files read safely, and outputs
//! written through a temporary name.

use crate::Failure;
use std::path::Path;

/// File endings of the volumes `lwi segment` writes (`.dcm`: a DICOM SEG).
pub const VOLUME_ENDINGS: [&str; 5] = [".nii.gz", ".nii", ".nrrd", ".nhdr", ".dcm"];

/// DICOM input: a folder, a DICOMDIR or a `.dcm` file.
pub fn is_dicom_path(p: &Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.as_encoded_bytes().to_ascii_lowercase())
        .unwrap_or_default();
    p.is_dir() || name == b"dicomdir" || name.ends_with(b".dcm")
}

/// A JSON file named on the command line. Only a regular file is read: a FIFO would block the
/// command, a device would be read without end. The open is non-blocking, the type checked on it.
pub fn read_json(p: &Path) -> Result<serde_json::Value, Failure> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |e: String| Failure::Usage(format!("{}: {e}", p.display()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)
        .map_err(|e| fail(e.to_string()))?;
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file; a JSON file is needed".into()));
    }
    let mut text = String::new();
    file.take(meta.len())
        .read_to_string(&mut text)
        .map_err(|e| fail(e.to_string()))?;
    // As the engine reads JSON: a key twice or nesting without end is refused, not collapsed.
    lwi_json::parse(&text).map_err(|e| {
        Failure::Usage(lwi_json::shorten_quotes(&format!(
            "{}: not JSON ({e})",
            p.display()
        )))
    })
}

/// Writes `bytes` to `path` through a temporary name beside it, renamed into place: a failed or
/// interrupted write leaves no partial file.
pub fn write_whole(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    use std::io::Write;
    let fail = |e: std::io::Error| Failure::Io(format!("{}: {e}", path.display()));
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(name);
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(fail)
}
