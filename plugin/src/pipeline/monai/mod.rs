//! MONAI's pipeline (imported UNETR models, models of the monai recipe): RAS → target spacing →
//! HU window → foreground crop → sliding window (softmax) → back onto the input grid → argmax.
//! Going back resamples the class probabilities (trilinear) and takes the argmax there, as
//! nnU-Net does, so thin structures survive; `resample: "nearest"` takes the argmax on the model's grid and samples labels by
//! nearest neighbour instead.

pub mod prepare;
pub mod train_case;
pub mod window;

use super::options::{MonaiOptions, ResampleBack, SegmentOptions};
use super::settle;
use super::window::Rules;
use crate::error::Result;
use crate::events::{Event, Progress, report};
use crate::model_file::MonaiPreprocessing;
use crate::volume::{DType, Volume};
use prepare::{Grid, Interp, Prepared, prepare, sample};
use tch::{Device, Kind, Tensor};

/// A model as this pipeline sees it.
pub type Segmenter<'a> = super::Segmenter<'a, MonaiPreprocessing>;

/// The segmentation pipeline around any predictor, reading the options as MONAI's pipeline does.
pub fn run(
    pipeline: &Segmenter,
    volume: &Volume,
    opts: &SegmentOptions,
    progress: &mut dyn Progress,
) -> Result<Volume> {
    let opts = &opts.monai();
    let device = pipeline.device;
    let event = Event::progress;
    report(progress, event("preprocess", 0, 1))?;
    let prepared = prepare(pipeline.preprocessing, volume, device, opts.slab)?;
    settle(device);
    report(progress, event("preprocess", 1, 1))?;
    // Mirrored only when asked; axis a (x, y, z) of the RAS image is dimension 2 + a of
    // `[B, C, X, Y, Z]`.
    let window = (pipeline.preprocessing.roi_size, Rules::Monai);
    let probs = opts.common.infer(
        &prepared.image,
        window,
        pipeline.classes,
        |a| 2 + a,
        pipeline.predict,
        progress,
    )?;
    settle(device);
    report(progress, event("resample", 0, 1))?;
    let kind = if pipeline.classes > 256 {
        Kind::Int
    } else {
        Kind::Uint8
    };
    let mut labels = labels_back(&probs, &prepared, volume, opts, kind)?;
    report(progress, event("resample", 1, 1))?;
    if opts.common.largest_component {
        labels = super::postprocess::largest_components(&labels, volume.dims())?.to_kind(kind);
    }
    // Written last, when nothing can cancel the call any more.
    if let Some(path) = &opts.common.save_preprocessed {
        let image = prepared.image.squeeze_dim(0).to_device(Device::Cpu);
        crate::io::write_volume(&Volume::new(image, prepared.grid.affine, DType::F32)?, path)?;
    }
    let dtype = if kind == Kind::Uint8 {
        DType::U8
    } else {
        DType::U16
    };
    Volume::new(labels, volume.affine, dtype)
}

/// The labels on the input's own grid, slab by slab along z (bounding the sampling grid's
/// memory): the argmax of the resampled scores, or (`resample: "nearest"`) the model grid's
/// argmax sampled by nearest neighbour. Outside the crop everything is background: zero padding
/// gives label 0 and all-zero scores.
fn labels_back(
    probs: &Tensor,
    prepared: &Prepared,
    volume: &Volume,
    opts: &MonaiOptions,
    kind: Kind,
) -> Result<Tensor> {
    let dst = Grid {
        affine: volume.affine,
        dims: volume.dims(),
    };
    let labels_on_model_grid = (opts.resample == ResampleBack::Nearest)
        .then(|| probs.argmax(0, true).to_kind(Kind::Float));
    let mut slabs = Vec::new();
    let step = opts.slab;
    for z0 in (0..dst.dims[2]).step_by(step as usize) {
        let z = z0..(z0 + step).min(dst.dims[2]);
        let from = &prepared.grid.affine;
        let slab = match &labels_on_model_grid {
            Some(labels) => sample(labels, from, &dst, z, Interp::Nearest, false)?
                .squeeze_dim(0)
                .round(),
            None => sample(probs, from, &dst, z, Interp::Linear, false)?.argmax(0, false),
        };
        slabs.push(slab.to_kind(kind).to_device(Device::Cpu));
    }
    Ok(Tensor::f_cat(&slabs, 2)?)
}
