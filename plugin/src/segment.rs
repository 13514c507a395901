//! `segment`: a volume in, a label map out on the input's own grid.
//!
//! read → RAS → target spacing → HU window → foreground crop → sliding window (softmax) →
//! back onto the input grid → argmax. Going back resamples the class probabilities (trilinear) and
//! takes the argmax there, as nnU-Net does, so thin structures survive; `resample: "nearest"` takes
//! the argmax on the model's grid and samples labels by nearest neighbour instead.

use crate::error::{Error, ErrorKind, Result, catch_panic};
use crate::events::{Event, Progress, report};
use crate::infer::{Blend, WindowOptions, sliding_window};
use crate::model::fused::with_fused;
use crate::model::{Precision, with_precision};
use crate::model_file::{Model, Stage};
use crate::preprocess::{Grid, Interp, Prepared, prepare, sample};
use crate::volume::{DType, Volume};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

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
    /// Mirror test-time augmentation: average over flips of these axes (0 = x, 1 = y, 2 = z).
    pub tta_axes: Vec<i64>,
    pub resample: ResampleBack,
    /// fp32, or bf16/fp16 autocast on CUDA (bf16 runs as fp16 on GPUs without bfloat16).
    pub precision: Precision,
    /// Z-slices sampled per resampling step (bounds temporary memory).
    pub slab: i64,
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
    /// nnU-Net models: average each window over the 8 mirrorings (absent: on, as nnU-Net does).
    pub mirror: Option<bool>,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions {
            overlap: 0.5,
            blend: Blend::Gaussian,
            sw_batch: None,
            tta_axes: Vec::new(),
            resample: ResampleBack::Scores,
            precision: Precision::Fp32,
            slab: 32,
            largest_component: false,
            max_gpu_accumulator_mb: None,
            save_preprocessed: None,
            series: None,
            fused_norm: true,
            manifest: true,
            mirror: None,
        }
    }
}

impl SegmentOptions {
    /// Windows per forward pass on `device`: `sw_batch`, else 4 on CUDA and 1 on the CPU.
    pub fn window_batch(&self, device: Device) -> i64 {
        self.sw_batch
            .unwrap_or(if device.is_cuda() { 4 } else { 1 })
    }

    pub fn from_json(json: &str) -> Result<SegmentOptions> {
        let o: SegmentOptions = crate::options::parse(json, "segment options")?;
        if o.tta_axes.iter().any(|a| !(0..3).contains(a)) {
            return Err(Error::invalid(format!(
                "tta_axes {:?}: axes are 0, 1, 2",
                o.tta_axes
            )));
        }
        if o.slab < 1 {
            return Err(Error::invalid(format!(
                "slab must be at least 1, got {}",
                o.slab
            )));
        }
        Ok(o)
    }
}

/// How a segmentation model sees volumes: what `prepare` does and what the predictor returns.
pub struct Pipeline<'a> {
    pub preprocessing: &'a crate::model_file::Preprocessing,
    pub classes: i64,
    pub device: Device,
    /// `[B, 1, roi] → [B, classes, roi]` class probabilities.
    pub predict: &'a dyn Fn(&Tensor) -> Result<Tensor>,
}

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
    if model.meta.preprocessing.pipeline == crate::model_file::Pipeline::NnUnet {
        return catch_panic(|| segment_nnunet(model, volume, opts, &predict, progress));
    }
    let pipeline = Pipeline {
        preprocessing: &model.meta.preprocessing,
        classes: cfg.out_channels(),
        device,
        predict: &predict,
    };
    catch_panic(|| run(&pipeline, volume, opts, progress))
}

/// nnU-Net v1's inference ([`crate::nnunet`]), with the same progress stages as [`run`].
fn segment_nnunet(
    model: &Model,
    volume: &Volume,
    opts: &SegmentOptions,
    softmax: &dyn Fn(&Tensor) -> Result<Tensor>,
    progress: &mut dyn Progress,
) -> Result<Volume> {
    let pre = &model.meta.preprocessing;
    let norm = pre.ct_normalization.as_ref().ok_or_else(|| {
        Error::new(
            ErrorKind::ModelIncompatible,
            "this nnU-Net model has no CT normalisation (import it with --ct-norm P0.5,P99.5,MEAN,SD from its plans)",
        )
    })?;
    let event = Event::progress;
    report(progress, event("preprocess", 0, 1))?;
    let prepared = crate::nnunet::prepare(volume, pre.spacing, norm)?;
    let image = prepared.image.f_to_device(model.vs.device())?;
    report(progress, event("preprocess", 1, 1))?;
    let mirror = opts.mirror.unwrap_or(true);
    let probs = crate::nnunet::sliding_window(&image, pre.roi_size, mirror, progress, softmax)?;
    report(progress, event("resample", 0, 1))?;
    let labels =
        crate::nnunet::labels_back(volume, &prepared, &probs, model.meta.arch.out_channels())?;
    report(progress, event("resample", 1, 1))?;
    if let Some(path) = &opts.save_preprocessed {
        crate::io::write_volume(&prepared.to_volume(volume)?, path)?;
    }
    Ok(labels)
}

/// The segmentation pipeline around any predictor.
pub fn run(
    pipeline: &Pipeline,
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
        labels = largest_components(&labels, volume.dims())?.to_kind(kind);
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
    pipeline: &Pipeline,
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

/// Each label reduced to its largest 26-connected component (a uint32 round trip through
/// `postprocess`, which works on plain voxel values).
fn largest_components(labels: &Tensor, dims: [i64; 3]) -> Result<Tensor> {
    let bytes = DType::U32.le_bytes_from_tensor(labels)?;
    let mut values: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let size = [dims[0] as usize, dims[1] as usize, dims[2] as usize];
    crate::postprocess::keep_largest_components(&mut values, size);
    let back: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    DType::U32.tensor_from_le_bytes(&back, dims)
}

/// Waits for the GPU's queued work, so that a stage's end event marks when its work ended.
fn settle(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Passes events on and notes when each stage boundary of `run` was reached, for the manifest's
/// timings: preprocessing ends at "preprocess 1/1", inference at "resample 0/1", resampling back
/// at "resample 1/1"; what follows (connected components, the label tensor) is postprocessing.
struct StageClock<'a> {
    inner: &'a mut dyn Progress,
    start: std::time::Instant,
    marks: Vec<(&'static str, f64)>,
}

impl Progress for StageClock<'_> {
    fn report(&mut self, e: &Event) -> bool {
        let name = match (e.stage, e.done, e.total) {
            ("preprocess", 1, 1) => Some("preprocess"),
            ("resample", 0, 1) => Some("infer"),
            ("resample", 1, 1) => Some("resample"),
            _ => None,
        };
        if let Some(name) = name {
            self.marks.push((name, self.start.elapsed().as_secs_f64()));
        }
        self.inner.report(e)
    }
}

impl StageClock<'_> {
    /// Seconds spent in each stage, given the total.
    fn stages(&self, total: f64) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        let mut last = 0.0;
        for &(name, t) in &self.marks {
            out.insert(name.into(), (t - last).into());
            last = t;
        }
        out.insert("postprocess".into(), (total - last).into());
        serde_json::Value::Object(out)
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

/// Reads `input`, segments it, writes the label map to `output` (format by extension) and, unless
/// `opts.manifest` is false, `OUTPUT.json` beside it: lwi version, model hash, device, precision,
/// options and timings. Returns the manifest. Every file it writes (the preprocessed volume
/// included) appears at the end together, or, when it fails or is cancelled, none does.
pub fn segment_file(
    model: &Model,
    input: &std::path::Path,
    output: &std::path::Path,
    opts: &SegmentOptions,
    progress: &mut dyn Progress,
) -> Result<serde_json::Value> {
    crate::io::all_or_nothing(|| segment_file_staged(model, input, output, opts, progress))
}

fn segment_file_staged(
    model: &Model,
    input: &std::path::Path,
    output: &std::path::Path,
    opts: &SegmentOptions,
    progress: &mut dyn Progress,
) -> Result<serde_json::Value> {
    let t0 = std::time::Instant::now();
    let dicom_seg = crate::io::dicom_seg::is_seg_path(output);
    let (volume, source) = if dicom_seg {
        if !crate::io::dicom::is_dicom(input) {
            return Err(Error::invalid(format!(
                "{}: a DICOM SEG output needs DICOM input (it references the source images); {} is not DICOM",
                output.display(),
                input.display()
            )));
        }
        let series = crate::io::dicom::read(input, opts.series.as_deref())?;
        (series.volume, Some(series.source))
    } else {
        (
            crate::io::read_volume_series(input, opts.series.as_deref())?,
            None,
        )
    };
    let t1 = std::time::Instant::now();
    let mut clock = StageClock {
        inner: progress,
        start: t1,
        marks: Vec::new(),
    };
    let labels = segment(model, &volume, opts, &mut clock)?;
    let t2 = std::time::Instant::now();
    match &source {
        Some(source) => crate::io::dicom_seg::write(&labels, source, &model.meta.labels, output)?,
        None => crate::io::write_labels(&labels, &model.meta.labels, output)?,
    }
    let t3 = std::time::Instant::now();
    let doc = serde_json::json!({
        "lwi_version": env!("CARGO_PKG_VERSION"),
        "input": input.display().to_string(),
        "output": output.display().to_string(),
        "model_sha256": model.file_sha256,
        "model_stage": model.meta.stage,
        "arch": model.meta.arch.name(),
        "pipeline": model.meta.preprocessing.pipeline,
        "labels": model.meta.labels,
        "device": crate::engine::device_name(model.vs.device()),
        "precision": opts.precision.on(model.vs.device()),
        "options": opts,
        "timings_s": {"read": (t1 - t0).as_secs_f64(), "segment": (t2 - t1).as_secs_f64(), "write": (t3 - t2).as_secs_f64(),
            "segment_stages": clock.stages((t2 - t1).as_secs_f64())},
    });
    if opts.manifest {
        let mut name = output.as_os_str().to_owned();
        name.push(".json");
        let text =
            serde_json::to_string_pretty(&doc).map_err(|e| Error::internal(e.to_string()))?;
        crate::io::write_atomically(std::path::Path::new(&name), text.as_bytes())?;
    }
    Ok(doc)
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
}
