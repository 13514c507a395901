//! nnU-Net v1's pipeline (UNETR++ models trained inside nnU-Net, models of the nnunet_v1 recipe):
//! the voxels as stored (no reorientation), the network's axes (z, y, x) of the stored array, crop
//! to the non-zero box, resampling to the model's spacing, CT normalisation (clip to the training
//! foreground's 0.5/99.5 percentiles, z-score with its mean and sd), padding to the patch, the
//! shared sliding window under the rules of `nnunet==1.7.1`'s
//! `SegmentationNetwork._internal_predict_3D_3Dconv_tiled` ([`window`]: step 0.5, Gaussian σ =
//! patch/8, softmax per tile averaged over the 8 mirrorings), then the class probabilities back
//! onto the cropped grid, argmax, pasted into the input's grid. Resampling is nnU-Net's
//! ([`resample`]): cubic spline for the image, linear for the probabilities, nearest along the
//! low-resolution axis of an anisotropic spacing.

pub mod back;
pub mod fingerprint;
pub mod prepare;
pub mod resample;
pub mod train_case;
pub mod window;

use super::options::SegmentOptions;
use super::window::Rules;
use crate::error::{Error, ErrorKind, Result};
use crate::events::{Event, Progress, report};
use crate::model_file::NnUnetPreprocessing;
use crate::volume::Volume;

/// A model as this pipeline sees it.
pub type Segmenter<'a> = super::Segmenter<'a, NnUnetPreprocessing>;

/// Segments `volume`, with the same progress stages as MONAI's pipeline, reading the options as
/// nnU-Net's pipeline does (refusing those it has no place for).
pub fn run(
    segmenter: &Segmenter,
    volume: &Volume,
    opts: &SegmentOptions,
    progress: &mut dyn Progress,
) -> Result<Volume> {
    let pre = segmenter.preprocessing;
    let norm = pre.ct_normalization.as_ref().ok_or_else(|| {
        Error::new(
            ErrorKind::ModelIncompatible,
            "this nnU-Net model has no CT normalisation (import it with --ct-norm P0.5,P99.5,MEAN,SD from its plans)",
        )
    })?;
    let opts = &opts.nn_unet()?.common;
    let event = Event::progress;
    report(progress, event("preprocess", 0, 1))?;
    let prepared = prepare::prepare(volume, pre.spacing, norm)?;
    let image = prepared.image.f_to_device(segmenter.device)?;
    report(progress, event("preprocess", 1, 1))?;
    // Axis a (x, y, z) of the stored array is dimension 4 - a of `[B, C, z, y, x]`.
    let window = (pre.roi_size, Rules::NnUnet);
    let probs = opts.infer(
        &image,
        window,
        segmenter.classes,
        |a| 4 - a,
        segmenter.predict,
        progress,
    )?;
    report(progress, event("resample", 0, 1))?;
    let mut labels = back::labels_back(volume, &prepared, &probs, segmenter.classes)?;
    report(progress, event("resample", 1, 1))?;
    if opts.largest_component {
        let kept = super::postprocess::largest_components(&labels.data, volume.dims())?;
        labels = Volume::new(
            kept.f_to_kind(labels.data.kind())?,
            volume.affine,
            labels.dtype,
        )?;
    }
    if let Some(path) = &opts.save_preprocessed {
        crate::io::write_volume(&prepared.to_volume(volume)?, path)?;
    }
    Ok(labels)
}
