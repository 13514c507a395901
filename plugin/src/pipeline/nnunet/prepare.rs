//! nnU-Net v1's preparation of a case: crop to the non-zero box, resample to the model's spacing
//! (cubic spline; nearest along an anisotropic axis), CT normalisation, the network's axis order.

use super::resample::{self, Order};
use crate::error::Result;
use crate::model_file::CtNormalization;
use crate::volume::{DType, Volume};
use tch::{Kind, Tensor};

/// The network's view of the case: `[1, z, y, x]` float, cropped, resampled, normalised.
pub struct Prepared {
    pub image: Tensor,
    /// The crop box in the stored voxel axes (x, y, z): start, end (exclusive).
    pub crop: ([i64; 3], [i64; 3]),
    /// The cropped size before resampling, (x, y, z).
    pub cropped: [i64; 3],
    /// The axis resampled on its own (nearest), if the spacings are anisotropic.
    pub separate: Option<usize>,
}

impl Prepared {
    /// The network's input as a volume (x, y, z) on its own grid: the crop box resampled, each new
    /// voxel centred where scipy's grid-mode zoom samples it, `(k + 0.5) · n / m − 0.5`.
    pub fn to_volume(&self, volume: &Volume) -> Result<Volume> {
        let size: [i64; 3] = std::array::from_fn(|d| self.image.size()[3 - d]);
        let mut affine = volume.affine;
        for row in 0..3 {
            let mut origin = affine[row][3];
            for d in 0..3 {
                let scale = self.cropped[d] as f64 / size[d] as f64;
                origin += affine[row][d] * (self.crop.0[d] as f64 + 0.5 * scale - 0.5);
                affine[row][d] *= scale;
            }
            affine[row][3] = origin;
        }
        let data = self
            .image
            .f_squeeze_dim(0)?
            .f_permute([2, 1, 0])?
            .f_to_device(tch::Device::Cpu)?;
        Volume::new(data.f_contiguous()?, affine, DType::F32)
    }
}

impl Prepared {
    /// The case's label map on the network's grid `[1, z, y, x]` (uint8): cropped with the image's
    /// box and resized as nnU-Net resizes segmentations.
    pub fn labels_on_grid(&self, label: &Volume) -> Result<Tensor> {
        let mut l = label.data.f_to_kind(Kind::Int64)?;
        for d in 0..3 {
            l = l.f_narrow(d as i64, self.crop.0[d], self.crop.1[d] - self.crop.0[d])?;
        }
        let size: [i64; 3] = std::array::from_fn(|d| self.image.size()[3 - d]);
        Ok(resample::resize_labels(&l, size, self.separate)?
            .f_permute([2, 1, 0])?
            .f_unsqueeze(0)?
            .f_contiguous()?)
    }
}

/// The bounding box of the non-zero voxels (the whole volume when there are none). nnU-Net fills
/// holes in the mask first, which never changes its box.
pub(crate) fn nonzero_box(data: &Tensor) -> Result<([i64; 3], [i64; 3])> {
    let dims: [i64; 3] = std::array::from_fn(|d| data.size()[d]);
    let nonzero = data.f_ne(0.0)?;
    let mut start = [0; 3];
    let mut end = dims;
    for d in 0..3 {
        let others: Vec<i64> = (0..3).filter(|&o| o != d as i64).collect();
        let any = nonzero.f_any_dims(others.as_slice(), false)?;
        let idx = any.f_nonzero()?;
        if idx.size()[0] == 0 {
            return Ok(([0; 3], dims));
        }
        start[d] = idx.f_min()?.int64_value(&[]);
        end[d] = idx.f_max()?.int64_value(&[]) + 1;
    }
    Ok((start, end))
}

/// Crops, resamples to `spacing` and normalises `volume`, and puts it in the network's axis order.
pub fn prepare(volume: &Volume, spacing: [f64; 3], norm: &CtNormalization) -> Result<Prepared> {
    let data = volume.data.f_to_kind(Kind::Float)?;
    let (start, end) = nonzero_box(&data)?;
    let mut cropped = data.shallow_clone();
    for d in 0..3 {
        cropped = cropped.f_narrow(d as i64, start[d], end[d] - start[d])?;
    }
    let cropped_size: [i64; 3] = std::array::from_fn(|d| end[d] - start[d]);
    let target = resample::resampled_shape(cropped_size, volume.spacing(), spacing);
    crate::pipeline::check_resampled(target, spacing)?;
    let separate = resample::separate_axis(volume.spacing(), spacing);
    // nnU-Net zeroes NaNs before resampling, then clips and z-scores.
    let cropped = cropped.f_nan_to_num(0.0, None, None)?.f_unsqueeze(0)?;
    let image = resample::resize(&cropped, target, Order::Cubic, separate)?
        .f_to_kind(Kind::Float)?
        .f_clamp(norm.lower, norm.upper)?
        .f_sub_scalar(norm.mean)?
        .f_div_scalar(norm.sd)?
        .f_permute([0, 3, 2, 1])?
        .f_contiguous()?;
    Ok(Prepared {
        image,
        crop: (start, end),
        cropped: cropped_size,
        separate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spacing_far_finer_than_the_volume_is_refused_before_resampling() {
        let data = Tensor::ones([20, 18, 12], (Kind::Float, tch::Device::Cpu));
        let mut affine = [[0.0; 4]; 4];
        (0..3).for_each(|d| affine[d][d] = 4.0);
        affine[3][3] = 1.0;
        let volume = Volume::new(data, affine, DType::F32).unwrap();
        let norm = CtNormalization {
            lower: -1000.0,
            upper: 1000.0,
            mean: 0.0,
            sd: 100.0,
        };
        let Err(err) = prepare(&volume, [0.01; 3], &norm) else {
            panic!("a 0.01 mm spacing resamples a 4 mm volume");
        };
        assert!(
            err.message
                .contains("spacing [0.01, 0.01, 0.01] mm gives a grid of [8000, 7200, 4800]"),
            "{}",
            err.message
        );
        assert!(prepare(&volume, [2.0; 3], &norm).is_ok());
    }
}
