//! MONAI's window rules (`sliding_window_inference`): windows every `roi · (1 - overlap)` voxels
//! with the last one flush with the far edge, and its Gaussian importance map (σ = roi/8).

use crate::error::Result;
use tch::{Device, Kind, Tensor};

/// MONAI's `compute_importance_map` (sigma_scale 0.125, minimum clamped to the smallest positive value, ≥ 1e-3).
pub fn importance_map(roi: [i64; 3], device: Device) -> Result<Tensor> {
    let axis = |n: i64| -> Result<Tensor> {
        let sigma = n as f64 * 0.125;
        let x = Tensor::f_arange(n, (Kind::Float, device))? - (n - 1) as f64 / 2.0;
        Ok(x.f_square()?.f_div_scalar(-2.0 * sigma * sigma)?.f_exp()?)
    };
    let map = axis(roi[0])?.f_view([-1, 1, 1])?
        * axis(roi[1])?.f_view([1, -1, 1])?
        * axis(roi[2])?.f_view([1, 1, -1])?;
    let floor = map.f_min()?.double_value(&[]).max(1e-3);
    Ok(map.f_clamp_min(floor)?)
}

/// Window start indices along one axis (MONAI `_get_scan_interval` + `dense_patch_slices`).
pub fn window_starts(size: i64, roi: i64, overlap: f64) -> Vec<i64> {
    let interval = if roi == size {
        roi
    } else {
        ((roi as f64 * (1.0 - overlap)) as i64).max(1)
    };
    let count = (0..).find(|d| d * interval + roi >= size).unwrap_or(0) + 1;
    (0..count)
        .map(|i| i * interval - (i * interval + roi - size).max(0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_starts_match_monai() {
        // MONAI: image 243, roi 96, overlap 0.5 → interval 48, starts 0 48 96 144 147
        assert_eq!(window_starts(243, 96, 0.5), vec![0, 48, 96, 144, 147]);
        assert_eq!(window_starts(96, 96, 0.5), vec![0]);
        assert_eq!(window_starts(100, 96, 0.0), vec![0, 4]);
    }
}
