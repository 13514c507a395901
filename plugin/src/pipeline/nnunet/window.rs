//! nnU-Net v1's sliding window (`SegmentationNetwork._internal_predict_3D_3Dconv_tiled`): padding
//! to the patch, windows every `patch · step` voxels spread evenly, the Gaussian importance map,
//! the softmax of each window averaged over its mirrorings.

use crate::error::{Error, Result};
use crate::events::{Event, Progress, report};
use tch::{Kind, Tensor};

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
