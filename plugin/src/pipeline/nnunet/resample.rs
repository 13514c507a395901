//! Resampling as nnU-Net v1 does it (`nnunet.preprocessing.preprocessing.resample_data_or_seg`):
//! skimage's `resize(order, mode="edge", anti_aliasing=False)`, which is scipy's
//! `ndimage.zoom(grid_mode=True, mode="nearest")` followed by a clip to the input's range, and,
//! for anisotropic spacings, in-plane resizing slice by slice with nearest neighbour along the
//! low-resolution axis.
//!
//! A tensor-product B-spline is separable, so each axis is resized on its own, in float64: the
//! results equal scipy's to rounding (tested against it in `tests/python/test_unetr_pp.py`).

use crate::error::{Error, Result};
use tch::{Kind, Tensor};

/// B-spline order: 0 (nearest, ties rounded up), 1 (linear) or 3 (cubic, with scipy's prefilter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Nearest,
    Linear,
    Cubic,
}

/// nnU-Net's anisotropy threshold (`RESAMPLING_SEPARATE_Z_ANISO_THRESHOLD`).
const ANISOTROPY: f64 = 3.0;
/// scipy pads by 12 edge voxels before the cubic prefilter (`_prepad_for_spline_filter`).
const SPLINE_PAD: i64 = 12;
/// The cubic B-spline's pole.
const POLE: f64 = -0.267_949_192_431_122_7; // √3 − 2

/// nnU-Net's resampled shape: round(old spacing / new spacing · shape), ties to even as numpy.
pub fn resampled_shape(shape: [i64; 3], spacing: [f64; 3], target: [f64; 3]) -> [i64; 3] {
    std::array::from_fn(|d| {
        ((spacing[d] / target[d]) * shape[d] as f64)
            .round_ties_even()
            .max(1.0) as i64
    })
}

/// The axis resampled on its own (`get_do_separate_z` then `get_lowres_axis`, from the original
/// spacing first, then the target's); none when both are near-isotropic or two axes share the
/// coarsest spacing.
pub fn separate_axis(original: [f64; 3], target: [f64; 3]) -> Option<usize> {
    let anisotropic = |s: [f64; 3]| {
        let (lo, hi) = s
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        hi / lo > ANISOTROPY
    };
    let spacing = [original, target].into_iter().find(|&s| anisotropic(s))?;
    let coarsest = spacing.iter().cloned().fold(f64::MIN, f64::max);
    let axes: Vec<usize> = (0..3).filter(|&d| coarsest / spacing[d] == 1.0).collect();
    (axes.len() == 1).then(|| axes[0])
}

/// `data` `[C, a, b, c]` resized to `size` as `resample_data_or_seg(is_seg=False)` does: `order`
/// on every axis, or in-plane only with nearest along `separate`. Returns float64.
pub fn resize(
    data: &Tensor,
    size: [i64; 3],
    order: Order,
    separate: Option<usize>,
) -> Result<Tensor> {
    let data = data.f_to_kind(Kind::Double)?;
    if data.size()[1..] == size {
        return Ok(data);
    }
    let Some(z) = separate else {
        // One skimage call per channel: the clip takes that channel's range.
        let mut out = data.shallow_clone();
        for d in 0..3 {
            out = zoom_axis(&out, d as i64 + 1, size[d], order)?;
        }
        return clip_to(&out, &data, &[1, 2, 3]);
    };
    // One skimage call per channel and slice of the low-resolution axis.
    let plane: Vec<i64> = (1..4).filter(|&d| d != z as i64 + 1).collect();
    let mut out = data.shallow_clone();
    for &d in &plane {
        out = zoom_axis(&out, d, size[d as usize - 1], order)?;
    }
    let out = clip_to(&out, &data, &plane)?;
    zoom_axis(&out, z as i64 + 1, size[z], Order::Nearest)
}

/// A label map `[a, b, c]` resized as `resample_data_or_seg(is_seg=True, order=1, order_z=0)`
/// does it with batchgenerators 0.25.5's `resize_segmentation`: each label's indicator resized
/// linearly (in-plane only when an axis is `separate`), the label with the highest score wins, an
/// exact tie goes to the nearest-neighbour label when it is one of the tied ones
/// (`seg_tiebreak="nearest"`); then nearest along `separate`. Returns uint8.
pub fn resize_labels(labels: &Tensor, size: [i64; 3], separate: Option<usize>) -> Result<Tensor> {
    let labels = labels.f_to_kind(Kind::Int64)?;
    if labels.size() == size {
        return Ok(labels.f_to_kind(Kind::Uint8)?);
    }
    let plane: Vec<i64> = (0..3).filter(|&d| Some(d as usize) != separate).collect();
    let mut in_plane = size;
    if let Some(z) = separate {
        in_plane[z] = labels.size()[z];
    }
    let counts = labels
        .f_reshape([-1])?
        .f_clamp_min(0)?
        .f_bincount::<Tensor>(None, 0)?;
    let counts = Vec::<i64>::try_from(&counts).map_err(|e| Error::internal(e.to_string()))?;
    let values: Vec<i64> = (0..counts.len() as i64)
        .filter(|&v| counts[v as usize] > 0)
        .collect();
    let mut nearest = labels.f_to_kind(Kind::Double)?;
    for &a in &plane {
        nearest = zoom_axis(&nearest, a, in_plane[a as usize], Order::Nearest)?;
    }
    let nearest = nearest.f_to_kind(Kind::Int64)?;
    let score = |v: i64| -> Result<Tensor> {
        linear_zoom_as_scipy(&labels.f_eq(v)?.f_to_kind(Kind::Double)?, &plane, in_plane)
    };
    let mut win = Tensor::f_full(in_plane, values[0], (Kind::Int64, labels.device()))?;
    let mut best = score(values[0])?;
    let mut nearest_on_top = nearest.f_eq(values[0])?.f_logical_and(&best.f_gt(0.0)?)?;
    for &v in &values[1..] {
        let s = score(v)?;
        let is_nearest = nearest.f_eq(v)?;
        let level = s
            .f_eq_tensor(&best)?
            .f_logical_and(&s.f_gt(0.0)?)?
            .f_logical_and(&is_nearest)?;
        nearest_on_top = nearest_on_top.f_logical_or(&level)?;
        let better = s.f_gt_tensor(&best)?;
        nearest_on_top = is_nearest.f_where_self(&better, &nearest_on_top)?;
        win = win.f_masked_fill(&better, v)?;
        best = best.f_maximum(&s)?;
    }
    let mut out = nearest.f_where_self(&nearest_on_top, &win)?;
    if let Some(z) = separate {
        out = zoom_axis(
            &out.f_to_kind(Kind::Double)?,
            z as i64,
            size[z],
            Order::Nearest,
        )?;
    }
    Ok(out.f_to_kind(Kind::Uint8)?)
}

/// scipy's order-1 `zoom` (grid mode, mode "nearest") of `axes` of `t` to `size`, summed as its C
/// loop sums: over the corners, last axis fastest, value · w₀ · w₁ · w₂. A label indicator is often
/// exactly ½ between two voxels; this order rounds those ties as scipy does, where resizing one
/// axis at a time would not.
fn linear_zoom_as_scipy(t: &Tensor, axes: &[i64], size: [i64; 3]) -> Result<Tensor> {
    let device = t.device();
    // per axis: the lower and upper source index and their weights
    let mut corners = Vec::new();
    for &a in axes {
        let (n, m) = (t.size()[a as usize], size[a as usize]);
        let scale = n as f64 / m as f64;
        let (mut lo, mut hi, mut w_lo, mut w_hi) = (vec![], vec![], vec![], vec![]);
        for k in 0..m {
            let c = ((k as f64 + 0.5) * scale - 0.5).clamp(0.0, (n - 1) as f64);
            let f = c.floor();
            lo.push(f as i64);
            hi.push((f as i64 + 1).min(n - 1));
            w_lo.push(1.0 - (c - f));
            w_hi.push(c - f);
        }
        let mut shape = vec![1i64; 3];
        shape[a as usize] = m;
        let tensor = |v: Vec<f64>| {
            Tensor::from_slice(&v)
                .to_device(device)
                .view(shape.as_slice())
        };
        let index = |v: Vec<i64>| Tensor::from_slice(&v).to_device(device);
        corners.push([(index(lo), tensor(w_lo)), (index(hi), tensor(w_hi))]);
    }
    let mut sum: Option<Tensor> = None;
    for corner in 0..(1usize << axes.len()) {
        let mut value = t.shallow_clone();
        let mut weights = Vec::new();
        for (i, &a) in axes.iter().enumerate() {
            let (idx, w) = &corners[i][(corner >> (axes.len() - 1 - i)) & 1];
            value = value.f_index_select(a, idx)?;
            weights.push(w);
        }
        let mut term = value;
        for w in weights {
            term = term.f_mul(w)?;
        }
        sum = Some(match sum {
            None => term,
            Some(s) => s.f_add(&term)?,
        });
    }
    sum.ok_or_else(|| Error::internal("no axis to resize"))
}

/// skimage's clip: `out` held to the range of `input` over `dims` (the axes of one resize call).
fn clip_to(out: &Tensor, input: &Tensor, dims: &[i64]) -> Result<Tensor> {
    let lo = input.f_amin(dims, true)?;
    let hi = input.f_amax(dims, true)?;
    Ok(out.f_clamp_tensor(Some(&lo), Some(&hi))?)
}

/// One axis of `t` (float64) resized to `size` with scipy's grid-mode coordinates
/// `(k + 0.5) · n / size − 0.5` and edge extension.
pub fn zoom_axis(t: &Tensor, axis: i64, size: i64, order: Order) -> Result<Tensor> {
    let n = t.size()[axis as usize];
    if n == size {
        return Ok(t.shallow_clone());
    }
    if n < 1 || size < 1 {
        return Err(Error::internal(format!(
            "cannot resize an axis of {n} to {size}"
        )));
    }
    let scale = n as f64 / size as f64;
    let coordinate = |k: i64| (k as f64 + 0.5) * scale - 0.5;
    let device = t.device();
    let clamp = |i: i64, len: i64| i.clamp(0, len - 1);
    match order {
        Order::Nearest => {
            let idx: Vec<i64> = (0..size)
                .map(|k| clamp((coordinate(k) + 0.5).floor() as i64, n))
                .collect();
            Ok(t.f_index_select(axis, &Tensor::from_slice(&idx).f_to_device(device)?)?)
        }
        Order::Linear => {
            let (mut taps, mut weights) = (vec![Vec::new(); 2], vec![Vec::new(); 2]);
            for k in 0..size {
                let c = coordinate(k);
                let f = c.floor();
                let frac = c - f;
                for (j, w) in [1.0 - frac, frac].into_iter().enumerate() {
                    taps[j].push(clamp(f as i64 + j as i64, n));
                    weights[j].push(w);
                }
            }
            weighted_taps(t, axis, &taps, &weights)
        }
        Order::Cubic => {
            let coefficients = prefilter(edge_pad(t, axis, SPLINE_PAD)?, axis)?;
            let len = n + 2 * SPLINE_PAD;
            let (mut taps, mut weights) = (vec![Vec::new(); 4], vec![Vec::new(); 4]);
            for k in 0..size {
                let c = coordinate(k) + SPLINE_PAD as f64;
                let f = c.floor();
                for (j, w) in cubic_weights(c - f).into_iter().enumerate() {
                    taps[j].push(clamp(f as i64 - 1 + j as i64, len));
                    weights[j].push(w);
                }
            }
            weighted_taps(&coefficients, axis, &taps, &weights)
        }
    }
}

/// Σ_j weights[j] · t[taps[j]] along `axis`, accumulated in place (two full-size tensors at most).
pub(crate) fn weighted_taps(
    t: &Tensor,
    axis: i64,
    taps: &[Vec<i64>],
    weights: &[Vec<f64>],
) -> Result<Tensor> {
    let mut shape = vec![1i64; t.dim()];
    shape[axis as usize] = -1;
    let term = |j: usize| -> Result<Tensor> {
        let idx = Tensor::from_slice(&taps[j]).f_to_device(t.device())?;
        let w = Tensor::from_slice(&weights[j])
            .f_to_device(t.device())?
            .f_view(shape.as_slice())?;
        let mut selected = t.f_index_select(axis, &idx)?;
        let _ = selected.f_mul_(&w)?;
        Ok(selected)
    };
    let mut sum = term(0)?;
    for j in 1..taps.len() {
        let _ = sum.f_add_(&term(j)?)?;
    }
    Ok(sum)
}

/// The cubic B-spline's weights for the four coefficients around a point at fraction `t`.
fn cubic_weights(t: f64) -> [f64; 4] {
    let u = 1.0 - t;
    [
        u * u * u / 6.0,
        (4.0 - 6.0 * t * t + 3.0 * t * t * t) / 6.0,
        (1.0 + 3.0 * t + 3.0 * t * t - 3.0 * t * t * t) / 6.0,
        t * t * t / 6.0,
    ]
}

/// `np.pad(mode="edge")` along one axis.
fn edge_pad(t: &Tensor, axis: i64, pad: i64) -> Result<Tensor> {
    let n = t.size()[axis as usize];
    let idx: Vec<i64> = (-pad..n + pad).map(|i| i.clamp(0, n - 1)).collect();
    Ok(t.f_index_select(axis, &Tensor::from_slice(&idx).f_to_device(t.device())?)?)
}

/// The cubic spline coefficients along `axis` (scipy's `spline_filter1d`, mirror-symmetric
/// initialisation): a causal then an anti-causal first-order recursion with the pole √3 − 2,
/// in place on `t`.
fn prefilter(t: Tensor, axis: i64) -> Result<Tensor> {
    let n = t.size()[axis as usize];
    if n < 2 {
        return Ok(t);
    }
    let z = POLE;
    // Axis first and contiguous, so each step of the recursion works on one contiguous slab.
    let mut c = t.f_movedim([axis], [0])?.f_contiguous()?;
    let _ = c.f_mul_scalar_((1.0 - z) * (1.0 - 1.0 / z))?;
    // c₀ = (Σₖ zᵏ cₖ + Σ_{0<k<n−1} z^{2n−2−k} cₖ) / (1 − z^{2n−2}); terms below 1e-30 dropped.
    let init: Vec<f64> = (0..n)
        .map(|k| {
            let mirror = if k > 0 && k < n - 1 {
                z.powi((2 * n - 2 - k) as i32)
            } else {
                0.0
            };
            (z.powi(k as i32) + mirror) / (1.0 - z.powi((2 * n - 2) as i32))
        })
        .collect();
    let used: Vec<i64> = (0..n).filter(|&k| init[k as usize].abs() > 1e-30).collect();
    let weights: Vec<f64> = used.iter().map(|&k| init[k as usize]).collect();
    let mut shape = vec![1i64; c.dim()];
    shape[0] = -1;
    let first = c
        .f_index_select(0, &Tensor::from_slice(&used).f_to_device(c.device())?)?
        .f_mul(
            &Tensor::from_slice(&weights)
                .f_to_device(c.device())?
                .f_view(shape.as_slice())?,
        )?
        .f_sum_dim_intlist(0, false, Kind::Double)?;
    c.f_get(0)?.f_copy_(&first)?;
    for k in 1..n {
        let previous = c.f_get(k - 1)?.f_mul_scalar(z)?;
        let _ = c.f_get(k)?.f_add_(&previous)?;
    }
    // c_{n−1} = z / (z² − 1) · (z c_{n−2} + c_{n−1}); then c_k = z (c_{k+1} − c_k).
    let last = c
        .f_get(n - 2)?
        .f_mul_scalar(z)?
        .f_add(&c.f_get(n - 1)?)?
        .f_mul_scalar(z / (z * z - 1.0))?;
    c.f_get(n - 1)?.f_copy_(&last)?;
    for k in (0..n - 1).rev() {
        let next = c.f_get(k + 1)?.f_sub(&c.f_get(k)?)?.f_mul_scalar(z)?;
        c.f_get(k)?.f_copy_(&next)?;
    }
    Ok(c.f_movedim([0], [axis])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(values: &[f64]) -> Tensor {
        Tensor::from_slice(values).f_view([1, -1]).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn a_cubic_spline_reproduces_its_samples_and_a_linear_ramp() {
        // Upsampling a ramp: the spline is exact on polynomials of degree ≤ 3; the edge extension
        // bends it near the ends only (its influence decays by |√3 − 2| per voxel).
        let ramp: Vec<f64> = (0..20).map(|i| i as f64).collect();
        let up = values(&zoom_axis(&line(&ramp), 1, 40, Order::Cubic).unwrap());
        for (k, v) in up.iter().enumerate().skip(14).take(12) {
            let expected = (k as f64 + 0.5) * 0.5 - 0.5;
            assert!((v - expected).abs() < 1e-3, "{k}: {v} vs {expected}");
        }
        // Identity when the size does not change.
        let same = values(&zoom_axis(&line(&ramp), 1, 20, Order::Cubic).unwrap());
        assert_eq!(same, ramp);
    }

    #[test]
    fn nearest_rounds_half_up_and_linear_clamps_the_edges() {
        let x = line(&[0.0, 10.0, 20.0, 30.0]);
        // Coordinates (k + 0.5) · 4/8 − 0.5 = −0.25, 0.25, 0.75, …
        assert_eq!(
            values(&zoom_axis(&x, 1, 8, Order::Nearest).unwrap()),
            [0., 0., 10., 10., 20., 20., 30., 30.]
        );
        assert_eq!(
            values(&zoom_axis(&x, 1, 8, Order::Linear).unwrap()),
            [0., 2.5, 7.5, 12.5, 17.5, 22.5, 27.5, 30.]
        );
    }

    #[test]
    fn the_low_resolution_axis_is_nnunets() {
        assert_eq!(separate_axis([0.8, 0.8, 5.0], [0.8, 0.8, 1.5]), Some(2));
        assert_eq!(separate_axis([1.0, 1.0, 1.5], [1.0, 1.0, 5.0]), Some(2));
        assert_eq!(separate_axis([1.0, 1.0, 1.5], [1.0, 1.0, 2.0]), None);
        // Two axes share the coarsest spacing: no separate axis.
        assert_eq!(separate_axis([0.24, 1.25, 1.25], [0.24, 1.25, 1.25]), None);
        assert_eq!(
            resampled_shape([5, 7, 9], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]),
            [2, 4, 4]
        );
    }
}
