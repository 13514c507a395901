//! Segmentation of a lent volume or a file, and scoring a prediction against a reference.

use crate::args::{null, path_arg, string_out, text_arg};
use crate::handles;
use crate::model::LwiModel;
use crate::progress::{CallbackSink, LwiProgressFn};
use crate::status::{LwiStatus, guard};
use crate::volume::{LwiVolume, dtype_of, volume_arg};
use lwi::Error;
use std::ffi::{c_char, c_void};

/// Segments a volume lent by the host into `out_labels`, a caller-allocated buffer of the input's
/// dims in `out_dtype` (`LWI_DTYPE_UINT8` or `LWI_DTYPE_UINT16`; `out_bytes` must be exactly its
/// size), x fastest, on the input's own grid. `options_json` (NULL for defaults): `overlap` (0.5),
/// `blend` ("gaussian" | "constant"), `sw_batch` (1 on the CPU, 4 on CUDA), `mirror` (true, false or
/// the axes \[0, 1, 2\] to mirror each window over; `tta_axes` is its former name; default: none for
/// MONAI's pipeline, all three for nnU-Net's), `resample` ("scores" | "nearest"), `precision`
/// ("fp32" default; "bf16": autocast on CUDA, or on a CPU with AVX512-BF16 or AMX-BF16,
/// INVALID_ARGUMENT on one without; "fp16": CUDA only; "auto": bf16 where the device computes it
/// natively, else fp32), `slab` (32), `largest_component` (false),
/// `max_gpu_accumulator_mb` (none: the sums stay on the GPU, and move to the CPU with a warning
/// event only on out-of-memory), `save_preprocessed` (a path), `fused_norm` (true: on CUDA, lwi's
/// fused normalisation kernel; false: ATen's kernels). Every option applies to both pipelines
/// except `resample: "nearest"` and `slab` (MONAI's only): given to a model of nnU-Net's pipeline
/// (UNETR++) they are `LWI_STATUS_INVALID_ARGUMENT`, naming the option and the pipeline
/// (docs/segmentation.md).
/// `progress` may be NULL. The library keeps no pointer after returning.
///
/// # Safety
/// `volume` is NULL or valid as documented on `LwiVolume`; `out_labels`
/// is NULL or holds `out_bytes` writable bytes; `options_json` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_segment(
    model: *const LwiModel,
    volume: *const LwiVolume,
    out_labels: *mut c_void,
    out_dtype: i32,
    out_bytes: usize,
    options_json: *const c_char,
    progress: LwiProgressFn,
    user: *mut c_void,
) -> LwiStatus {
    guard("lwi_segment", || {
        let m = handles::borrow(model, "model")?;
        // SAFETY: forwarded caller contract.
        let (input, json) = unsafe {
            (
                volume_arg(volume)?,
                text_arg(options_json, "options_json", "")?,
            )
        };
        let out_type = dtype_of(out_dtype)?;
        lwi::pipeline::check_label_type(&m.model, out_type)?;
        let need = out_type.byte_size(input.dims())?;
        if out_labels.is_null() {
            return Err(null("out_labels"));
        }
        if out_bytes != need {
            return Err(Error::invalid(format!(
                "out_bytes is {out_bytes}; the labels need exactly {need}"
            )));
        }
        let opts = lwi::pipeline::SegmentOptions::from_json(json)?;
        let labels = lwi::pipeline::segment(
            &m.model,
            &input,
            &opts,
            &mut CallbackSink {
                callback: progress,
                user,
            },
        )?;
        let bytes = out_type.le_bytes_from_tensor(&labels.data)?;
        // SAFETY: `out_labels` has `out_bytes` == bytes.len() writable bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), out_labels.cast::<u8>(), bytes.len())
        };
        Ok(())
    })
}

/// Segments the volume file `in_path` (`.nii`, `.nii.gz`, `.nrrd`, `.nhdr`, or DICOM: a folder, a
/// DICOMDIR or a `.dcm` file; `"series"` in the options picks a series) into the label file
/// `out_path` (format by extension; `.dcm` writes a DICOM Segmentation referencing a DICOM input)
/// on the input's grid, written through a temporary name, plus
/// `OUT_PATH.json` (lwi version, model hash, device, precision, options, timings) unless
/// `options_json` has `"manifest": false`. Other options as [`lwi_segment`].
///
/// # Safety
/// The strings are NULL or NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_segment_file(
    model: *const LwiModel,
    in_path: *const c_char,
    out_path: *const c_char,
    options_json: *const c_char,
    progress: LwiProgressFn,
    user: *mut c_void,
) -> LwiStatus {
    guard("lwi_segment_file", || {
        let m = handles::borrow(model, "model")?;
        // SAFETY: forwarded caller contract.
        let (src, dst, json) = unsafe {
            (
                path_arg(in_path, "in_path")?,
                path_arg(out_path, "out_path")?,
                text_arg(options_json, "options_json", "")?,
            )
        };
        let opts = lwi::pipeline::SegmentOptions::from_json(json)?;
        lwi::pipeline::segment_file(
            &m.model,
            src,
            dst,
            &opts,
            &mut CallbackSink {
                callback: progress,
                user,
            },
        )
        .map(|_| ())
    })
}

/// Scores a prediction against a reference: two label files on the same grid, or two folders
/// whose files are matched by name. `options_json` (NULL for defaults) may hold `labels` (a list of
/// label values; default: every non-zero label present). On success `*out_json` receives the report
/// (per-case, per-label `dice` and `hd95` in mm, per-label means, `synapse_8_mean`); free it with
/// [`lwi_string_free`].
///
/// # Safety
/// The strings are NULL or NUL-terminated; `out_json` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_evaluate(
    pred_path: *const c_char,
    ref_path: *const c_char,
    options_json: *const c_char,
    out_json: *mut *mut c_char,
) -> LwiStatus {
    guard("lwi_evaluate", || {
        let report = || {
            // SAFETY: forwarded caller contract.
            let (pred, reference, json) = unsafe {
                (
                    path_arg(pred_path, "pred_path")?,
                    path_arg(ref_path, "ref_path")?,
                    text_arg(options_json, "options_json", "{}")?,
                )
            };
            let opts: lwi::metrics::EvaluateOptions = lwi::options::parse(json, "options_json")?;
            Ok(lwi::metrics::evaluate(pred, reference, opts.labels.as_deref())?.to_string())
        };
        // SAFETY: forwarded caller contract.
        unsafe { string_out(out_json, report) }
    })
}
