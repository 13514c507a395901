//! nnU-Net v1's training augmentation for UNETR++ (`get_moreDA_augmentation`, batchgenerators'
//! transforms, in their order and with the UNETR++ Synapse trainer's probabilities and ranges;
//! unetrpp.md (d)): the spatial transform (in-plane rotation and scaling of a larger sampled patch,
//! dummy-2D), Gaussian noise, Gaussian blur, multiplicative brightness, contrast, simulated low
//! resolution, inverted gamma, gamma, mirroring. Each draw comes from the run's RNG (voxel noise
//! from libtorch's, reseeded per epoch), so a resumed run repeats them.
//! Statistics checked against batchgenerators in `plugin/tests/nnunet_recipe.rs`.

use crate::error::{Error, Result};
use crate::pipeline::nnunet::resample::{self, Order};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Each transform's probability per sample and its range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NnUnetAugment {
    /// `SpatialTransform` in dummy-2D mode: each z slice rotated in-plane by U(±degrees) and scaled
    /// by one factor from `scale_range` (half the time below 1), sampled from a larger patch
    /// (`get_patch_size`); bicubic for the image, nearest for the labels, zero outside.
    pub rotation_p: f64,
    pub rotation_degrees: f64,
    pub scale_p: f64,
    pub scale_range: [f64; 2],
    /// `GaussianNoiseTransform`: v + N(0, s²), s ~ U(range) (batchgenerators draws the standard
    /// deviation from what it calls the variance range).
    pub noise_p: f64,
    pub noise_sd: [f64; 2],
    /// `GaussianBlurTransform`: scipy's `gaussian_filter`, σ ~ U(range), per channel with
    /// `blur_p_channel`.
    pub blur_p: f64,
    pub blur_sigma: [f64; 2],
    pub blur_p_channel: f64,
    /// `BrightnessMultiplicativeTransform`: v · U(range).
    pub brightness_p: f64,
    pub brightness_range: [f64; 2],
    /// `ContrastAugmentationTransform` (range preserved).
    pub contrast_p: f64,
    pub contrast_range: [f64; 2],
    /// `SimulateLowResolutionTransform`: nearest down to zoom ~ U(range), cubic back up; with
    /// `dummy_2d` the first axis (z) is left alone.
    pub low_res_p: f64,
    pub low_res_zoom: [f64; 2],
    pub low_res_p_channel: f64,
    /// `GammaTransform` on the inverted image, then on the image (statistics retained).
    pub gamma_inverted_p: f64,
    pub gamma_p: f64,
    pub gamma_range: [f64; 2],
    /// `MirrorTransform`: each of the three axes flipped with this probability.
    pub mirror_p: f64,
    /// nnU-Net's dummy-2D mode (`do_dummy_2D_data_aug`, on for Synapse).
    pub dummy_2d: bool,
}

impl Default for NnUnetAugment {
    fn default() -> Self {
        NnUnetAugment {
            rotation_p: 0.2,
            rotation_degrees: 180.0,
            scale_p: 0.2,
            scale_range: [0.7, 1.4],
            noise_p: 0.1,
            noise_sd: [0.0, 0.1],
            blur_p: 0.2,
            blur_sigma: [0.5, 1.0],
            blur_p_channel: 0.5,
            brightness_p: 0.15,
            brightness_range: [0.75, 1.25],
            contrast_p: 0.15,
            contrast_range: [0.75, 1.25],
            low_res_p: 0.25,
            low_res_zoom: [0.5, 1.0],
            low_res_p_channel: 0.5,
            gamma_inverted_p: 0.1,
            gamma_p: 0.3,
            gamma_range: [0.7, 1.5],
            mirror_p: 0.5,
            dummy_2d: true,
        }
    }
}

impl NnUnetAugment {
    /// Probabilities in [0, 1], ranges ordered and positive where a factor is drawn.
    pub fn check(&self) -> Result<()> {
        let p = [
            ("rotation_p", self.rotation_p),
            ("scale_p", self.scale_p),
            ("noise_p", self.noise_p),
            ("blur_p", self.blur_p),
            ("blur_p_channel", self.blur_p_channel),
            ("brightness_p", self.brightness_p),
            ("contrast_p", self.contrast_p),
            ("low_res_p", self.low_res_p),
            ("low_res_p_channel", self.low_res_p_channel),
            ("gamma_inverted_p", self.gamma_inverted_p),
            ("gamma_p", self.gamma_p),
            ("mirror_p", self.mirror_p),
        ];
        if let Some((name, v)) = p.iter().find(|(_, v)| !(0.0..=1.0).contains(v)) {
            return Err(Error::invalid(format!(
                "{name} must be a probability in [0, 1], got {v}"
            )));
        }
        let ranges = [
            ("scale_range", self.scale_range, f64::MIN_POSITIVE),
            ("noise_sd", self.noise_sd, 0.0),
            ("blur_sigma", self.blur_sigma, f64::MIN_POSITIVE),
            ("brightness_range", self.brightness_range, 0.0),
            ("contrast_range", self.contrast_range, 0.0),
            ("low_res_zoom", self.low_res_zoom, f64::MIN_POSITIVE),
            ("gamma_range", self.gamma_range, f64::MIN_POSITIVE),
        ];
        if let Some((name, r, lo)) = ranges
            .iter()
            .find(|(_, r, lo)| !(r[0] >= *lo && r[0] <= r[1] && r[1].is_finite()))
        {
            let sign = if *lo > 0.0 { "0 <" } else { "0 ≤" };
            return Err(Error::invalid(format!(
                "{name} {r:?} must be [low, high] with {sign} low ≤ high"
            )));
        }
        if !(0.0..=180.0).contains(&self.rotation_degrees) {
            return Err(Error::invalid(format!(
                "rotation_degrees {} must be in [0, 180]",
                self.rotation_degrees
            )));
        }
        if self.low_res_zoom[1] > 1.0 {
            return Err(Error::invalid(format!(
                "low_res_zoom {:?} must lie within (0, 1]",
                self.low_res_zoom
            )));
        }
        Ok(())
    }

    /// The patch to sample for a final `patch`: with rotation or scaling on, nnU-Net's
    /// `get_patch_size` of the in-plane size (rotated by up to 90°, divided by the smallest scale).
    pub fn sampled_patch(&self, patch: [i64; 3]) -> [i64; 3] {
        if self.rotation_p == 0.0 && self.scale_p == 0.0 {
            return patch;
        }
        let angle = self
            .rotation_degrees
            .to_radians()
            .min(std::f64::consts::FRAC_PI_2);
        let (h, w) = (patch[1] as f64, patch[2] as f64);
        let (c, s) = (angle.cos(), angle.sin());
        let rotated = [(h * c + w * s).abs(), (-h * s + w * c).abs()];
        let smallest = self.scale_range[0];
        [
            patch[0],
            (rotated[0].max(h) / smallest) as i64,
            (rotated[1].max(w) / smallest) as i64,
        ]
    }

    /// `SpatialTransform` (dummy 2D, `random_crop=False`): the sampled patch `[C, z, H, W]` rotated
    /// and scaled about its centre onto the final `patch`, or its centre cut when neither is drawn.
    pub fn spatial(
        &self,
        image: Tensor,
        labels: Option<Tensor>,
        patch: [i64; 3],
        rng: &mut ChaCha8Rng,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let angle = (rng.random::<f64>() < self.rotation_p).then(|| {
            let a = self.rotation_degrees.to_radians();
            uniform(rng, [-a, a])
        });
        let scale = (rng.random::<f64>() < self.scale_p).then(|| factor(rng, self.scale_range));
        let s = image.size();
        let (big_h, big_w) = (s[2], s[3]);
        let (h, w) = (patch[1], patch[2]);
        if angle.is_none() && scale.is_none() {
            let cut = |t: Tensor| -> Result<Tensor> {
                Ok(t.f_narrow(2, (big_h - h) / 2, h)?
                    .f_narrow(3, (big_w - w) / 2, w)?)
            };
            return Ok((cut(image)?, labels.map(cut).transpose()?));
        }
        let (sin, cos) = angle.unwrap_or(0.0).sin_cos();
        let sc = scale.unwrap_or(1.0);
        // batchgenerators' coordinates: centred on the final patch, rotated as a row vector by
        // [[cos, −sin], [sin, cos]], scaled, then moved to the sampled patch's centre
        let mut grid = Vec::with_capacity((h * w * 2) as usize);
        for i in 0..h {
            for j in 0..w {
                let (ci, cj) = (
                    i as f64 - (h - 1) as f64 / 2.0,
                    j as f64 - (w - 1) as f64 / 2.0,
                );
                let y = (ci * cos + cj * sin) * sc + big_h as f64 / 2.0 - 0.5;
                let x = (-ci * sin + cj * cos) * sc + big_w as f64 / 2.0 - 0.5;
                // grid_sample's normalised (x, y), corners aligned
                grid.push((2.0 * x / (big_w - 1) as f64 - 1.0) as f32);
                grid.push((2.0 * y / (big_h - 1) as f64 - 1.0) as f32);
            }
        }
        let grid = Tensor::from_slice(&grid)
            .f_view([1, h, w, 2])?
            .f_to_device(image.device())?;
        // each z slice is a channel of one 2D image, as Convert3DTo2DTransform makes it
        let sample = |t: &Tensor, mode: i64| -> Result<Tensor> {
            let planes = t.f_reshape([1, -1, big_h, big_w])?.f_to_kind(Kind::Float)?;
            let out = planes.f_grid_sampler_2d(&grid, mode, 0, true)?;
            Ok(out.f_reshape([s[0], s[1], h, w])?)
        };
        const BICUBIC: i64 = 2;
        const NEAREST: i64 = 1;
        let image = sample(&image, BICUBIC)?;
        let labels = labels
            .map(|l| -> Result<Tensor> { Ok(sample(&l, NEAREST)?.f_round()?.f_to_kind(l.kind())?) })
            .transpose()?;
        Ok((image, labels))
    }

    /// One sample's image `[C, z, y, x]` (float) and labels, transformed in batchgenerators' order.
    pub fn apply(
        &self,
        image: Tensor,
        labels: Option<Tensor>,
        rng: &mut ChaCha8Rng,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut x = image.f_to_kind(Kind::Float)?;
        if rng.random::<f64>() < self.noise_p {
            let sd = uniform(rng, self.noise_sd);
            x = x.f_add(&x.f_randn_like()?.f_mul_scalar(sd)?)?;
        }
        if rng.random::<f64>() < self.blur_p {
            x = per_channel(&x, |c| {
                if rng.random::<f64>() <= self.blur_p_channel {
                    gaussian_filter(c, uniform(rng, self.blur_sigma))
                } else {
                    Ok(c.shallow_clone())
                }
            })?;
        }
        if rng.random::<f64>() < self.brightness_p {
            x = per_channel(&x, |c| {
                Ok(c.f_mul_scalar(uniform(rng, self.brightness_range))?)
            })?;
        }
        if rng.random::<f64>() < self.contrast_p {
            x = per_channel(&x, |c| contrast(c, factor(rng, self.contrast_range)))?;
        }
        if rng.random::<f64>() < self.low_res_p {
            x = per_channel(&x, |c| {
                if rng.random::<f64>() < self.low_res_p_channel {
                    low_resolution(c, uniform(rng, self.low_res_zoom), self.dummy_2d)
                } else {
                    Ok(c.shallow_clone())
                }
            })?;
        }
        if rng.random::<f64>() < self.gamma_inverted_p {
            let inverted = x.f_neg()?;
            x = per_channel(&inverted, |c| gamma(c, factor(rng, self.gamma_range)))?.f_neg()?;
        }
        if rng.random::<f64>() < self.gamma_p {
            x = per_channel(&x, |c| gamma(c, factor(rng, self.gamma_range)))?;
        }
        let mut labels = labels;
        for axis in 1..4 {
            if rng.random::<f64>() < self.mirror_p {
                x = x.f_flip([axis])?;
                labels = labels.map(|l| l.f_flip([axis])).transpose()?;
            }
        }
        Ok((x, labels))
    }
}

fn uniform(rng: &mut ChaCha8Rng, r: [f64; 2]) -> f64 {
    if r[0] == r[1] {
        r[0]
    } else {
        rng.random_range(r[0]..r[1])
    }
}

/// batchgenerators' factor draw for contrast and gamma: half the time below 1, half above.
fn factor(rng: &mut ChaCha8Rng, r: [f64; 2]) -> f64 {
    if rng.random::<f64>() < 0.5 && r[0] < 1.0 {
        uniform(rng, [r[0], 1.0])
    } else {
        uniform(rng, [r[0].max(1.0), r[1]])
    }
}

fn per_channel(x: &Tensor, mut f: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let channels: Vec<Tensor> = (0..x.size()[0])
        .map(|c| f(&x.get(c)))
        .collect::<Result<_>>()?;
    Ok(Tensor::f_stack(&channels, 0)?)
}

/// `augment_contrast(preserve_range=True)`: (v − mean)·f + mean, held to the old range.
fn contrast(c: &Tensor, f: f64) -> Result<Tensor> {
    let mean = c.f_mean(Kind::Double)?.double_value(&[]);
    let (lo, hi) = (c.f_min()?, c.f_max()?);
    Ok(c.f_sub_scalar(mean)?
        .f_mul_scalar(f)?
        .f_add_scalar(mean)?
        .f_clamp_tensor(Some(&lo), Some(&hi))?)
}

/// `augment_gamma(retain_stats=True)` on one channel: ((v − min)/(range + ε))^γ·(range + ε) + min,
/// then the old mean and standard deviation restored.
fn gamma(c: &Tensor, g: f64) -> Result<Tensor> {
    const EPS: f64 = 1e-7;
    let c64 = c.f_to_kind(Kind::Double)?;
    let (mean, sd) = (
        c64.f_mean(Kind::Double)?.double_value(&[]),
        c64.f_std(false)?.double_value(&[]),
    );
    let min = c64.f_min()?.double_value(&[]);
    let range = c64.f_max()?.double_value(&[]) - min + EPS;
    let y = c64
        .f_sub_scalar(min)?
        .f_div_scalar(range)?
        .f_pow_tensor_scalar(g)?
        .f_mul_scalar(range)?
        .f_add_scalar(min)?;
    let (m, s) = (
        y.f_mean(Kind::Double)?.double_value(&[]),
        y.f_std(false)?.double_value(&[]),
    );
    Ok(y.f_sub_scalar(m)?
        .f_div_scalar(s + 1e-8)?
        .f_mul_scalar(sd)?
        .f_add_scalar(mean)?
        .f_to_kind(Kind::Float)?)
}

/// `augment_linear_downsampling_scipy(order_downsample=0, order_upsample=3)` on one channel.
fn low_resolution(c: &Tensor, zoom: f64, dummy_2d: bool) -> Result<Tensor> {
    let shape: [i64; 3] = std::array::from_fn(|d| c.size()[d]);
    let small: [i64; 3] = std::array::from_fn(|d| {
        if dummy_2d && d == 0 {
            shape[0]
        } else {
            (shape[d] as f64 * zoom).round_ties_even() as i64
        }
    });
    let c = c.f_unsqueeze(0)?;
    let down = resample::resize(&c, small, Order::Nearest, None)?;
    Ok(resample::resize(&down, shape, Order::Cubic, None)?
        .f_squeeze_dim(0)?
        .f_to_kind(Kind::Float)?)
}

/// scipy's `gaussian_filter(c, σ)` (truncate 4, mode "reflect": the edge voxel repeated), one
/// axis at a time.
pub fn gaussian_filter(c: &Tensor, sigma: f64) -> Result<Tensor> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let raw: Vec<f64> = (-radius..=radius)
        .map(|x| (-0.5 * (x as f64 / sigma).powi(2)).exp())
        .collect();
    let total: f64 = raw.iter().sum();
    let kernel: Vec<f64> = raw.iter().map(|w| w / total).collect();
    let mut out = c.f_to_kind(Kind::Double)?;
    for axis in 0..c.dim() as i64 {
        let n = out.size()[axis as usize];
        let reflect = |i: i64| {
            let k = i.rem_euclid(2 * n);
            if k < n { k } else { 2 * n - 1 - k }
        };
        let taps: Vec<Vec<i64>> = (-radius..=radius)
            .map(|t| (0..n).map(|i| reflect(i + t)).collect())
            .collect();
        let weights: Vec<Vec<f64>> = kernel.iter().map(|&w| vec![w; n as usize]).collect();
        out = resample::weighted_taps(&out, axis, &taps, &weights)?;
    }
    Ok(out.f_to_kind(Kind::Float)?)
}
