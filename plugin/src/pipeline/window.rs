//! The sliding window both pipelines run (MONAI's `PatchInferer` idea): a splitter lays the
//! windows by its pipeline's rules ([`Rules`]), a batch of windows goes through the predictor at
//! once, mirroring wraps the predictor ([`mirrored`]), and a merger adds the weighted outputs
//! (Gaussian or constant importance) and divides by the summed weights. The sums live with the
//! model unless capped or out of memory there: then on the CPU, with a warning event ([`infer`]).

use super::accumulator_device;
use crate::error::{Error, ErrorKind, Result};
use crate::events::{Event, Progress, report};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Blend {
    Gaussian,
    Constant,
}

/// Where a pipeline starts its windows and how it draws its Gaussian: MONAI's
/// `sliding_window_inference` or nnU-Net v1's `_internal_predict_3D_3Dconv_tiled`. Both pad a
/// short axis to the window with zeros, the extra split below/above as `difference / 2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rules {
    Monai,
    NnUnet,
}

impl Rules {
    /// Window starts along an axis of `size` voxels.
    pub fn starts(self, size: i64, roi: i64, overlap: f64) -> Vec<i64> {
        match self {
            Rules::Monai => super::monai::window::window_starts(size, roi, overlap),
            Rules::NnUnet => super::nnunet::window::window_starts(size, roi, 1.0 - overlap),
        }
    }

    /// The importance map of a window, on `device`.
    pub fn importance(self, roi: [i64; 3], blend: Blend, device: Device) -> Result<Tensor> {
        Ok(match (self, blend) {
            (_, Blend::Constant) => Tensor::f_ones(roi, (Kind::Float, device))?,
            (Rules::Monai, Blend::Gaussian) => super::monai::window::importance_map(roi, device)?,
            (Rules::NnUnet, Blend::Gaussian) => {
                super::nnunet::window::gaussian(roi)?.f_to_device(device)?
            }
        })
    }
}

#[derive(Debug, Clone)]
pub struct WindowOptions {
    pub roi: [i64; 3],
    pub rules: Rules,
    /// Fraction of the window shared by neighbours, in [0, 1) (nnU-Net's step is 1 − overlap).
    pub overlap: f64,
    pub blend: Blend,
    /// Windows per forward pass.
    pub batch: i64,
    /// Fill a short last batch up to `batch` with copies of its last window (their predictions are
    /// dropped): on CUDA with cuDNN's benchmark mode a new batch size would time every convolution
    /// again, which costs more than the few extra windows.
    pub fill_last_batch: bool,
}

/// The mirrorings of the tensor dimensions `dims`, as nnU-Net enumerates them: every subset, the
/// first dimension flipping fastest, the identity first.
pub fn mirrorings(dims: &[i64]) -> Vec<Vec<i64>> {
    (0..1usize << dims.len())
        .map(|mask| {
            (0..dims.len())
                .filter(|i| mask >> i & 1 == 1)
                .map(|i| dims[i])
                .collect()
        })
        .collect()
}

/// `predict` averaged over `flips` (each view flipped back, added in order with weight 1/len, as
/// nnU-Net does); the identity alone is `predict` itself.
pub fn mirrored<'a>(
    flips: &'a [Vec<i64>],
    predict: &'a dyn Fn(&Tensor) -> Result<Tensor>,
) -> impl Fn(&Tensor) -> Result<Tensor> + 'a {
    move |window: &Tensor| {
        if flips.len() == 1 && flips[0].is_empty() {
            return predict(window);
        }
        let mut mean: Option<Tensor> = None;
        for f in flips {
            let p = if f.is_empty() {
                predict(window)?
            } else {
                predict(&window.f_flip(f)?)?.f_flip(f)?
            };
            let p = p.f_mul_scalar(1.0 / flips.len() as f64)?;
            mean = Some(match mean {
                None => p,
                Some(m) => m.f_add(&p)?,
            });
        }
        mean.ok_or_else(|| Error::internal("no mirroring"))
    }
}

/// The blended prediction `[classes, …]` of `image` `[C, …]` (float32). Its sums live on the
/// image's device unless they need more than `max_gpu_accumulator_mb` there, or that device runs
/// out of memory: then the window starts again with them on the CPU, after a warning event.
pub fn infer(
    image: &Tensor,
    opts: &WindowOptions,
    classes: i64,
    max_gpu_accumulator_mb: Option<u64>,
    predict: &dyn Fn(&Tensor) -> Result<Tensor>,
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    // The sums need (classes + 1) float maps of the image.
    let bytes = (classes as u64 + 1) * image.numel() as u64 * 4;
    let on = accumulator_device(image.device(), bytes, max_gpu_accumulator_mb);
    match sliding_window(image, opts, on, predict, progress) {
        Err(e) if e.kind == ErrorKind::OutOfMemory && on != Device::Cpu => {
            report(
                progress,
                Event {
                    stage: "infer",
                    message: format!(
                        "warning: {} out of memory for the sliding-window sums; retrying with them on the CPU",
                        crate::engine::device_name(on)
                    ),
                    ..Default::default()
                },
            )?;
            sliding_window(image, opts, Device::Cpu, predict, progress)
        }
        other => other,
    }
}

/// One pass of the window over `image` with the sums on `on`: `[K, …]`, each batch a progress
/// event (done and total in windows).
pub fn sliding_window(
    image: &Tensor,
    opts: &WindowOptions,
    on: Device,
    predict: &dyn Fn(&Tensor) -> Result<Tensor>,
    progress: &mut dyn Progress,
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
    let (padded, pads) = pad_to_roi(image, opts.roi)?;
    let psize: [i64; 3] = std::array::from_fn(|d| spatial[d] + pads[d].0 + pads[d].1);
    let windows = split(psize, opts);
    let weight = opts.rules.importance(opts.roi, opts.blend, on)?;
    let crop = |t: &Tensor, s: &[i64; 3], lead: i64| -> Result<Tensor> {
        let mut v = t.shallow_clone();
        for d in 0..3 {
            v = v.f_narrow(lead + d as i64, s[d], opts.roi[d])?;
        }
        Ok(v)
    };
    // Allocated at the first prediction, when the class count is known: the largest allocations
    // of the pipeline, fallible, so that a GPU out-of-memory is an error.
    let mut sums: Option<(Tensor, Tensor)> = None;
    let mut done = 0;
    for chunk in windows.chunks(opts.batch as usize) {
        let mut crops = chunk
            .iter()
            .map(|s| crop(&padded, s, 1))
            .collect::<Result<Vec<_>>>()?;
        if opts.fill_last_batch
            && let Some(last) = chunk.last()
        {
            let copy = crop(&padded, last, 1)?;
            crops.resize_with(opts.batch as usize, || copy.shallow_clone());
        }
        let pred = predict(&Tensor::f_stack(&crops, 0)?)?
            .f_to_device(on)?
            .f_to_kind(Kind::Float)?;
        let (sum, count) = match &mut sums {
            Some(s) => s,
            None => sums.insert((
                Tensor::f_zeros(
                    [pred.size()[1], psize[0], psize[1], psize[2]],
                    (Kind::Float, on),
                )?,
                Tensor::f_zeros(psize, (Kind::Float, on))?,
            )),
        };
        for (b, s) in chunk.iter().enumerate() {
            let _ = crop(sum, s, 1)?.f_add_(&pred.f_get(b as i64)?.f_mul(&weight)?)?;
            let _ = crop(count, s, 0)?.f_add_(&weight)?;
        }
        done += chunk.len() as u64;
        report(
            progress,
            Event {
                stage: "infer",
                done,
                total: windows.len() as u64,
                ..Default::default()
            },
        )?;
    }
    let (sum, count) = sums.ok_or_else(|| Error::internal("sliding window produced no windows"))?;
    let mut out = average(sum, &count)?;
    for d in 0..3 {
        out = out.f_narrow(1 + d as i64, pads[d].0, spatial[d])?;
    }
    Ok(out)
}

/// The window starts, the last axis fastest.
fn split(size: [i64; 3], opts: &WindowOptions) -> Vec<[i64; 3]> {
    let starts: [Vec<i64>; 3] =
        std::array::from_fn(|d| opts.rules.starts(size[d], opts.roi[d], opts.overlap));
    let mut windows = Vec::new();
    for &x in &starts[0] {
        for &y in &starts[1] {
            windows.extend(starts[2].iter().map(|&z| [x, y, z]));
        }
    }
    windows
}

/// `t` `[C, …]` padded with zeros up to `roi` where shorter, the extra split below/above as
/// `difference / 2` (MONAI's and nnU-Net's `pad_nd_image` alike); the pads per axis.
pub fn pad_to_roi(t: &Tensor, roi: [i64; 3]) -> Result<(Tensor, [(i64, i64); 3])> {
    let s = t.size();
    let pads: [(i64, i64); 3] = std::array::from_fn(|d| {
        let diff = (roi[d] - s[1 + d]).max(0);
        (diff / 2, diff - diff / 2)
    });
    if pads.iter().all(|p| p.0 + p.1 == 0) {
        return Ok((t.shallow_clone(), pads));
    }
    let padded = t.f_constant_pad_nd([
        pads[2].0, pads[2].1, pads[1].0, pads[1].1, pads[0].0, pads[0].1,
    ])?;
    Ok((padded, pads))
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
    use crate::events::Silent;

    #[test]
    fn identity_predictor_reconstructs_the_image_under_both_rules() {
        let image = Tensor::randn([2, 37, 20, 50], (Kind::Float, Device::Cpu));
        // MONAI's rules: 4 × 1 × 6 = 24 windows; the last batch of 5 is short, filled up or not.
        for rules in [Rules::Monai, Rules::NnUnet] {
            for fill_last_batch in [false, true] {
                let opts = WindowOptions {
                    roi: [16, 32, 16],
                    rules,
                    overlap: 0.5,
                    blend: Blend::Gaussian,
                    batch: 5,
                    fill_last_batch,
                };
                let sizes = std::cell::RefCell::new(Vec::new());
                let identity = |b: &Tensor| {
                    sizes.borrow_mut().push(b.size()[0]);
                    Ok(b.shallow_clone())
                };
                let out = infer(&image, &opts, 2, None, &identity, &mut Silent).unwrap();
                assert_eq!(out.size(), image.size());
                assert!(out.allclose(&image, 1e-5, 1e-5, false));
                let sizes = sizes.into_inner();
                if rules == Rules::Monai {
                    assert_eq!(sizes.len(), 5);
                    assert_eq!(sizes[4], if fill_last_batch { 5 } else { 4 });
                }
            }
        }
    }

    #[test]
    fn mirrorings_are_nnunets_eight_in_its_order() {
        let eight = mirrorings(&[4, 3, 2]);
        let nnunet: Vec<Vec<i64>> = vec![
            vec![],
            vec![4],
            vec![3],
            vec![4, 3],
            vec![2],
            vec![4, 2],
            vec![3, 2],
            vec![4, 3, 2],
        ];
        assert_eq!(eight, nnunet);
        assert_eq!(mirrorings(&[]), vec![Vec::<i64>::new()]);
        // a mirrored identity is the identity
        let x = Tensor::randn([1, 1, 4, 5, 6], (Kind::Float, Device::Cpu));
        let identity = |t: &Tensor| Ok(t.shallow_clone());
        let out = mirrored(&eight, &identity)(&x).unwrap();
        assert!(out.allclose(&x, 1e-6, 1e-6, false));
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
