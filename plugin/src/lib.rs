//! lwi: a native engine for 3-D medical image segmentation with learnable weight initialization.
//!
//! This crate holds all logic; `liblwi.so` (crate `lwi-ffi`) is a thin C skin over it.
//! Data flows one way: file → [`Volume`] → preprocessing → model → inference → inverse → file.
//!
//! Where each concept lives:
//! - [`io`]: volumes in and out (NIfTI, NRRD, DICOM, DICOM SEG), bounded against hostile files;
//!   [`volume`]: a volume and its affine.
//! - [`pipeline`]: segmentation. One folder per pipeline, each with its preparation, its way back
//!   and its training-case preparation: [`pipeline::monai`] (imported UNETR models, the monai
//!   recipe's) and [`pipeline::nnunet`] (imported UNETR++ models, the nnunet_v1 recipe's), chosen
//!   by one exhaustive `match` on the model file's preprocessing; one sliding window for both
//!   ([`pipeline::window`]); the options and which pipeline honours or refuses each
//!   ([`pipeline::options`]); post-processing; files and the manifest ([`pipeline::file`]).
//! - [`model_file`]: the model file (safetensors + one JSON document), its preprocessing typed per
//!   pipeline, the checkpoint import and nnU-Net's plans reader.
//! - [`model`]: the architectures as `tch` modules, one folder each ([`model::unetr`],
//!   [`model::unetr_pp`]: config, network, order heads, checkpoint renaming), answering through
//!   the [`model::Architecture`] trait; the [`model::ArchConfig`] / [`model::Network`] registry
//!   (`model/network.rs`: a third architecture is its folder plus one arm per `match` there, one
//!   in the import's dispatch and one naming its default recipe); shared blocks, precision and
//!   the fused kernel.
//!   [`pretext`]: the init-train task and its loss.
//! - [`train`]: training — the config and its recipes (`monai`, `nnunet_v1`: each trains any
//!   architecture whose shapes fit), batch sources,
//!   objectives, optimizers, schedules, validation, checkpoints; [`loss`], [`metrics`].
//! - [`distributed`]: data-parallel training over c10d; [`shim`]: the C++ shims over libtorch APIs
//!   `tch` lacks (autocast, the fused normalisation kernel, c10d), every `unsafe` block with its
//!   `SAFETY` line.
//! - [`engine`], [`events`], [`error`], [`options`]: the device, progress and cancel, status kinds,
//!   strict JSON options.

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
