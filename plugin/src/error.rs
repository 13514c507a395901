//! One error type for the whole engine. Its `kind` is what crosses the C boundary as a status code;
//! its message says what went wrong and where (file, field, value).

use std::path::Path;

/// The class of a failure; each maps to one `LwiStatus` of the C ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    Io,
    Format,
    Unsupported,
    DeviceUnavailable,
    OutOfMemory,
    Cancelled,
    ModelIncompatible,
    Internal,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    /// A file whose content is not what its format promises.
    pub fn format(path: &Path, message: impl std::fmt::Display) -> Self {
        Self::new(ErrorKind::Format, format!("{}: {message}", path.display()))
    }
    /// An operating-system failure on `path`.
    pub fn io(path: &Path, err: std::io::Error) -> Self {
        let kind = match err.kind() {
            std::io::ErrorKind::OutOfMemory => ErrorKind::OutOfMemory,
            _ => ErrorKind::Io,
        };
        Self::new(kind, format!("{}: {err}", path.display()))
    }
}

impl From<tch::TchError> for Error {
    fn from(err: tch::TchError) -> Self {
        let text = err.to_string();
        // libtorch reports allocation failures only in its message text.
        let kind = if text.contains("out of memory")
            || text.contains("DefaultCPUAllocator: can't allocate")
        {
            ErrorKind::OutOfMemory
        } else {
            ErrorKind::Internal
        };
        // The first line is the message; the rest is a C++ backtrace users need not see.
        Self::new(
            kind,
            format!("libtorch: {}", text.lines().next().unwrap_or_default()),
        )
    }
}
