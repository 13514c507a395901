//! Checkpoints: the weights, the optimizer's state, the RNG position and the run's history, so that
//! a resumed run continues exactly as an uninterrupted one.

use super::TrainConfig;
use super::optimizer::Optimizer;
use crate::bundle::{Model, ModelMetadata};
use crate::error::{Error, Result};
use crate::model::load_state_dict;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Tensor};

/// What a checkpoint remembers besides tensors.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CheckpointState {
    pub epochs_done: u64,
    /// Optimizer steps taken (AdamW's bias correction).
    #[serde(alias = "adam_step")]
    pub optimizer_step: u64,
    pub rng_word_pos: String,
    pub best_metric: Option<f64>,
    pub config: TrainConfig,
    pub model: ModelMetadata,
}

pub(super) fn save_checkpoint(
    path: &Path,
    model: &Model,
    opt: &Optimizer,
    state: &CheckpointState,
) -> Result<()> {
    let mut named: Vec<(String, Tensor)> = model
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| (format!("model.{n}"), t))
        .collect();
    named.extend(opt.state());
    let doc = serde_json::to_string(state).map_err(|e| Error::internal(e.to_string()))?;
    crate::bundle::write_safetensors(
        path,
        named,
        HashMap::from([("lwi_checkpoint".to_string(), doc)]),
    )
}

fn load_checkpoint(
    path: &Path,
    device: Device,
) -> Result<(CheckpointState, HashMap<String, Tensor>)> {
    let bytes = crate::io::read_regular(path)?;
    let bad = |m: String| Error::format(path, format!("not a usable checkpoint ({m})"));
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let doc = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("lwi_checkpoint"))
        .ok_or_else(|| bad("no lwi_checkpoint metadata".into()))?;
    let state: CheckpointState = serde_json::from_str(doc).map_err(|e| bad(e.to_string()))?;
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut tensors = HashMap::new();
    for (name, view) in file.tensors() {
        tensors.insert(
            name,
            crate::bundle::tensor_from_view(path, &view)?.f_to_device(device)?,
        );
    }
    Ok((state, tensors))
}

/// Where a resumed run starts: the epoch, and the best validation metric so far.
pub(super) struct Resumed {
    pub first_epoch: u64,
    pub best: Option<f64>,
}

/// Loads the checkpoint at `path` into `model`, `opt` and `rng`, refusing one written with another
/// configuration (only `epochs` may grow).
pub(super) fn resume(
    path: &Path,
    cfg: &TrainConfig,
    model: &mut Model,
    opt: &mut Optimizer,
    rng: &mut ChaCha8Rng,
    device: Device,
) -> Result<Resumed> {
    let (state, tensors) = load_checkpoint(path, device)?;
    let mut expected = state.config.clone();
    expected.resume = cfg.resume;
    expected.epochs = cfg.epochs;
    expected.out_channels_given = cfg.out_channels_given;
    if expected != *cfg {
        return Err(Error::invalid(format!(
            "{}: written by a run with another configuration; resume needs the same one (epochs may grow)",
            path.display()
        )));
    }
    let weights: HashMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("model.")
                .map(|n| (n.to_string(), v.shallow_clone()))
        })
        .collect();
    load_state_dict(&model.vs, &weights)?;
    opt.load_state(&tensors, state.optimizer_step);
    rng.set_word_pos(
        state
            .rng_word_pos
            .parse::<u128>()
            .map_err(|_| Error::format(path, "bad RNG position"))?,
    );
    model.meta.provenance.history = state.model.provenance.history.clone();
    Ok(Resumed {
        first_epoch: state.epochs_done,
        best: state.best_metric,
    })
}
