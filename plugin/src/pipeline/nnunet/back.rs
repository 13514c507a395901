//! Back to the input's grid the nnU-Net way: the probabilities resampled (linear, separate
//! low-resolution axis) onto the crop, argmax, pasted into the input's grid.

use super::prepare::Prepared;
use super::resample::{self, Order};
use crate::error::Result;
use crate::volume::{DType, Volume};
use tch::{Kind, Tensor};

/// The argmax of the probabilities `[K, x, y, z]` once resampled (linear, as float32) onto the
/// cropped grid, one class at a time so that only one float64 channel exists at once; ties go to
/// the lower class, as numpy's `argmax`. On the CPU, as nnU-Net: the full-resolution float64
/// channels of a long CT would not fit beside the network in a GPU's memory.
fn argmax_on_crop(prepared: &Prepared, probs: &Tensor) -> Result<Tensor> {
    let channel = |k: i64| -> Result<Tensor> {
        let p = probs.f_narrow(0, k, 1)?;
        Ok(
            resample::resize(&p, prepared.cropped, Order::Linear, prepared.separate)?
                .f_to_kind(Kind::Float)?
                .f_squeeze_dim(0)?,
        )
    };
    let mut best = channel(0)?;
    let mut labels = best.f_zeros_like()?.f_to_kind(Kind::Int16)?;
    for k in 1..probs.size()[0] {
        let p = channel(k)?;
        let higher = p.f_gt_tensor(&best)?;
        let _ = labels.f_masked_fill_(&higher, k)?;
        best = best.f_maximum(&p)?;
    }
    Ok(labels)
}

/// Labels on the input's grid from the probabilities `[K, z, y, x]` of the prepared case.
pub fn labels_back(
    volume: &Volume,
    prepared: &Prepared,
    probs: &Tensor,
    classes: i64,
) -> Result<Volume> {
    let probs = probs
        .f_to_device(tch::Device::Cpu)?
        .f_permute([0, 3, 2, 1])?;
    let labels = argmax_on_crop(prepared, &probs)?;
    let (kind, dtype) = if classes > 256 {
        (Kind::Int, DType::U16)
    } else {
        (Kind::Uint8, DType::U8)
    };
    let full = Tensor::f_zeros(volume.dims(), (kind, tch::Device::Cpu))?;
    let (start, end) = prepared.crop;
    let mut target = full.shallow_clone();
    for d in 0..3 {
        target = target.f_narrow(d as i64, start[d], end[d] - start[d])?;
    }
    target.f_copy_(&labels.f_to_kind(kind)?.f_to_device(tch::Device::Cpu)?)?;
    Volume::new(full, volume.affine, dtype)
}
