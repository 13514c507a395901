//! Segmentation the nnU-Net v1 way, for models trained inside nnU-Net (UNETR++): the voxels as
//! stored (no reorientation), the network's axes (z, y, x) of the stored array, crop to the
//! non-zero box, resampling to the model's spacing, CT normalisation (clip to the training
//! foreground's 0.5/99.5 percentiles, z-score with its mean and sd), padding to the patch, the
//! sliding window of `nnunet==1.7.1`'s `SegmentationNetwork._internal_predict_3D_3Dconv_tiled`
//! (step 0.5, Gaussian σ = patch/8, softmax per tile averaged over the 8 mirrorings), then the
//! class probabilities back onto the cropped grid, argmax, pasted into the input's grid.
//! Resampling is nnU-Net's (`crate::resample`): cubic spline for the image, linear for the
//! probabilities, nearest along the low-resolution axis of an anisotropic spacing.

use crate::error::{Error, Result};
use crate::events::{Event, Progress, report};
use crate::model_file::CtNormalization;
use crate::resample::{self, Order};
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
    crate::preprocess::check_resampled(target, spacing)?;
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

/// nnU-Net's window starts along one axis: ceil((size − patch) / (patch · step)) + 1 windows, spread
/// evenly and rounded.
pub fn window_starts(size: i64, patch: i64, step: f64) -> Vec<i64> {
    let n = (((size - patch) as f64) / (patch as f64 * step)).ceil() as i64 + 1;
    if n <= 1 {
        return vec![0];
    }
    let stride = (size - patch) as f64 / (n - 1) as f64;
    (0..n).map(|i| (stride * i as f64).round() as i64).collect()
}

/// nnU-Net's importance map: a unit impulse at `patch / 2` filtered by a Gaussian of σ = patch/8
/// (scipy's `gaussian_filter`, truncate 4, constant mode), divided by its maximum, as float32, its
/// zeros raised to its smallest non-zero value.
pub fn gaussian(patch: [i64; 3]) -> Result<Tensor> {
    let axis = |n: i64| -> Vec<f64> {
        let sigma = n as f64 / 8.0;
        let radius = (4.0 * sigma + 0.5) as i64;
        let weights: Vec<f64> = (-radius..=radius)
            .map(|x| (-0.5 * (x * x) as f64 / (sigma * sigma)).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let centre = n / 2;
        (0..n)
            .map(|i| {
                let off = i - centre;
                if off.abs() <= radius {
                    weights[(off + radius) as usize] / total
                } else {
                    0.0
                }
            })
            .collect()
    };
    let [a, b, c] = patch.map(axis);
    let map = Tensor::from_slice(&a)
        .f_view([-1, 1, 1])?
        .f_mul(&Tensor::from_slice(&b).f_view([1, -1, 1])?)?
        .f_mul(&Tensor::from_slice(&c).f_view([1, 1, -1])?)?;
    let map = map.f_div(&map.f_max()?)?.f_to_kind(Kind::Float)?;
    let smallest = map
        .f_masked_select(&map.f_ne(0.0)?)?
        .f_min()?
        .double_value(&[]);
    Ok(map.f_masked_fill(&map.f_eq(0.0)?, smallest)?)
}

/// The eight mirrorings nnU-Net averages (axes of `[B, C, z, y, x]`), or just the identity.
fn mirrorings(mirror: bool) -> Vec<Vec<i64>> {
    if !mirror {
        return vec![vec![]];
    }
    vec![
        vec![],
        vec![4],
        vec![3],
        vec![4, 3],
        vec![2],
        vec![4, 2],
        vec![3, 2],
        vec![4, 3, 2],
    ]
}

/// The softmax of `window` averaged over `flips`, each flipped back, summed in nnU-Net's order with
/// weight 1/len.
fn mirrored(
    window: &Tensor,
    flips: &[Vec<i64>],
    softmax: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut mean: Option<Tensor> = None;
    for f in flips {
        let p = if f.is_empty() {
            softmax(window)?
        } else {
            softmax(&window.f_flip(f)?)?.f_flip(f)?
        };
        let p = p.f_mul_scalar(1.0 / flips.len() as f64)?;
        mean = Some(match mean {
            None => p,
            Some(m) => m.f_add(&p)?,
        });
    }
    mean.ok_or_else(|| Error::internal("no mirroring"))
}

/// Sliding-window class probabilities `[K, z, y, x]` of `image` `[C, z, y, x]`; `softmax` maps a
/// window `[1, C, patch]` to probabilities `[1, K, patch]`.
pub fn sliding_window(
    image: &Tensor,
    patch: [i64; 3],
    mirror: bool,
    progress: &mut dyn Progress,
    softmax: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let size: [i64; 3] = std::array::from_fn(|d| image.size()[d + 1]);
    // pad_nd_image: up to the patch, the extra split below/above as difference // 2.
    let padded: [i64; 3] = std::array::from_fn(|d| size[d].max(patch[d]));
    let below: [i64; 3] = std::array::from_fn(|d| (padded[d] - size[d]) / 2);
    let pad = [
        below[2],
        padded[2] - size[2] - below[2],
        below[1],
        padded[1] - size[1] - below[1],
        below[0],
        padded[0] - size[0] - below[0],
    ];
    let x = image.f_constant_pad_nd(pad)?;
    let weight = gaussian(patch)?.f_to_device(image.device())?;
    let starts: Vec<Vec<i64>> = (0..3)
        .map(|d| window_starts(padded[d], patch[d], 0.5))
        .collect();
    let flips = mirrorings(mirror);
    let mut sum: Option<Tensor> = None;
    let count = Tensor::f_zeros(padded, (Kind::Float, image.device()))?;
    let total = (starts[0].len() * starts[1].len() * starts[2].len()) as u64;
    let mut done = 0;
    for &s0 in &starts[0] {
        for &s1 in &starts[1] {
            for &s2 in &starts[2] {
                let window = x
                    .f_narrow(1, s0, patch[0])?
                    .f_narrow(2, s1, patch[1])?
                    .f_narrow(3, s2, patch[2])?
                    .f_unsqueeze(0)?;
                let tile = mirrored(&window, &flips, softmax)?
                    .f_squeeze_dim(0)?
                    .f_mul(&weight)?;
                let acc = match &mut sum {
                    Some(s) => s,
                    None => sum.insert(Tensor::f_zeros(
                        [tile.size()[0], padded[0], padded[1], padded[2]],
                        (Kind::Float, image.device()),
                    )?),
                };
                let narrow = |t: &Tensor, lead: i64| -> Result<Tensor> {
                    Ok(t.f_narrow(lead, s0, patch[0])?
                        .f_narrow(lead + 1, s1, patch[1])?
                        .f_narrow(lead + 2, s2, patch[2])?)
                };
                let _ = narrow(acc, 1)?.f_add_(&tile)?;
                let _ = narrow(&count, 0)?.f_add_(&weight)?;
                done += 1;
                report(
                    progress,
                    Event {
                        stage: "infer",
                        done,
                        total,
                        ..Default::default()
                    },
                )?;
            }
        }
    }
    let mut probs = average(sum.ok_or_else(|| Error::internal("no window"))?, &count)?;
    for d in 0..3 {
        probs = probs.f_narrow(1 + d as i64, below[d], size[d])?;
    }
    Ok(probs)
}

/// The windows' weighted mean: `sum` divided by `count` in place (a second set of class maps would
/// double the largest allocation, 2.5 GB on the GPU for a 512×512×800 CT).
fn average(mut sum: Tensor, count: &Tensor) -> Result<Tensor> {
    let _ = sum.f_div_(count)?;
    Ok(sum)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_starts_are_nnunets() {
        // The example of nnU-Net's own comment: image 110, patch 64, step 0.5 → 0, 23, 46.
        assert_eq!(window_starts(110, 64, 0.5), vec![0, 23, 46]);
        assert_eq!(window_starts(64, 64, 0.5), vec![0]);
        assert_eq!(window_starts(128, 64, 0.5), vec![0, 32, 64]);
    }

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

    #[test]
    fn the_importance_map_peaks_at_the_centre_and_has_no_zeros() {
        let g = gaussian([8, 16, 16]).unwrap();
        assert_eq!(g.double_value(&[4, 8, 8]), 1.0);
        assert!(g.min().double_value(&[]) > 0.0);
    }

    #[test]
    fn the_mean_of_the_windows_takes_the_sums_memory() {
        let sum = Tensor::from_slice(&[2.0f32, 6.0, 9.0, 4.0]).view([2, 1, 1, 2]);
        let count = Tensor::from_slice(&[2.0f32, 3.0]).view([1, 1, 2]);
        let at = sum.data_ptr();
        let mean = average(sum, &count).unwrap();
        assert_eq!(
            mean.data_ptr(),
            at,
            "a second set of class maps was allocated"
        );
        assert_eq!(
            Vec::<f32>::try_from(mean.flatten(0, -1)).unwrap(),
            [1.0, 2.0, 4.5, 4.0 / 3.0]
        );
    }
}
