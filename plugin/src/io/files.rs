//! Files on disk, the safe way round. Reading: only regular files are opened (a FIFO, socket or
//! device is refused before anything can block on it or read it without end), and no read goes
//! past the file's size. Writing: through a temporary name renamed into place; inside
//! [`all_or_nothing`] every file a call writes appears together at its end, or none does.

use crate::error::{Error, ErrorKind, Result};
use std::cell::RefCell;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What a non-regular file is, for messages.
fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

/// Opens `path` (links followed) for reading if it is a regular file, and returns its size.
/// The open itself never blocks: it is non-blocking, and the type is checked on the open file.
pub fn open_regular(path: &Path) -> Result<(File, u64)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(Error::invalid(format!(
            "{}: {}; lwi reads regular files only",
            path.display(),
            kind_of(meta.file_type())
        )));
    }
    Ok((file, meta.len()))
}

/// Refuses anything that is not a regular file, without opening it.
pub fn check_regular(path: &Path) -> Result<u64> {
    open_regular(path).map(|(_, len)| len)
}

/// The whole of a regular file, never more bytes than its size when opened.
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    let capacity = usize::try_from(len).map_err(|_| {
        Error::new(
            ErrorKind::OutOfMemory,
            format!("{}: {len} bytes cannot be held", path.display()),
        )
    })?;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(capacity).map_err(|_| {
        Error::new(
            ErrorKind::OutOfMemory,
            format!("{}: cannot allocate {len} bytes to read it", path.display()),
        )
    })?;
    file.take(len)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// A regular file read as UTF-8 text.
pub fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(read_regular(path)?)
        .map_err(|_| Error::format(path, "the file is not UTF-8 text"))
}

thread_local! {
    /// Inside [`all_or_nothing`]: files written to temporary names, waiting to be renamed.
    static PENDING: RefCell<Option<Vec<(PathBuf, PathBuf)>>> = const { RefCell::new(None) };
}

/// Runs `body` so that the files it writes with [`write_atomically`] appear together when it
/// succeeds, and none of them when it fails, is cancelled or panics. Nested calls join the outer one.
pub fn all_or_nothing<T>(body: impl FnOnce() -> Result<T>) -> Result<T> {
    if PENDING.with(|p| p.borrow().is_some()) {
        return body();
    }
    PENDING.with(|p| *p.borrow_mut() = Some(Vec::new()));
    // Removes the temporary files on every way out that does not commit, unwinding included.
    struct Discard;
    impl Drop for Discard {
        fn drop(&mut self) {
            for (tmp, _) in PENDING.with(|p| p.borrow_mut().take()).unwrap_or_default() {
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
    let discard = Discard;
    let value = body()?;
    let staged = PENDING.with(|p| p.borrow_mut().take()).unwrap_or_default();
    std::mem::forget(discard);
    let mut done = Vec::new();
    for (i, (tmp, path)) in staged.iter().enumerate() {
        if let Err(e) = std::fs::rename(tmp, path) {
            staged[i..]
                .iter()
                .for_each(|(t, _)| drop(std::fs::remove_file(t)));
            done.iter()
                .for_each(|p: &&PathBuf| drop(std::fs::remove_file(p)));
            return Err(Error::io(path, e));
        }
        done.push(path);
    }
    Ok(value)
}

/// Writes `bytes` to `path` through a temporary file in the same folder, renamed into place, so an
/// interrupted write never leaves a truncated file under the final name. Inside
/// [`all_or_nothing`] the rename waits for the end of the call.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file path", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let staged = PENDING.with(|p| p.borrow().is_some());
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        if !staged {
            std::fs::rename(&tmp, path)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            if staged {
                PENDING.with(|p| {
                    // The same path written twice in one call: its last bytes win, renamed once.
                    if let Some(list) = p.borrow_mut().as_mut()
                        && !list.iter().any(|(t, _)| *t == tmp)
                    {
                        list.push((tmp, path.to_path_buf()));
                    }
                });
            }
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            let mut err = Error::io(path, e);
            if err.kind == ErrorKind::Io {
                err.message = format!("cannot write {}", err.message);
            }
            Err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("x.nii");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_regular(&fifo).unwrap_err();
        assert!(e.message.contains("a FIFO"), "{}", e.message);
        let e = read_regular(Path::new("/dev/zero")).unwrap_err();
        assert!(e.message.contains("character device"), "{}", e.message);
        assert!(read_regular(dir.path()).is_err());
    }

    #[test]
    fn files_of_a_failed_call_are_removed_and_of_a_good_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.txt"), dir.path().join("b.txt"));
        let failed: Result<()> = all_or_nothing(|| {
            write_atomically(&a, b"a")?;
            assert!(!a.exists(), "a staged file is not visible before the end");
            Err(Error::invalid("second step failed"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        all_or_nothing(|| {
            write_atomically(&a, b"a")?;
            write_atomically(&b, b"b")
        })
        .unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"a");
        assert_eq!(std::fs::read(&b).unwrap(), b"b");
        all_or_nothing(|| {
            write_atomically(&a, b"first")?;
            write_atomically(&a, b"second")
        })
        .unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
