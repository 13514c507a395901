//! One error type for the whole engine. Its `kind` is what crosses the C boundary as a status code;
//! its message says what went wrong and where (file, field, value).

use std::path::Path;

/// How a message shows a piece of input (a key, a value, a header line): escaped and at most a
/// short prefix, never the input whole. Every message that quotes input goes through it.
pub use lwi_json::{quote, shorten_quotes};

/// The longest message an error carries; anything longer is cut (a second line of defence: the
/// messages themselves quote input through [`quote`]).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

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
        let mut message = message.into();
        if message.len() > MAX_MESSAGE_BYTES {
            let total = message.len();
            let mut end = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str(&format!("… (message cut at {end} of {total} bytes)"));
        }
        Error { kind, message }
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

/// `n` copies of `value` in a vector allocated fallibly: a size that comes from input must not
/// abort the process when memory runs out (Rust aborts on a failed infallible allocation).
pub fn try_vec<T: Clone>(n: usize, value: T, what: impl std::fmt::Display) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::new(
            ErrorKind::OutOfMemory,
            format!(
                "cannot allocate {} bytes for {what}",
                n.saturating_mul(std::mem::size_of::<T>())
            ),
        )
    })?;
    v.resize(n, value);
    Ok(v)
}

/// libtorch reports allocation failures only in its message text.
fn is_out_of_memory(text: &str) -> bool {
    text.contains("out of memory") || text.contains("DefaultCPUAllocator: can't allocate")
}

impl From<tch::TchError> for Error {
    fn from(err: tch::TchError) -> Self {
        let text = err.to_string();
        let kind = if is_out_of_memory(&text) {
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

/// The error a caught panic stands for: a libtorch allocation failure (tch's infallible tensor
/// operations panic with libtorch's message) is `OutOfMemory`; anything else is a bug, `Internal`.
pub fn from_panic(text: &str) -> Error {
    let first = text.lines().next().unwrap_or_default();
    if is_out_of_memory(text) {
        Error::new(ErrorKind::OutOfMemory, format!("libtorch: {first}"))
    } else {
        Error::internal(format!("internal error: {first}"))
    }
}

/// Runs `body`, turning a panic (a tch operation that failed inside libtorch) into an error, so
/// that an out-of-memory anywhere in a forward pass reaches the caller as `OutOfMemory`.
pub fn catch_panic<T>(body: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or_else(|panic| {
        let text = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(from_panic(&text))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn a_message_never_grows_with_the_input() {
        let e = Error::invalid(format!("bad value {}", "x".repeat(100 << 20)));
        assert!(
            e.message.len() < MAX_MESSAGE_BYTES + 100,
            "{}",
            e.message.len()
        );
        assert!(
            e.message.ends_with("bytes)"),
            "{}",
            &e.message[e.message.len() - 60..]
        );
        assert_eq!(Error::invalid("short").message, "short");
    }

    #[test]
    fn a_libtorch_allocation_failure_in_an_infallible_op_is_out_of_memory() {
        // 2^60 floats: libtorch refuses the allocation, tch's `zeros` panics with its message.
        let e = catch_panic(|| {
            Ok(Tensor::zeros(
                [1 << 40, 1 << 20],
                (Kind::Float, Device::Cpu),
            ))
        })
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::OutOfMemory, "{}", e.message);
        assert!(e.message.starts_with("libtorch: "), "{}", e.message);
        let e = catch_panic::<()>(|| panic!("index out of bounds")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Internal);
        assert!(e.message.contains("index out of bounds"));
    }
}
