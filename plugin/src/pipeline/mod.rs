//! Segmentation: a volume in, a label map out on the input's own grid, through the pipeline the
//! model file names ([`Pipeline`](crate::model_file::Pipeline)): MONAI's ([`monai`]: imported UNETR
//! models, the monai recipe's) or nnU-Net v1's ([`nnunet`]: imported UNETR++ models, the nnunet_v1
//! recipe's), chosen by one `match`. Both run the same sliding window ([`window`]: window batches,
//! the Gaussian, mirroring, progress, cancel, the sums' move to the CPU on a GPU out-of-memory) and
//! the same post-processing ([`postprocess`]); [`file`] adds reading, writing and the manifest.

pub mod file;
pub mod monai;
pub mod nnunet;
pub mod options;
pub mod postprocess;
pub mod window;

pub use file::segment_file;
pub use options::{ResampleBack, SegmentOptions};

use crate::error::{Error, ErrorKind, Result, catch_panic};
use crate::events::Progress;
use crate::model::fused::with_fused;
use crate::model::precision::{with_cast_cache, with_precision};
use crate::model_file::{Model, Preprocessing, Stage};
use crate::volume::{DType, Volume};
use tch::{Device, Kind, Tensor};

/// Whether a label map of `dtype` can hold every class of `model`: uint8 up to 256 classes,
/// uint16 for any (the types a host's buffer may have).
pub fn check_label_type(model: &Model, dtype: DType) -> Result<()> {
    match dtype {
        DType::U8 if model.meta.arch.out_channels() > 256 => Err(Error::invalid(format!(
            "out_dtype: the model has {} classes, more than uint8 holds: use LWI_DTYPE_UINT16",
            model.meta.arch.out_channels()
        ))),
        DType::U8 | DType::U16 => Ok(()),
        other => Err(Error::invalid(format!(
            "out_dtype {other:?}: labels are written as LWI_DTYPE_UINT8 or LWI_DTYPE_UINT16"
        ))),
    }
}

/// Segments `volume` with `model`: a label map (uint8, or uint16 beyond 256 classes) with the
/// input's dims and affine.
pub fn segment(
    model: &Model,
    volume: &Volume,
    opts: &SegmentOptions,
    progress: &mut dyn Progress,
) -> Result<Volume> {
    if model.meta.stage != Stage::Segmentation {
        return Err(Error::new(
            ErrorKind::ModelIncompatible,
            "this is an init-train model (stage init): fine-tune it before segmenting",
        ));
    }
    let cfg = &model.meta.arch;
    if cfg.in_channels() != 1 {
        return Err(Error::new(
            ErrorKind::ModelIncompatible,
            format!(
                "the model takes {} channels; a volume has 1",
                cfg.in_channels()
            ),
        ));
    }
    let device = model.vs.device();
    // A precision the device cannot run is refused before the preprocessing, not at the first window.
    opts.precision.check(device)?;
    // tch's tensor operations panic when libtorch fails (a CUDA out-of-memory in the forward
    // pass among them): caught here, so that it comes back as OutOfMemory and the accumulator
    // retry can fire.
    let predict = |input: &Tensor| -> Result<Tensor> {
        catch_panic(|| {
            let logits = with_precision(opts.precision, device, || {
                with_fused(opts.fused_norm, || {
                    tch::no_grad(|| model.net.forward_t(input, false))
                })
            })?;
            Ok(logits.f_to_kind(Kind::Float)?.f_softmax(1, Kind::Float)?)
        })
    };
    // Under autocast the weights are cast to bf16/fp16 once for the whole call, not once per window.
    with_cast_cache(|| match &model.meta.preprocessing {
        Preprocessing::Monai(p) => {
            let segmenter = Segmenter::new(p, cfg.out_channels(), device, &predict);
            catch_panic(|| monai::run(&segmenter, volume, opts, progress))
        }
        Preprocessing::NnUnet(p) => {
            let segmenter = Segmenter::new(p, cfg.out_channels(), device, &predict);
            catch_panic(|| nnunet::run(&segmenter, volume, opts, progress))
        }
    })
}

/// A model as a pipeline sees it: its preprocessing section `P`, its class count, its device and
/// its predictor.
pub struct Segmenter<'a, P> {
    pub preprocessing: &'a P,
    pub classes: i64,
    pub device: Device,
    /// `[B, 1, roi] → [B, classes, roi]` class probabilities.
    pub predict: &'a dyn Fn(&Tensor) -> Result<Tensor>,
}

impl<'a, P> Segmenter<'a, P> {
    pub fn new(
        preprocessing: &'a P,
        classes: i64,
        device: Device,
        predict: &'a dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Self {
        Segmenter {
            preprocessing,
            classes,
            device,
            predict,
        }
    }
}

/// Waits for the GPU's queued work, so that a stage's end event marks when its work ended.
pub(crate) fn settle(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Where the sliding-window sums live: with the model, unless that is a GPU and they would exceed
/// the cap.
pub fn accumulator_device(device: Device, bytes: u64, cap_mb: Option<u64>) -> Device {
    match cap_mb {
        Some(cap) if device.is_cuda() && bytes > cap << 20 => Device::Cpu,
        _ => device,
    }
}

/// The most voxels a volume is resampled into: 2³⁰ (4 GB as float32). A model's spacing far finer
/// than the volume's would otherwise ask libtorch for more than any machine holds.
pub const MAX_RESAMPLED_VOXELS: i128 = 1 << 30;

/// `dims`, the grid a volume is resampled into at `spacing`, within [`MAX_RESAMPLED_VOXELS`].
pub fn check_resampled(dims: [i64; 3], spacing: [f64; 3]) -> Result<()> {
    let voxels: i128 = dims.iter().map(|&d| i128::from(d)).product();
    if dims.iter().all(|&d| d >= 1) && voxels <= MAX_RESAMPLED_VOXELS {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "resampling to the model's spacing {spacing:?} mm gives a grid of {dims:?} voxels, more \
         than {MAX_RESAMPLED_VOXELS}: the spacing is far finer than the volume's"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulators_leave_the_gpu_only_beyond_the_cap() {
        let gpu = Device::Cuda(0);
        assert_eq!(accumulator_device(gpu, 3 << 30, None), gpu);
        assert_eq!(accumulator_device(gpu, 3 << 30, Some(4096)), gpu);
        assert_eq!(accumulator_device(gpu, 5 << 30, Some(4096)), Device::Cpu);
        assert_eq!(
            accumulator_device(Device::Cpu, 5 << 30, Some(1)),
            Device::Cpu
        );
    }
}
