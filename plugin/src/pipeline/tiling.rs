//! Sliding-window inference as MONAI's `sliding_window_inference` defines it: pad to the window when
//! the image is smaller, windows every `roi · (1 - overlap)` voxels with the last one flush with the
//! far edge, predictions blended by a constant or Gaussian (σ = roi/8) importance map.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Blend {
    Gaussian,
    Constant,
}

#[derive(Debug, Clone)]
pub struct WindowOptions {
    pub roi: [i64; 3],
    pub overlap: f64,
    pub blend: Blend,
    /// Windows per forward pass.
    pub batch: i64,
    /// Fill a short last batch up to `batch` with copies of its last window (their predictions are
    /// dropped): on CUDA with cuDNN's benchmark mode a new batch size would time every convolution
    /// again, which costs more than the few extra windows.
    pub fill_last_batch: bool,
}

/// MONAI's `compute_importance_map` (sigma_scale 0.125, minimum clamped to the smallest positive value, ≥ 1e-3).
pub fn importance_map(roi: [i64; 3], blend: Blend, device: Device) -> Tensor {
    match blend {
        Blend::Constant => Tensor::ones(roi, (Kind::Float, device)),
        Blend::Gaussian => {
            let axis = |n: i64| {
                let sigma = n as f64 * 0.125;
                let x = Tensor::arange(n, (Kind::Float, device)) - (n - 1) as f64 / 2.0;
                (x.square() / (-2.0 * sigma * sigma)).exp()
            };
            let map = axis(roi[0]).view([-1, 1, 1])
                * axis(roi[1]).view([1, -1, 1])
                * axis(roi[2]).view([1, 1, -1]);
            let floor = map.min().double_value(&[]).max(1e-3);
            map.clamp_min(floor)
        }
    }
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

/// Runs `predict` (`[B, C, roi] → [B, K, roi]`) over `image` (`[C, X, Y, Z]`) and returns the
/// blended prediction `[K, X, Y, Z]` (float32) on `accumulate_on`.
pub fn sliding_window(
    image: &Tensor,
    opts: &WindowOptions,
    accumulate_on: Device,
    mut predict: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if !(0.0..1.0).contains(&opts.overlap) {
        return Err(Error::invalid(format!(
            "overlap must be in [0, 1), got {}",
            opts.overlap
        )));
    }
    if opts.batch < 1 {
        return Err(Error::invalid(format!(
            "window batch must be at least 1, got {}",
            opts.batch
        )));
    }
    let size = image.size();
    let spatial = [size[1], size[2], size[3]];
    let (padded, pads) = crate::pipeline::monai::prepare::pad_to_roi(image, opts.roi)?;
    let psize: [i64; 3] = std::array::from_fn(|d| spatial[d] + pads[d].0 + pads[d].1);
    let starts: Vec<Vec<i64>> = (0..3)
        .map(|d| window_starts(psize[d], opts.roi[d], opts.overlap))
        .collect();
    let mut windows: Vec<[i64; 3]> = Vec::new();
    for &x in &starts[0] {
        for &y in &starts[1] {
            windows.extend(starts[2].iter().map(|&z| [x, y, z]));
        }
    }

    let weight = importance_map(opts.roi, opts.blend, accumulate_on);
    let mut sum: Option<Tensor> = None;
    let count = Tensor::f_zeros(psize, (Kind::Float, accumulate_on))?;
    let crop = |t: &Tensor, s: &[i64; 3], lead: usize| -> Tensor {
        let mut v = t.shallow_clone();
        for d in 0..3 {
            v = v.narrow((lead + d) as i64, s[d], opts.roi[d]);
        }
        v
    };
    for chunk in windows.chunks(opts.batch as usize) {
        let mut crops: Vec<Tensor> = chunk.iter().map(|s| crop(&padded, s, 1)).collect();
        if opts.fill_last_batch
            && let Some(last) = chunk.last()
        {
            crops.resize_with(opts.batch as usize, || crop(&padded, last, 1));
        }
        let batch = Tensor::f_stack(&crops, 0)?;
        let pred = predict(&batch)?
            .f_to_device(accumulate_on)?
            .f_to_kind(Kind::Float)?;
        if sum.is_none() {
            // The largest allocation of the pipeline: fallible, so a GPU out-of-memory is an error.
            sum = Some(Tensor::f_zeros(
                [pred.size()[1], psize[0], psize[1], psize[2]],
                (Kind::Float, accumulate_on),
            )?);
        }
        let Some(sum) = sum.as_ref() else {
            return Err(Error::internal("sliding window: no accumulator"));
        };
        for (b, s) in chunk.iter().enumerate() {
            let _ = crop(sum, s, 1).f_add_(&pred.get(b as i64).f_mul(&weight)?)?;
            let _ = crop(&count, s, 0).f_add_(&weight)?;
        }
    }
    let mut out = sum.ok_or_else(|| Error::internal("sliding window produced no windows"))?;
    // In place: a second full-size copy of the class maps would double the peak memory.
    let _ = out.f_div_(&count)?;
    for d in 0..3 {
        out = out.narrow(1 + d as i64, pads[d].0, spatial[d]);
    }
    Ok(out)
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

    #[test]
    fn identity_predictor_reconstructs_the_image() {
        let image = Tensor::randn([2, 37, 20, 50], (Kind::Float, Device::Cpu));
        // 4 × 1 × 6 = 24 windows: the last batch of 5 is short, and filled up or not.
        for fill_last_batch in [false, true] {
            let opts = WindowOptions {
                roi: [16, 32, 16],
                overlap: 0.5,
                blend: Blend::Gaussian,
                batch: 5,
                fill_last_batch,
            };
            let mut sizes = Vec::new();
            let out = sliding_window(&image, &opts, Device::Cpu, |b| {
                sizes.push(b.size()[0]);
                Ok(b.shallow_clone())
            })
            .unwrap();
            assert_eq!(out.size(), image.size());
            assert!(out.allclose(&image, 1e-5, 1e-5, false));
            assert_eq!(sizes.len(), 5);
            assert_eq!(sizes[4], if fill_last_batch { 5 } else { 4 });
        }
    }
}
