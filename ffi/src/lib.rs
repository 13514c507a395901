//! `liblwi.so`: the C ABI of the lwi engine, a thin skin over the `lwi` crate.
//!
//! Conventions (see `include/lwi.h`, generated from this crate by cbindgen):
//! - every fallible call returns an [`LwiStatus`]; the message is read with [`lwi_last_error`];
//! - no panic crosses the boundary: each export runs inside [`status::guard`];
//! - NULL where a pointer is required is `LWI_STATUS_INVALID_ARGUMENT`, never a crash;
//! - handles are created with an out pointer and freed by `*_free`, which accepts NULL; a freed
//!   or foreign handle is refused, never read ([`handles`]).

// One module per concept, in the header's order (blank lines keep rustfmt from sorting them).
mod status;

mod args;

mod handles;

mod volume;

mod model;

mod progress;

mod segment;

mod train;

pub use status::{LWI_ABI_VERSION, LwiStatus, lwi_last_error};
