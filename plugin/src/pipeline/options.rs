//! The options of a segmentation call: the C ABI's `options_json`, the flags of `lwi segment`.
//! One flat document for every model; each pipeline takes its own typed view of it, with its own
//! defaults ([`SegmentOptions::monai`], [`SegmentOptions::nn_unet`]), and an option given that
//! its type has no place for is refused by name: an option is never ignored.

use super::window::{Blend, Rules, WindowOptions, mirrored, mirrorings};
use crate::error::{Error, Result};
use crate::events::Progress;
use crate::model::Precision;
use crate::model_file::Pipeline;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResampleBack {
    /// Resample class probabilities, then argmax (default; keeps thin structures).
    Scores,
    /// Argmax on the model's grid, then nearest-neighbour labels.
    Nearest,
}

/// Options of a segmentation call (`options_json` of the C ABI, flags of `lwi segment`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentOptions {
    /// Fraction of the window shared by neighbours, in [0, 1).
    pub overlap: f64,
    pub blend: Blend,
    /// Windows per forward pass; absent: 1 on the CPU, 4 on CUDA (a 512×512×800 CT at 1.5 mm then
    /// peaks near 5 GB, docs/performance.md).
    pub sw_batch: Option<i64>,
    /// Mirroring (test-time augmentation): each window's prediction averaged over every
    /// combination of flips of these axes (0 = x, 1 = y, 2 = z), `true` for all three, `false` for
    /// none. Absent: the pipeline's default (MONAI's none, nnU-Net's all three). `tta_axes` is
    /// its former name.
    #[serde(alias = "tta_axes")]
    pub mirror: Option<Mirror>,
    /// nnU-Net's pipeline resamples scores only.
    pub resample: ResampleBack,
    /// fp32; bf16 autocast on CUDA (as fp16 on GPUs without bfloat16) or on a CPU with AVX512-BF16
    /// or AMX-BF16; fp16 on CUDA; auto (see [`Precision`]).
    pub precision: Precision,
    /// Z-slices sampled per resampling step of MONAI's pipeline (bounds temporary memory);
    /// absent: 32.
    pub slab: Option<i64>,
    /// Keep only the largest connected component of each label (26-connectivity).
    pub largest_component: bool,
    /// On CUDA, keep the sliding-window accumulators on the CPU when they would take more than
    /// this many MiB of GPU memory (they also move there, with a warning event, on out-of-memory).
    pub max_gpu_accumulator_mb: Option<u64>,
    /// Also write the network's input (after reorientation, resampling, windowing and cropping; for
    /// nnU-Net models after cropping, resampling and CT normalisation) to this volume file, on its
    /// own grid: for checking the preprocessing.
    pub save_preprocessed: Option<std::path::PathBuf>,
    /// For DICOM input with several series: the Series Instance UID to segment (default: the
    /// largest CT/MR series).
    pub series: Option<String>,
    /// On CUDA, run each block's instance norm + shortcut + LeakyReLU as one fused kernel
    /// (`model::fused`); false runs ATen's separate kernels.
    pub fused_norm: bool,
    /// [`segment_file`] only: also write `OUTPUT.json`, the manifest (lwi version, model hash,
    /// device, precision, options, timings).
    pub manifest: bool,
}

/// The mirroring switch: on or off for all three axes, or the axes to mirror.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Mirror {
    All(bool),
    Axes(Vec<i64>),
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions {
            overlap: 0.5,
            blend: Blend::Gaussian,
            sw_batch: None,
            mirror: None,
            resample: ResampleBack::Scores,
            precision: Precision::Fp32,
            slab: None,
            largest_component: false,
            max_gpu_accumulator_mb: None,
            save_preprocessed: None,
            series: None,
            fused_norm: true,
            manifest: true,
        }
    }
}

/// What every pipeline reads, resolved with the pipeline's defaults: the shared sliding window's
/// options and what follows it.
#[derive(Debug, Clone)]
pub struct Common {
    pub overlap: f64,
    pub blend: Blend,
    pub sw_batch: Option<i64>,
    /// The mirrored axes (0 = x, 1 = y, 2 = z), sorted.
    pub mirror_axes: Vec<i64>,
    pub max_gpu_accumulator_mb: Option<u64>,
    pub largest_component: bool,
    pub save_preprocessed: Option<std::path::PathBuf>,
}

impl Common {
    /// The shared window's options for a `roi` under `rules` on `device`: `sw_batch` windows per
    /// pass, else 4 on CUDA and 1 on the CPU.
    pub fn window(&self, roi: [i64; 3], rules: Rules, device: Device) -> WindowOptions {
        WindowOptions {
            roi,
            rules,
            overlap: self.overlap,
            blend: self.blend,
            batch: self
                .sw_batch
                .unwrap_or(if device.is_cuda() { 4 } else { 1 }),
            fill_last_batch: device.is_cuda(),
        }
    }

    /// The class probabilities of the shared sliding window over `image` (on the model's device)
    /// under `rules`, each window averaged over the mirrorings `mirror_axes` ask for; `dim(a)` is
    /// the dimension of `image` that holds axis a (0 = x, 1 = y, 2 = z).
    pub fn infer(
        &self,
        image: &Tensor,
        (roi, rules): ([i64; 3], Rules),
        classes: i64,
        dim: impl Fn(i64) -> i64,
        predict: &dyn Fn(&Tensor) -> Result<Tensor>,
        progress: &mut dyn Progress,
    ) -> Result<Tensor> {
        let window = self.window(roi, rules, image.device());
        let dims: Vec<i64> = self.mirror_axes.iter().map(|&a| dim(a)).collect();
        let flips = mirrorings(&dims);
        let predict = mirrored(&flips, predict);
        let cap = self.max_gpu_accumulator_mb;
        super::window::infer(image, &window, classes, cap, &predict, progress)
    }
}

/// MONAI's pipeline: no mirroring unless asked, and its way back is its own to choose.
#[derive(Debug, Clone)]
pub struct MonaiOptions {
    pub common: Common,
    pub resample: ResampleBack,
    /// Z-slices per resampling step (`slab`, else 32).
    pub slab: i64,
}

/// nnU-Net v1's pipeline: mirroring over three axes unless switched off; its way back is
/// nnU-Net's, so it has no `resample` or `slab`.
#[derive(Debug, Clone)]
pub struct NnUnetOptions {
    pub common: Common,
}

impl SegmentOptions {
    fn common(&self, mirror_by_default: bool) -> Common {
        Common {
            overlap: self.overlap,
            blend: self.blend,
            sw_batch: self.sw_batch,
            mirror_axes: self.mirror_axes(mirror_by_default),
            max_gpu_accumulator_mb: self.max_gpu_accumulator_mb,
            largest_component: self.largest_component,
            save_preprocessed: self.save_preprocessed.clone(),
        }
    }

    /// The options as MONAI's pipeline reads them.
    pub fn monai(&self) -> MonaiOptions {
        MonaiOptions {
            common: self.common(false),
            resample: self.resample,
            slab: self.slab.unwrap_or(32),
        }
    }

    /// The options as nnU-Net's pipeline reads them; INVALID_ARGUMENT naming an option given that
    /// it has no place for, and why.
    pub fn nn_unet(&self) -> Result<NnUnetOptions> {
        let cannot = [
            (
                "resample \"nearest\"",
                self.resample == ResampleBack::Nearest,
                "it resamples the class probabilities back, as nnU-Net does (\"scores\")",
            ),
            (
                "slab",
                self.slab.is_some(),
                "its way back resamples one whole class map at a time, as nnU-Net does",
            ),
        ];
        if let Some((option, _, why)) = cannot.iter().find(|(_, given, _)| *given) {
            return Err(Error::invalid(format!(
                "option {option} does not apply to this model's pipeline ({}): {why}",
                Pipeline::NnUnet.name()
            )));
        }
        Ok(NnUnetOptions {
            common: self.common(true),
        })
    }

    /// The mirrored axes (0 = x, 1 = y, 2 = z), sorted: the switch's, else all three or none.
    fn mirror_axes(&self, default: bool) -> Vec<i64> {
        let all = |on: bool| if on { vec![0, 1, 2] } else { Vec::new() };
        match &self.mirror {
            None => all(default),
            Some(Mirror::All(on)) => all(*on),
            Some(Mirror::Axes(axes)) => {
                let mut axes = axes.clone();
                axes.sort_unstable();
                axes.dedup();
                axes
            }
        }
    }

    pub fn from_json(json: &str) -> Result<SegmentOptions> {
        let o: SegmentOptions = crate::options::parse(json, "segment options")?;
        if let Some(Mirror::Axes(axes)) = &o.mirror
            && axes.iter().any(|a| !(0..3).contains(a))
        {
            return Err(Error::invalid(format!(
                "mirror (tta_axes) {axes:?}: axes are 0, 1, 2"
            )));
        }
        if let Some(slab) = o.slab
            && slab < 1
        {
            return Err(Error::invalid(format!(
                "slab must be at least 1, got {slab}"
            )));
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_batch_defaults_to_the_device() {
        let batch = |json: &str, device| {
            let o = SegmentOptions::from_json(json).unwrap().monai();
            o.common.window([96; 3], Rules::Monai, device).batch
        };
        assert_eq!(batch("", Device::Cpu), 1);
        assert_eq!(batch("", Device::Cuda(0)), 4);
        assert_eq!(batch(r#"{"sw_batch": 2}"#, Device::Cuda(0)), 2);
        assert!(SegmentOptions::from_json(r#"{"sw_batch": null}"#).is_ok());
    }

    #[test]
    fn each_pipeline_reads_its_own_typed_options_with_its_own_defaults() {
        let default = SegmentOptions::default();
        assert_eq!(default.monai().common.mirror_axes, Vec::<i64>::new());
        assert_eq!(default.monai().slab, 32);
        assert_eq!(default.nn_unet().unwrap().common.mirror_axes, [0, 1, 2]);
        for json in [r#"{"slab": 8}"#, r#"{"resample": "nearest"}"#] {
            let o = SegmentOptions::from_json(json).unwrap();
            let e = o.nn_unet().unwrap_err();
            assert!(e.message.contains("(nn_unet)"), "{}", e.message);
            o.monai();
        }
    }

    #[test]
    fn options_json_is_strict() {
        assert!(
            SegmentOptions::from_json(r#"{"overlap": 0.25, "largest_component": true}"#)
                .unwrap()
                .largest_component
        );
        assert!(
            SegmentOptions::from_json(r#"{"overlapp": 0.25}"#)
                .unwrap_err()
                .message
                .contains("overlapp")
        );
        assert!(SegmentOptions::from_json(r#"{"tta_axes": [3]}"#).is_err());
    }

    #[test]
    fn one_mirroring_switch_with_the_former_key_as_its_alias() {
        let axes = |json: &str, default: bool| {
            SegmentOptions::from_json(json)
                .unwrap()
                .mirror_axes(default)
        };
        assert_eq!(axes("", false), Vec::<i64>::new());
        assert_eq!(axes("", true), [0, 1, 2]);
        assert_eq!(axes(r#"{"tta_axes": [2, 0, 2]}"#, true), [0, 2]);
        assert_eq!(axes(r#"{"mirror": [1]}"#, true), [1]);
        assert_eq!(axes(r#"{"mirror": true}"#, false), [0, 1, 2]);
        assert_eq!(axes(r#"{"mirror": false}"#, true), Vec::<i64>::new());
        assert!(SegmentOptions::from_json(r#"{"mirror": true, "tta_axes": [0]}"#).is_err());
    }
}
