//! Checkpoints: the weights, the optimizer's state and the run's history, so that a resumed run
//! continues exactly as an uninterrupted one (the random streams are keyed by epoch, and a
//! checkpoint ends an epoch). In a data-parallel job rank 0 reads it and sends it to the others.

use super::TrainConfig;
use super::optimizer::Optimizer;
use crate::distributed::Peers;
use crate::error::{Error, Result};
use crate::model::load_state_dict;
use crate::model_file::{Model, ModelMetadata};
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
    /// The global batch's slots (world size × batch_size): the random streams depend on it.
    #[serde(default)]
    pub slots: Option<u64>,
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
    crate::model_file::write_safetensors(
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
    let state: CheckpointState =
        crate::options::from_document(doc, "checkpoint state").map_err(|e| bad(e.message))?;
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut tensors = HashMap::new();
    for (name, view) in file.tensors() {
        tensors.insert(
            name,
            crate::model_file::tensor_from_view(path, &view)?.f_to_device(device)?,
        );
    }
    Ok((state, tensors))
}

/// A checkpoint read from disk, checked against the run that resumes it.
pub(super) struct Loaded {
    pub state: CheckpointState,
    tensors: HashMap<String, Tensor>,
}

/// Reads the checkpoint at `path`, refusing one written with another configuration (only
/// `epochs` may grow; `batch_size` may change with the world size when the global batch stays).
pub(super) fn read(path: &Path, cfg: &TrainConfig, slots: u64, device: Device) -> Result<Loaded> {
    let (state, tensors) = load_checkpoint(path, device)?;
    if state.slots != Some(slots) {
        return Err(Error::invalid(format!(
            "{}: written by a run whose global batch had {} samples per step; this one has {slots} \
             (world size × batch_size must stay the same to resume exactly)",
            path.display(),
            state
                .slots
                .map_or("an unrecorded number of".to_string(), |s| s.to_string())
        )));
    }
    let mut expected = state.config.clone();
    expected.resume = cfg.resume;
    expected.epochs = cfg.epochs;
    expected.out_channels_given = cfg.out_channels_given;
    expected.batch_size = cfg.batch_size;
    expected.distributed = cfg.distributed.clone();
    if expected != *cfg {
        return Err(Error::invalid(format!(
            "{}: written by a run with another configuration; resume needs the same one (epochs may grow)",
            path.display()
        )));
    }
    Ok(Loaded { state, tensors })
}

impl Loaded {
    /// Loads the weights, the optimizer's state and the history into `model` and `opt`.
    pub(super) fn apply(&self, model: &mut Model, opt: &mut Optimizer) -> Result<()> {
        let weights: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("model.")
                    .map(|n| (n.to_string(), v.shallow_clone()))
            })
            .collect();
        load_state_dict(&model.vs, &weights)?;
        opt.load_state(&self.tensors, self.state.optimizer_step);
        model.meta.provenance.history = self.state.model.provenance.history.clone();
        Ok(())
    }
}

/// Where a resumed run starts: the epoch, and the best validation metric so far.
pub(super) struct Resumed {
    pub first_epoch: u64,
    pub best: Option<f64>,
}

/// Continues from `OUT.ckpt` when the config says so (or torchrun restarted the job) and it
/// exists, and makes every rank start
/// from rank 0's weights (and optimizer state): rank 0 reads the checkpoint, the others receive
/// it, so only rank 0's machine needs it.
pub(super) fn resume(
    cfg: &TrainConfig,
    slots: u64,
    model: &mut Model,
    opt: &mut Optimizer,
    peers: &Peers,
    device: Device,
) -> Result<Option<Resumed>> {
    let path = cfg.checkpoint_path();
    // torchrun's --max-restarts starts the workers again after a failure: they resume
    let restarted = std::env::var("TORCHELASTIC_RESTART_COUNT")
        .is_ok_and(|n| n.trim().parse::<u32>().is_ok_and(|n| n > 0));
    let loaded = (peers.lead() && (cfg.resume || restarted) && path.exists())
        .then(|| read(&path, cfg, slots, device))
        .transpose()?;
    if let Some(l) = &loaded {
        l.apply(model, opt)?;
    }
    let doc = match &loaded {
        Some(l) => serde_json::to_string(&l.state).map_err(|e| Error::internal(e.to_string()))?,
        None => String::new(),
    };
    let doc = peers.broadcast_text("sending the checkpoint's state", &doc)?;
    let state: Option<CheckpointState> = match (loaded, doc.is_empty()) {
        (Some(l), _) => Some(l.state),
        (None, true) => None,
        (None, false) => Some(
            serde_json::from_str(&doc)
                .map_err(|e| Error::internal(format!("the checkpoint's state from rank 0: {e}")))?,
        ),
    };
    let mut weights: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    let mut tensors: Vec<Tensor> = weights.into_iter().map(|(_, t)| t).collect();
    if let Some(s) = &state {
        if !peers.lead() {
            opt.load_state(&HashMap::new(), s.optimizer_step);
            model.meta.provenance.history = s.model.provenance.history.clone();
        }
        tensors.extend(opt.state().into_iter().map(|(_, t)| t));
    }
    peers.broadcast("sending rank 0's weights", &tensors)?;
    Ok(state.map(|s| Resumed {
        first_epoch: s.epochs_done,
        best: s.best_metric,
    }))
}
