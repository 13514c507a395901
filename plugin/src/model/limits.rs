//! What an architecture may ask for, checked before anything is built. Model files and
//! architecture configs come from elsewhere, so every size has a ceiling (docs/models.md lists
//! them), the whole network a ceiling on its values, and a file's configuration must agree with
//! the shapes of the file's own tensors before its network is built.

use crate::error::{Error, ErrorKind, Result};
use std::collections::HashMap;

/// Input channels (modalities).
pub const MAX_IN_CHANNELS: i64 = 16;
/// Output channels (classes) of a network; also the most labels a model names.
pub const MAX_CLASSES: i64 = 1024;
/// Each edge of the network's input (`img_size`, the roi), in voxels.
pub const MAX_ROI_EDGE: i64 = 1024;
/// Voxels of the network's input: 256³.
pub const MAX_ROI_VOXELS: i64 = 1 << 24;
pub const MAX_FEATURE_SIZE: i64 = 256;
pub const MAX_HIDDEN_SIZE: i64 = 4096;
pub const MAX_MLP_DIM: i64 = 16384;
/// UNETR's transformer blocks.
pub const MAX_LAYERS: i64 = 64;
pub const MAX_HEADS: i64 = 64;
/// TransformerBlocks of one UNETR++ encoder stage.
pub const MAX_STAGE_DEPTH: i64 = 16;
/// UNETR++'s EPA projection size.
pub const MAX_PROJ_SIZE: i64 = 1024;
/// Order-prediction classes (slabs): at most the token grid's depth.
pub const MAX_ORDER_CLASSES: i64 = 64;
/// Values in all of a network's tensors: 10⁹ (4 GB as float32), ten times the largest model of
/// the method.
pub const MAX_VALUES: i128 = 1_000_000_000;

/// `value` of the field `name` in `lo..=hi`, else an error naming both.
pub fn within(what: &str, name: &str, value: i64, lo: i64, hi: i64) -> Result<()> {
    if (lo..=hi).contains(&value) {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{what} {name} must be in [{lo}, {hi}], got {value}"
    )))
}

/// A network input size: each edge in `1..=MAX_ROI_EDGE`, at most `MAX_ROI_VOXELS` in all.
pub fn roi(what: &str, name: &str, size: [i64; 3]) -> Result<()> {
    let edges_ok = size.iter().all(|s| (1..=MAX_ROI_EDGE).contains(s));
    if edges_ok && size.iter().product::<i64>() <= MAX_ROI_VOXELS {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{what} {name} {size:?}: each edge must be in [1, {MAX_ROI_EDGE}] and the voxels at most \
         {MAX_ROI_VOXELS} (256³)"
    )))
}

/// The network's values within [`MAX_VALUES`].
pub fn values(what: &str, n: i128) -> Result<()> {
    if n <= MAX_VALUES {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{what}: the network would hold {n} values, more than {MAX_VALUES} (4 GB as float32)"
    )))
}

/// A tensor a configuration implies: its name, its shape, and why (the fields, with their
/// values, that decide it).
pub struct Witness {
    pub name: String,
    pub shape: Vec<i64>,
    pub why: String,
}

impl Witness {
    /// A tensor whose shape the configuration's `fields` (named with their values) decide.
    pub fn new(name: impl Into<String>, shape: &[i64], fields: impl std::fmt::Display) -> Self {
        Witness {
            name: name.into(),
            shape: shape.to_vec(),
            why: format!("from the metadata's {fields}"),
        }
    }
    /// A tensor whose shape is fixed, for the reason given.
    pub fn fixed(name: impl Into<String>, shape: &[i64], why: impl Into<String>) -> Self {
        Witness {
            name: name.into(),
            shape: shape.to_vec(),
            why: why.into(),
        }
    }
}

/// Each witness present in `shapes` with its shape, else `MODEL_INCOMPATIBLE` naming the tensor,
/// its shape and the fields that disagree with it.
pub fn check_witnesses(witnesses: &[Witness], shapes: &HashMap<String, Vec<i64>>) -> Result<()> {
    for w in witnesses {
        let message = match shapes.get(&w.name) {
            Some(s) if *s == w.shape => continue,
            Some(s) => format!(
                "{} is {s:?}, the architecture needs {:?} ({})",
                w.name, w.shape, w.why
            ),
            None => format!("missing tensors: {} ({})", w.name, w.why),
        };
        return Err(Error::new(ErrorKind::ModelIncompatible, message));
    }
    Ok(())
}

/// Values of the variables of a MONAI norm layer: instance norm has none, batch norm an affine
/// pair and running statistics.
pub(crate) fn norm_values(batch: bool, c: i128) -> i128 {
    if batch { 4 * c } else { 0 }
}

/// Values of a [`super::blocks::ConvBlock`] (two 3³ convs and their norms, a 1³ shortcut when the
/// channels change on a residual block).
pub(crate) fn conv_block_values(inp: i128, out: i128, batch: bool, residual: bool) -> i128 {
    let shortcut = if residual && inp != out {
        inp * out + norm_values(batch, out)
    } else {
        0
    };
    27 * inp * out + 27 * out * out + 2 * norm_values(batch, out) + shortcut
}
