//! A training case through MONAI's pipeline: the image as segmentation prepares it, the label
//! sampled (nearest) onto the same lattice and cropped with the same box.

use super::prepare::{Grid, Interp, crop_box, prepare, sample_all};
use crate::dataset::{Entry, check_label};
use crate::error::Result;
use crate::model_file::MonaiPreprocessing;
use tch::{Device, Kind, Tensor};

/// A case ready for patch sampling: windowed image `[1, X, Y, Z]` (float) and, when the case has
/// one, label `[1, X, Y, Z]` (uint8), cropped to the foreground, on the model's grid.
pub struct Case {
    pub image: Tensor,
    pub label: Option<Tensor>,
    pub grid: Grid,
    pub name: String,
}

/// MONAI's deterministic training prefix for one case: the image as `segment` prepares it, the
/// label sampled (nearest) onto the same lattice and cropped with the same box. With `classes`,
/// the label's values are checked against them.
pub fn prepare_case(entry: &Entry, pre: &MonaiPreprocessing, classes: Option<u32>) -> Result<Case> {
    const SLAB: i64 = 32;
    let image = crate::io::read_volume(&entry.image)?;
    let prepared = prepare(pre, &image, Device::Cpu, SLAB)?;
    let label = match &entry.label {
        None => None,
        Some(p) => {
            let l = crate::io::read_volume(p)?;
            check_label(&image, &l, p, classes)?;
            let values = l.data.to_kind(Kind::Float).unsqueeze(0);
            let on_target = sample_all(
                &values,
                &l.affine,
                &prepared.target,
                Interp::Nearest,
                true,
                SLAB,
            )?;
            let (start, end) = prepared.crop;
            Some(crop_box(
                &on_target.round().to_kind(Kind::Uint8),
                start,
                end,
            ))
        }
    };
    let name = entry
        .image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Case {
        image: prepared.image,
        label,
        grid: prepared.grid,
        name,
    })
}
