//! The two training stages, and the synthetic dataset they can be tried on.

use crate::args::{null, path_arg, text_arg};
use crate::handles;
use crate::model::LwiEngine;
use crate::progress::{CallbackSink, LwiProgressFn};
use crate::status::{LwiStatus, guard};
use std::ffi::{c_char, c_void};

/// Runs `train` for `stage` with a JSON configuration and a progress callback.
fn train_call(
    stage: lwi::model_file::Stage,
    engine: *const LwiEngine,
    config_json: *const c_char,
    progress: LwiProgressFn,
    user: *mut c_void,
) -> lwi::Result<()> {
    let engine = handles::borrow(engine, "engine")?;
    // SAFETY: forwarded caller contract of the two exports below.
    let json = unsafe { text_arg(config_json, "config_json", "")? };
    if json.trim().is_empty() {
        return Err(null("config_json"));
    }
    let cfg = lwi::train::TrainConfig::from_json(json)?;
    lwi::train::train(
        stage,
        &cfg,
        engine.engine.device,
        &mut CallbackSink {
            callback: progress,
            user,
        },
    )
    .map(|_| ())
}

/// Stage 1, learnable weight initialization: trains the network (`arch`: UNETR, or UNETR++) on
/// the pretext task (depth-slab shuffling + cube masking; reconstruction + order prediction) and
/// writes a model file with stage `init` and the order heads. The recipe (`"unetr"`: MONAI's;
/// `"unetr_pp"`: nnU-Net v1's) follows the architecture unless given. `config_json` holds `dataset` and `out` (required) and any of the
/// training options (docs/training.md); the engine's device is used unless `device` is given. It
/// may also be a list of such objects, merged in order (a later object's key replaces an earlier
/// one's): how a host layers its own settings over a user's config file; within one object a key
/// given twice is refused. Checkpoints go to `OUT.ckpt` every `checkpoint_every` epochs; `"resume": true` continues from
/// one. A non-zero return from `progress` stops within one iteration with `LWI_STATUS_CANCELLED`,
/// leaving the last checkpoint intact.
///
/// Data-parallel training (docs/distributed.md): under torchrun (`RANK`, `WORLD_SIZE`,
/// `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or an srun step (`SLURM_PROCID`,
/// `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`, the address from the node list) each process calling
/// this is one rank of a job over libtorch's c10d (Gloo; NCCL on CUDA). A host that starts the
/// ranks itself says so in the config: `"distributed": {"rank": R, "world_size": W,
/// "local_rank": L, "master_addr": "HOST", "master_port": P}`, with `"backend"` ("auto", "gloo",
/// "nccl"), `"timeout_s"` (a step's collectives, default 60) and `"wait_s"` (joining, validation,
/// checkpoints; default 1800); `"enabled": false` ignores the environment. `batch_size` is per
/// rank; every rank must pass the same config (its own rank, device and threads aside) or all
/// fail; rank 0 alone writes files; progress events carry `rank` (-1 for one process). A rank that
/// fails, dies or stops answering ends the others with `LWI_STATUS_IO` within `timeout_s`.
///
/// # Safety
/// `config_json` is NULL or a NUL-terminated string; `progress` may be NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_init_train(
    engine: *const LwiEngine,
    config_json: *const c_char,
    progress: LwiProgressFn,
    user: *mut c_void,
) -> LwiStatus {
    guard("lwi_init_train", || {
        train_call(
            lwi::model_file::Stage::Init,
            engine,
            config_json,
            progress,
            user,
        )
    })
}

/// Stage 2, fine-tuning for segmentation: from `init` (an init-train model: every tensor kept but
/// the output heads — UNETR's `out`, UNETR++'s `out1`…`out3` — fresh for the dataset's classes)
/// or from scratch when `init` is absent. Loss: DiceCE (monai recipe) or nnU-Net's Dice + CE over
/// the deep-supervision outputs (unetr_pp); validation Dice on the dataset's `validation` list
/// every `val_every` epochs, the best model kept as `NAME.best.safetensors`. Without `arch` the
/// architecture is `init`'s (read from its header); an `arch` that differs from it (`out_channels`
/// aside) is `LWI_STATUS_MODEL_INCOMPATIBLE` naming both, before any work. Otherwise as [`lwi_init_train`].
///
/// # Safety
/// As [`lwi_init_train`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_fine_tune(
    engine: *const LwiEngine,
    config_json: *const c_char,
    progress: LwiProgressFn,
    user: *mut c_void,
) -> LwiStatus {
    guard("lwi_fine_tune", || {
        train_call(
            lwi::model_file::Stage::Segmentation,
            engine,
            config_json,
            progress,
            user,
        )
    })
}

/// Writes a synthetic CT dataset (MSD / nnU-Net layout: `imagesTr/`, `labelsTr/`, `dataset.json`)
/// under `out_dir`. `options_json` (NULL for defaults) is an object with optional keys `cases`
/// (default 4), `seed` (0), `size` (\[96, 96, 64\]) and `spacing` (mm, per case jittered by default).
/// Same options, same bytes.
///
/// # Safety
/// `out_dir` and `options_json` are NULL or NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lwi_phantom_dataset(
    out_dir: *const c_char,
    options_json: *const c_char,
) -> LwiStatus {
    guard("lwi_phantom_dataset", || {
        // SAFETY: forwarded caller contract.
        let (dir, json) = unsafe {
            (
                path_arg(out_dir, "out_dir")?,
                text_arg(options_json, "options_json", "{}")?,
            )
        };
        let opts: lwi::phantom::PhantomOptions = lwi::options::parse(json, "options_json")?;
        lwi::phantom::write_dataset(dir, &opts).map(|_| ())
    })
}
