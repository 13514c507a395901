//! Engines (where work runs) and models (model files loaded onto an engine's device), import of
//! PyTorch checkpoints, and the raw forward pass.

use crate::args::{free_handle, hand_over, path_arg, text_arg};
use crate::handles;
use crate::status::{LwiStatus, guard, quiet};
use std::ffi::{CString, c_char};
use std::sync::OnceLock;

/// Where work runs (device, CPU threads). Create with [`lwi_engine_create`], free with
/// [`lwi_engine_free`]. Models loaded through an engine live on its device.
pub struct LwiEngine {
    pub(crate) engine: lwi::engine::Engine,
}

/// A model loaded from a model file. Create with [`lwi_model_load`], free with [`lwi_model_free`].
/// Segmenting reads the model only: several threads may segment with one model at once (tested
/// with two threads, shared and separate models). Freeing it while a call on another thread still
/// uses it is safe: that call keeps the model until it returns.
pub struct LwiModel {
    pub(crate) model: lwi::model_file::Model,
    /// `lwi_model_info_json`'s text, made on first request and owned by the model.
    info: OnceLock<CString>,
}

// SAFETY: hosts may use one handle from several threads (the C ABI allows it). Every call only
// reads a handle's tensors and modules, and libtorch supports concurrent reads of a tensor; the one
// lazily written field, `LwiModel::info`, is a `OnceLock`.
unsafe impl Sync for LwiEngine {}
unsafe impl Sync for LwiModel {}

/// Creates an engine. `options_json` (NULL or "" for defaults) may hold `device` (`"auto"` — the
/// first GPU if any, else the CPU —, `"cpu"` or `"cuda:N"`) and `threads` (libtorch's CPU thread
/// pool, per process). A GPU that is not there is `LWI_STATUS_DEVICE_UNAVAILABLE`.
///
/// # Safety
/// `options_json` is NULL or a NUL-terminated string; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_engine_create(
    options_json: *const c_char,
    out: *mut *mut LwiEngine,
) -> LwiStatus {
    guard("lwi_engine_create", || {
        let create = || {
            // SAFETY: forwarded caller contract.
            let json = unsafe { text_arg(options_json, "options_json", "")? };
            let engine = lwi::engine::Engine::from_json(json)?;
            Ok(handles::hand_out(LwiEngine { engine }))
        };
        // SAFETY: forwarded caller contract.
        unsafe { hand_over(out, "out", create) }
    })
}

/// Frees an engine. NULL is a no-op. Models loaded through it stay valid.
///
/// A pointer that is not a live engine is left alone. Never changes [`lwi_last_error`].
#[unsafe(no_mangle)]
pub extern "C" fn lwi_engine_free(engine: *mut LwiEngine) {
    free_handle(engine, "engine");
}

/// Loads a model file onto the engine's device. The file's metadata decides the architecture;
/// every tensor must then be present with its exact shape, and no other: a missing, extra or
/// misshapen tensor is `LWI_STATUS_MODEL_INCOMPATIBLE` naming it. A file that is not a model file
/// is `LWI_STATUS_FORMAT`.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_model_load(
    engine: *const LwiEngine,
    path: *const c_char,
    out: *mut *mut LwiModel,
) -> LwiStatus {
    guard("lwi_model_load", || {
        let load = || {
            let engine = handles::borrow(engine, "engine")?;
            // SAFETY: forwarded caller contract.
            let path = unsafe { path_arg(path, "path")? };
            let model = lwi::model_file::Model::load(path, engine.engine.device)?;
            Ok(handles::hand_out(LwiModel {
                model,
                info: OnceLock::new(),
            }))
        };
        // SAFETY: forwarded caller contract.
        unsafe { hand_over(out, "out", load) }
    })
}

/// A JSON object describing the model: `arch` ("unetr" or "unetr_pp"), `config` (the
/// architecture's keyword arguments, docs/models.md), `labels`
/// (value → name), `preprocessing`, `stage`, `provenance`, `parameters`, `device`. Owned by the
/// model, valid until [`lwi_model_free`]. NULL if `model` is NULL or not a live model. A getter: it
/// never changes [`lwi_last_error`].
#[unsafe(no_mangle)]
pub extern "C" fn lwi_model_info_json(model: *const LwiModel) -> *const c_char {
    quiet(std::ptr::null(), || {
        let m = handles::borrow(model, "model")?;
        Ok(m.info
            .get_or_init(|| CString::new(m.model.info_json().to_string()).unwrap_or_default())
            .as_ptr())
    })
}

/// Frees a model. NULL is a no-op.
///
/// A pointer that is not a live model is left alone; never changes [`lwi_last_error`]. A call still
/// using the model on another thread keeps it until that call returns.
#[unsafe(no_mangle)]
pub extern "C" fn lwi_model_free(model: *mut LwiModel) {
    free_handle(model, "model");
}

/// Converts a PyTorch checkpoint into an lwi model file at `out_path`: UNETR (`.pt`; MONAI 1.6.1 or
/// LWI-VMS key layout, plain or under `state_dict`) or UNETR++ (an nnU-Net v1 checkpoint such as
/// `model_final_checkpoint.model`, or a plain state dict; tied `F.*` accepted only when equal to
/// `E.*`). The pickle is parsed without executing anything. `options_json` holds `arch` ("unetr"
/// or "unetr_pp"), `arch_config` (the upstream constructor's keyword arguments), `labels`
/// (`{"0": "background", …}`), and optionally `spacing` (mm, default \[1.5, 1.5, 2.0\]; per stored
/// voxel axis for UNETR++) and `window` (HU, default \[-175, 250\]); for UNETR++ also `plans` (the
/// checkpoint's nnU-Net plans pickle: spacing, patch check, CT normalisation) or
/// `ct_normalization` (\[percentile_00_5, percentile_99_5, mean, sd\]). docs/models.md.
///
/// # Safety
/// Each argument is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_model_import(
    checkpoint_path: *const c_char,
    options_json: *const c_char,
    out_path: *const c_char,
) -> LwiStatus {
    guard("lwi_model_import", || {
        // SAFETY: forwarded caller contract.
        let (src, json, dst) = unsafe {
            (
                path_arg(checkpoint_path, "checkpoint_path")?,
                text_arg(options_json, "options_json", "")?,
                path_arg(out_path, "out_path")?,
            )
        };
        lwi::model_file::import::import(src, json)?.save(dst)
    })
}

/// Runs the raw network on a tensor (no preprocessing): `in_path` is a safetensors file holding `x`
/// `[B, C, D, H, W]` (float, the network's channels and `img_size`); every output is written to the
/// safetensors file `out_path` under its name — `logits` (UNETR), `out1`, `out2`, `out3` (UNETR++,
/// deep supervision included), `recon` and `t1`…`t4` for an init-train model — through a temporary
/// name. `options_json` is NULL or `{}` (reserved).
///
/// # Safety
/// The strings are NULL or NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_forward(
    model: *const LwiModel,
    in_path: *const c_char,
    out_path: *const c_char,
    options_json: *const c_char,
) -> LwiStatus {
    guard("lwi_forward", || {
        let m = handles::borrow(model, "model")?;
        // SAFETY: forwarded caller contract.
        let (src, dst, json) = unsafe {
            (
                path_arg(in_path, "in_path")?,
                path_arg(out_path, "out_path")?,
                text_arg(options_json, "options_json", "")?,
            )
        };
        lwi::options::parse::<lwi::forward::ForwardOptions>(json, "options_json")?;
        lwi::forward::forward_file(&m.model, src, dst).map(|_| ())
    })
}
