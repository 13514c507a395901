//! nnU-Net v1's window rules (`SegmentationNetwork._internal_predict_3D_3Dconv_tiled`): windows
//! every `patch · step` voxels spread evenly, and its Gaussian importance map. The window itself is
//! the shared one ([`crate::pipeline::window`]).

use crate::error::Result;
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
}
