//! lwi: a native engine for 3-D medical image segmentation with learnable weight initialization.
//!
//! This crate holds all logic; `liblwi.so` (crate `lwi-ffi`) is a thin C skin over it.
//! Data flows one way: file → [`Volume`] → preprocessing → model → inference → inverse → file.

// Affine and lattice code indexes rows and columns by number: that reads like the maths.
#![allow(clippy::needless_range_loop)]

pub mod dataset;
pub mod distributed;
pub mod engine;
pub mod error;
pub mod events;
pub mod forward;
pub mod io;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod model_file;
pub mod options;
pub mod phantom;
pub mod pipeline;
pub mod pretext;
pub mod shim;
pub mod train;
pub mod volume;

pub use error::{Error, ErrorKind, Result};
pub use volume::{Affine, DType, Volume, flip_lps_ras};

// Paths of the previous layout, kept for one release.
pub use pipeline::nnunet::resample;
/// The model file (now [`model_file`]); `Preprocessing` was one flat struct, MONAI's by default.
pub mod bundle {
    pub use crate::model_file::MonaiPreprocessing as Preprocessing;
    pub use crate::model_file::*;
}
/// Segmentation (now [`pipeline`]); `Pipeline` and `run` are MONAI's pipeline around any predictor.
pub mod segment {
    pub use crate::pipeline::monai::{Segmenter as Pipeline, run};
    pub use crate::pipeline::*;
}
