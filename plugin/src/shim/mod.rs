//! The C++ shims over libtorch APIs that tch does not expose (`plugin/csrc/`, built by build.rs):
//! one module per source file, each a safe Rust function per C function. Every `unsafe` block of
//! the crate outside `ffi/` is here, each with the reason it holds.

pub mod autocast;
pub mod dist;
pub mod fused_norm;

/// The text a shim wrote into `err` (NUL-terminated, or the whole buffer).
fn error_text(err: &[u8]) -> String {
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    String::from_utf8_lossy(&err[..end]).into_owned()
}
