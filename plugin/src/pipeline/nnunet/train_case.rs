//! A training case through nnU-Net's pipeline: the image as segmentation prepares it, the label
//! cropped with the same box and resized as nnU-Net resizes segmentations.

use super::prepare::prepare;
use crate::dataset::{Entry, check_label};
use crate::error::Result;
use crate::model_file::CtNormalization;
use tch::Tensor;

/// The image `[1, z, y, x]` and, when `classes` is given and the case has one, its label map on
/// the same grid (values checked against `classes`).
pub fn prepare_case(
    entry: &Entry,
    spacing: [f64; 3],
    norm: &CtNormalization,
    classes: Option<u32>,
) -> Result<(Tensor, Option<Tensor>)> {
    let volume = crate::io::read_volume(&entry.image)?;
    let prepared = prepare(&volume, spacing, norm)?;
    let label = match (&entry.label, classes) {
        (Some(path), Some(_)) => {
            let label = crate::io::read_volume(path)?;
            check_label(&volume, &label, path, classes)?;
            Some(prepared.labels_on_grid(&label)?)
        }
        _ => None,
    };
    Ok((prepared.image, label))
}
