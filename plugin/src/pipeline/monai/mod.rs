//! MONAI's pipeline (UNETR models): RAS → target spacing → HU window → foreground crop → sliding
//! window (softmax) → back onto the input grid → argmax. Going back resamples the class
//! probabilities (trilinear) and takes the argmax there, as nnU-Net does, so thin structures
//! survive; `resample: "nearest"` takes the argmax on the model's grid and samples labels by
//! nearest neighbour instead.

pub mod prepare;
pub mod train_case;

use super::options::{ResampleBack, SegmentOptions};
use super::tiling::{WindowOptions, sliding_window};
use super::{accumulator_device, settle};
use crate::error::{Error, ErrorKind, Result};
use crate::events::{Event, Progress, report};
use crate::model_file::MonaiPreprocessing;
use crate::volume::{DType, Volume};
use prepare::{Grid, Interp, Prepared, prepare, sample};
use tch::{Device, Kind, Tensor};

/// A model as this pipeline sees it: what `prepare` does and what the predictor returns.
pub struct Segmenter<'a> {
    pub preprocessing: &'a MonaiPreprocessing,
    pub classes: i64,
    pub device: Device,
    /// `[B, 1, roi] → [B, classes, roi]` class probabilities.
    pub predict: &'a dyn Fn(&Tensor) -> Result<Tensor>,
}

/// The segmentation pipeline around any predictor.
pub fn run(
    pipeline: &Segmenter,
    volume: &Volume,
    opts: &SegmentOptions,
    progress: &mut dyn Progress,
) -> Result<Volume> {
    let device = pipeline.device;
    let event = Event::progress;
    report(progress, event("preprocess", 0, 1))?;
    let prepared = prepare(pipeline.preprocessing, volume, device, opts.slab)?;
    settle(device);
    report(progress, event("preprocess", 1, 1))?;
    let probs = infer_views(pipeline, &prepared, opts, progress)?;
    settle(device);
    report(progress, event("resample", 0, 1))?;
    let kind = if pipeline.classes > 256 {
        Kind::Int
    } else {
        Kind::Uint8
    };
    let mut labels = labels_back(&probs, &prepared, volume, opts, kind)?;
    report(progress, event("resample", 1, 1))?;
    if opts.largest_component {
        labels = super::postprocess::largest_components(&labels, volume.dims())?.to_kind(kind);
    }
    // Written last, when nothing can cancel the call any more.
    if let Some(path) = &opts.save_preprocessed {
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

/// The summed class probabilities of the sliding window over the image and each mirrored view of
/// it (test-time augmentation). The sums live on the GPU unless capped or out of memory there:
/// then they move to the CPU, with a warning event.
fn infer_views(
    pipeline: &Segmenter,
    prepared: &Prepared,
    opts: &SegmentOptions,
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    let wopts = WindowOptions {
        roi: pipeline.preprocessing.roi_size,
        overlap: opts.overlap,
        blend: opts.blend,
        batch: opts.window_batch(pipeline.device),
        fill_last_batch: pipeline.device.is_cuda(),
    };
    let mut views: Vec<Vec<i64>> = vec![Vec::new()];
    views.extend(opts.tta_axes.iter().map(|&a| vec![2 + a]));
    // The sums need (classes + 1) float maps of the preprocessed volume.
    let bytes = (pipeline.classes as u64 + 1) * prepared.image.numel() as u64 * 4;
    let on = accumulator_device(pipeline.device, bytes, opts.max_gpu_accumulator_mb);
    let mut probs: Option<Tensor> = None;
    // The predictor and the out-of-memory warning both report progress.
    let sink = std::cell::RefCell::new(progress);
    for (v, flip) in views.iter().enumerate() {
        let mut batches = 0u64;
        let mut predict = |batch: &Tensor| -> Result<Tensor> {
            let p = if flip.is_empty() {
                (pipeline.predict)(batch)?
            } else {
                (pipeline.predict)(&batch.flip(flip))?.flip(flip)
            };
            batches += 1;
            report(
                &mut **sink.borrow_mut(),
                Event {
                    stage: "infer",
                    done: batches,
                    total: 0,
                    message: format!("view {} of {}", v + 1, views.len()),
                    ..Default::default()
                },
            )?;
            Ok(p)
        };
        let p = match sliding_window(&prepared.image, &wopts, on, &mut predict) {
            Err(e) if e.kind == ErrorKind::OutOfMemory && on.is_cuda() => {
                report(
                    &mut **sink.borrow_mut(),
                    Event {
                        stage: "infer",
                        message: format!(
                            "warning: GPU out of memory for the {} MiB of accumulators; retrying with them on the CPU",
                            bytes >> 20
                        ),
                        ..Default::default()
                    },
                )?;
                sliding_window(&prepared.image, &wopts, Device::Cpu, &mut predict)?
            }
            other => other?,
        };
        probs = Some(match probs {
            None => p,
            Some(sum) => {
                let on = sum.device();
                sum + p.to_device(on)
            }
        });
    }
    probs.ok_or_else(|| Error::internal("no inference view"))
}

/// The labels on the input's own grid, slab by slab along z (bounding the sampling grid's
/// memory): the argmax of the resampled scores, or (`resample: "nearest"`) the model grid's
/// argmax sampled by nearest neighbour. Outside the crop everything is background: zero padding
/// gives label 0 and all-zero scores.
fn labels_back(
    probs: &Tensor,
    prepared: &Prepared,
    volume: &Volume,
    opts: &SegmentOptions,
    kind: Kind,
) -> Result<Tensor> {
    let dst = Grid {
        affine: volume.affine,
        dims: volume.dims(),
    };
    let labels_on_model_grid = (opts.resample == ResampleBack::Nearest)
        .then(|| probs.argmax(0, true).to_kind(Kind::Float));
    let mut slabs = Vec::new();
    for z0 in (0..dst.dims[2]).step_by(opts.slab as usize) {
        let z = z0..(z0 + opts.slab).min(dst.dims[2]);
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
