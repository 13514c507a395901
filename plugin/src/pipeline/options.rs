//! The options of a segmentation call: the C ABI's `options_json`, the flags of `lwi segment`.
//! Each pipeline reads them with its own defaults, and refuses by name what it cannot honour
//! ([`SegmentOptions::refuse`]): an option is never ignored.

use super::window::Blend;
use crate::error::{Error, Result};
use crate::model::Precision;
use crate::model_file::Pipeline;
use serde::{Deserialize, Serialize};
use tch::Device;

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

impl SegmentOptions {
    /// Windows per forward pass on `device`: `sw_batch`, else 4 on CUDA and 1 on the CPU.
    pub fn window_batch(&self, device: Device) -> i64 {
        self.sw_batch
            .unwrap_or(if device.is_cuda() { 4 } else { 1 })
    }

    /// The mirrored axes (0 = x, 1 = y, 2 = z), sorted: the switch's, else `default`.
    pub fn mirror_axes(&self, default: bool) -> Vec<i64> {
        match &self.mirror {
            None => {
                if default {
                    vec![0, 1, 2]
                } else {
                    Vec::new()
                }
            }
            Some(Mirror::All(on)) => {
                if *on {
                    vec![0, 1, 2]
                } else {
                    Vec::new()
                }
            }
            Some(Mirror::Axes(axes)) => {
                let mut axes = axes.clone();
                axes.sort_unstable();
                axes.dedup();
                axes
            }
        }
    }

    /// Z-slices per resampling step: `slab`, else 32.
    pub fn slab(&self) -> i64 {
        self.slab.unwrap_or(32)
    }

    /// INVALID_ARGUMENT naming each option given that `pipeline` cannot honour and why (`what`).
    pub fn refuse(&self, pipeline: Pipeline, cannot: &[(&str, bool, &str)]) -> Result<()> {
        match cannot.iter().find(|(_, given, _)| *given) {
            None => Ok(()),
            Some((option, _, why)) => Err(Error::invalid(format!(
                "option {option} does not apply to this model's pipeline ({}): {why}",
                pipeline.name()
            ))),
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
        let default = SegmentOptions::from_json("").unwrap();
        assert_eq!(default.window_batch(Device::Cpu), 1);
        assert_eq!(default.window_batch(Device::Cuda(0)), 4);
        let two = SegmentOptions::from_json(r#"{"sw_batch": 2}"#).unwrap();
        assert_eq!(two.window_batch(Device::Cuda(0)), 2);
        assert!(SegmentOptions::from_json(r#"{"sw_batch": null}"#).is_ok());
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
        let axes = |json: &str, default| {
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
