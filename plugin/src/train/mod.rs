//! The training engine shared by init-train (stage 1, self-supervised) and fine-tune (stage 2): a
//! short driver ([`train_with`]) over parts that each do one thing — the config and its recipes
//! ([`config`]), the batch sources (MONAI-style crops in [`batches`]; nnU-Net's patches in
//! [`patches`], with its [`fingerprint`](crate::pipeline::nnunet::fingerprint) and [`nnunet_augment`]), the objective ([`objective`]),
//! the optimizer ([`optimizer`]) and its schedule ([`schedule`]), the gradient seam
//! ([`gradients`]), the random streams ([`streams`]), checkpoints that resume exactly
//! ([`checkpoint`]), validation ([`validate`]) and the transfer from stage 1 to stage 2
//! ([`transfer`]). Under a launcher (torchrun, srun) the same driver runs on every rank of a
//! data-parallel job ([`crate::distributed`]): rank 0's weights to all, each rank its slots of the global
//! batch, gradients averaged, rank 0 alone writing files.

mod batches;
mod cache;
mod checkpoint;
mod config;
pub mod gradients;
pub mod nnunet_augment;
mod objective;
mod optimizer;
mod patches;
mod schedule;
mod source;
mod streams;
mod transfer;
mod validate;

pub use config::{Augment, OptimizerKind, Recipe, ScheduleKind, TrainConfig};
pub use gradients::{GradientSync, Local};
pub use nnunet_augment::NnUnetAugment;
pub use objective::deep_supervision_weights;
pub use optimizer::{AdamW, Optimizer, Sgd, clip_grad_norm};
pub use schedule::{learning_rate, poly};

use crate::dataset::DatasetFile;
use crate::distributed::Peers;
use crate::engine::{Engine, EngineOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::events::{Event, Progress, report};
use crate::model::Precision;
use crate::model_file::{EpochRecord, Model, ModelMetadata, Stage};
use objective::Objective;
use rand::Rng;
use source::{Source, Store};
use std::collections::BTreeMap;
use tch::Device;

/// Runs init-train (`stage` Init) or fine-tune (`stage` Segmentation) as `cfg` says, on `device`
/// unless the config names one; writes the model file(s) and returns the final model. Under a
/// launcher this process is one rank of a data-parallel job.
pub fn train(
    stage: Stage,
    cfg: &TrainConfig,
    device: Device,
    progress: &mut dyn Progress,
) -> Result<Model> {
    train_with(stage, cfg, device, progress, None)
}

/// [`train`], with `gradients` acting between each backward pass and optimizer step (absent:
/// averaged over the ranks of a data-parallel job).
pub fn train_with(
    stage: Stage,
    cfg: &TrainConfig,
    device: Device,
    progress: &mut dyn Progress,
    gradients: Option<&mut dyn GradientSync>,
) -> Result<Model> {
    // A libtorch failure inside tch's infallible operations (out of memory among them) is an
    // error of this call, not a panic.
    let mut gradients = gradients;
    crate::error::catch_panic(|| {
        let device = run_device(cfg, device)?;
        let pinned = cfg.device.as_deref().is_some_and(|d| d.contains(':'));
        let (peers, device) = Peers::join(&cfg.distributed, device, pinned)?;
        let mut progress = RankProgress {
            inner: progress,
            rank: (peers.world() > 1).then(|| peers.rank()),
        };
        peers.agree("training config", &cfg.digest())?;
        let mut run = Run::start(stage, cfg, device, peers, &mut progress)?;
        for epoch in run.first_epoch..cfg.epochs {
            let loss = run.train_epoch(epoch, &mut progress, &mut gradients)?;
            run.finish_epoch(epoch, loss, &mut progress)?;
        }
        if run.peers.lead() {
            run.model.save(&cfg.out)?;
        }
        run.peers.barrier("finishing the run")?;
        Ok(run.model)
    })
}

/// A rank's progress sink: its events carry its rank in a data-parallel job.
struct RankProgress<'a> {
    inner: &'a mut dyn Progress,
    rank: Option<u32>,
}

impl Progress for RankProgress<'_> {
    fn report(&mut self, e: &Event) -> bool {
        match self.rank {
            None => self.inner.report(e),
            Some(rank) => self.inner.report(&Event {
                rank: Some(rank),
                ..e.clone()
            }),
        }
    }
}

/// One training run's state.
struct Run<'a> {
    stage: Stage,
    cfg: &'a TrainConfig,
    device: Device,
    dataset: DatasetFile,
    model: Model,
    opt: Optimizer,
    peers: Peers,
    objective: Objective,
    source: Source,
    precision: Precision,
    first_epoch: u64,
    best: Option<f64>,
}

impl<'a> Run<'a> {
    /// Everything before the first epoch: the device, the dataset, the model (seeded, from stage
    /// 1's weights, or from a checkpoint), the optimizer and the prepared cases.
    fn start(
        stage: Stage,
        cfg: &'a TrainConfig,
        device: Device,
        peers: Peers,
        progress: &mut dyn Progress,
    ) -> Result<Run<'a>> {
        // Decided before any work: a pretext task that cannot split this roi is refused at once.
        if stage == Stage::Init {
            let task = cfg.pretext_task();
            let depth = task.axis.unwrap_or_default();
            task.validate(cfg.arch.img_size(), cfg.arch.slab_tokens(), depth)
                .map_err(|e| {
                    Error::invalid(format!(
                        "training config: {} (the {} recipe shuffles slabs along the network's axis \
                         {depth}, its pipeline's depth)",
                        e.message,
                        cfg.recipe.name()
                    ))
                })?;
        }
        let dataset = DatasetFile::read(&cfg.dataset)?;
        // the labels go into the model file: bounded as it bounds them, before any case is prepared
        let what = format!("{}: labels", cfg.dataset.display());
        crate::model_file::check_labels(&what, &dataset.labels)?;
        let classes = stage_classes(stage, cfg, &dataset)?;
        let store = Store::open(cfg, &dataset)?;
        let pre = source::preprocessing(cfg, &dataset, &store, progress)?;
        let mut arch = cfg.arch.clone();
        if arch.out_channels() != classes && cfg.out_channels_given && stage == Stage::Segmentation
        {
            let message = format!(
                "warning: out_channels {} overridden by the stage: {classes}",
                arch.out_channels()
            );
            report(
                progress,
                Event {
                    stage: "setup",
                    message,
                    ..Default::default()
                },
            )?;
        }
        arch.set_out_channels(classes);
        let labels: BTreeMap<u32, String> = match stage {
            Stage::Init => BTreeMap::new(),
            Stage::Segmentation => dataset.labels.clone(),
        };
        let mut meta = ModelMetadata::new(arch.clone(), labels, pre.clone(), stage);
        meta.order_classes = (stage == Stage::Init).then_some(cfg.pretext.slabs);
        meta.provenance.seed = Some(cfg.seed);
        meta.provenance.epochs = Some(cfg.epochs);
        meta.provenance.dataset_fingerprint = Some(dataset.fingerprint());

        tch::manual_seed(cfg.seed as i64);
        let mut model = Model::new(meta, device)?;
        if let (Stage::Segmentation, Some(init)) = (stage, &cfg.init) {
            model.meta.provenance.history.init =
                transfer::transfer_from_init(&model, init, device)?;
        }
        let mut opt = match cfg.optimizer {
            OptimizerKind::Adamw => Optimizer::AdamW(AdamW::new(&model.vs, cfg.weight_decay)),
            OptimizerKind::Sgd => Optimizer::Sgd(Sgd::new(
                &model.vs,
                cfg.momentum,
                cfg.nesterov,
                cfg.weight_decay,
            )),
        };
        let slots = slots(cfg, &peers);
        let resumed = checkpoint::resume(cfg, slots, &mut model, &mut opt, &peers, device)?;
        let (first_epoch, best) = resumed.map_or((0, None), |r| (r.first_epoch, r.best));
        // Label values are checked against the classes when fine-tuning (init-train ignores them).
        let label_classes = (stage == Stage::Segmentation).then_some(classes as u32);
        let source = Source::prepare(cfg, &dataset, &pre, label_classes, &store, progress)?;
        // bf16 needs no loss scaling; on GPUs without it (before Ampere) training runs fp32 rather
        // than fp16 without a scaler.
        let precision = if cfg.amp && crate::model::precision::bf16_supported(device) {
            Precision::Bf16
        } else {
            Precision::Fp32
        };
        Ok(Run {
            stage,
            cfg,
            device,
            dataset,
            model,
            opt,
            peers,
            objective: Objective::new(stage, cfg),
            source,
            precision,
            first_epoch,
            best,
        })
    }

    /// One epoch: each step this rank's slots of the global batch, a backward pass, the
    /// gradients made the global batch's, an optimizer step; returns the mean loss.
    fn train_epoch(
        &mut self,
        epoch: u64,
        progress: &mut dyn Progress,
        gradients: &mut Option<&mut dyn GradientSync>,
    ) -> Result<f64> {
        let cfg = self.cfg;
        let lr = schedule::rate(cfg, self.stage, epoch);
        let slots = slots(cfg, &self.peers);
        let mine = streams::local_slots(slots, self.peers.rank(), self.peers.world());
        let mut streams = streams::Epoch::new(cfg.seed, epoch, mine.clone());
        let plan = self.source.plan(cfg, slots as usize, &mut streams.shared);
        let steps = plan.steps as u64;
        let mut epoch_loss = 0.0;
        for step in 0..plan.steps {
            let (l, parts) = self.step(&plan, step, mine.clone(), &mut streams, gradients, lr)?;
            if !l.is_finite() {
                return Err(Error::invalid(format!(
                    "training diverged: the loss became {l} at epoch {} iteration {} (lr {lr:e}): \
                     lower \"lr\"",
                    epoch + 1,
                    step + 1
                )));
            }
            epoch_loss += l;
            let event = Event {
                stage: "train",
                done: epoch * steps + step as u64 + 1,
                total: cfg.epochs * steps,
                epoch: Some(epoch),
                loss: Some(l),
                message: format!("lr {lr:.3e} {parts}"),
                ..Default::default()
            };
            self.report_together(progress, event)?;
        }
        Ok(epoch_loss / steps as f64)
    }

    /// One optimizer step on this rank's slots `mine` of step `step`'s global batch; returns the
    /// loss averaged over the ranks (the step is not taken when it is not finite) and the
    /// objective's note.
    fn step(
        &mut self,
        plan: &source::Plan,
        step: usize,
        mine: std::ops::Range<u64>,
        streams: &mut streams::Epoch,
        gradients: &mut Option<&mut dyn GradientSync>,
        lr: f64,
    ) -> Result<(f64, String)> {
        let cfg = self.cfg;
        // dropout draws from libtorch's generator: seeded per step (and rank), so that a resumed
        // run draws what an uninterrupted one does
        let dropout_seed = (streams.shared.random::<u64>() >> 1) + u64::from(self.peers.rank());
        tch::manual_seed(dropout_seed as i64);
        let (x, y) = self
            .source
            .batch(plan, step, mine, &mut streams.slots, cfg, self.device)?;
        // `"dropout": false`: the network's dropout off, the rest of training mode kept
        let (loss, parts) = crate::model::dropout::without(!cfg.dropout, || {
            let batch = (&x, y);
            self.objective
                .loss(&self.model, batch, streams, &self.peers, self.precision)
        })?;
        self.opt.zero_grad();
        loss.f_backward()?;
        match gradients {
            Some(g) => g.synchronize(self.opt.params())?,
            None => self.peers.average_gradients(self.opt.params())?,
        }
        let local = loss.double_value(&[]);
        let l = self.peers.sum("averaging the loss", &[local], false)?[0]
            / f64::from(self.peers.world());
        if l.is_finite() {
            if let Some(max) = cfg.grad_clip {
                clip_grad_norm(self.opt.params(), max);
            }
            self.opt.step(lr);
        }
        Ok((l, parts))
    }

    /// Reports `event`; a cancel on any rank stops every rank here.
    fn report_together(&self, progress: &mut dyn Progress, event: Event) -> Result<()> {
        let stage = event.stage;
        let cancelled = !progress.report(&event);
        let ranks = self
            .peers
            .flagged("checking the other ranks for a cancel", cancelled)?;
        if ranks.is_empty() {
            return Ok(());
        }
        let by = if self.peers.world() == 1 {
            "the caller".to_string()
        } else {
            format!("the caller of rank(s) {ranks:?}")
        };
        Err(Error::new(
            ErrorKind::Cancelled,
            format!("cancelled by {by} during {stage}"),
        ))
    }

    /// After an epoch: validation when due (and the best model), the history, the checkpoint,
    /// then the "epoch" event (so that it means its checkpoint is on disk).
    fn finish_epoch(&mut self, epoch: u64, loss: f64, progress: &mut dyn Progress) -> Result<()> {
        let cfg = self.cfg;
        let done = epoch + 1;
        let (mut metric, mut save_best) = (None, false);
        if self.stage == Stage::Segmentation
            && !self.dataset.validation.is_empty()
            && (done % cfg.val_every == 0 || done == cfg.epochs)
        {
            let only = cfg.val_labels.as_deref();
            let (model, dataset) = (&self.model, &self.dataset);
            let dice =
                validate::validate_and_report(model, dataset, only, epoch, &self.peers, progress)?;
            metric = Some(dice);
            if self.best.is_none_or(|b| dice > b) {
                self.best = Some(dice);
                save_best = true;
            }
        }
        let record = EpochRecord {
            epoch: done,
            loss,
            metric,
        };
        let history = &mut self.model.meta.provenance.history;
        match self.stage {
            Stage::Init => history.init.push(record),
            Stage::Segmentation => history.fine_tune.push(record),
        }
        let lead = self.peers.lead();
        if save_best && lead {
            self.model
                .save(&cfg.out.with_extension("best.safetensors"))?;
        }
        if (done % cfg.checkpoint_every == 0 || done == cfg.epochs) && lead {
            let state = checkpoint::CheckpointState {
                epochs_done: done,
                optimizer_step: self.opt.steps(),
                slots: Some(slots(cfg, &self.peers)),
                best_metric: self.best,
                config: cfg.clone(),
                model: self.model.meta.clone(),
            };
            checkpoint::save_checkpoint(&cfg.checkpoint_path(), &self.model, &self.opt, &state)?;
        }
        // the others wait here while rank 0 writes, not in a step's (shorter) collective
        self.peers.barrier("waiting for rank 0's checkpoint")?;
        let event = Event {
            stage: "epoch",
            done,
            total: cfg.epochs,
            epoch: Some(epoch),
            loss: Some(loss),
            metric,
            ..Default::default()
        };
        self.report_together(progress, event)
    }
}

/// The global batch's slots: `batch_size` per rank.
fn slots(cfg: &TrainConfig, peers: &Peers) -> u64 {
    u64::from(peers.world()) * cfg.batch_size as u64
}

/// The config's device and threads when it names them, else `device`.
fn run_device(cfg: &TrainConfig, device: Device) -> Result<Device> {
    if cfg.device.is_none() && cfg.threads.is_none() {
        return Ok(device);
    }
    let options = EngineOptions {
        device: cfg
            .device
            .clone()
            .unwrap_or_else(|| crate::engine::device_name(device)),
        threads: cfg.threads,
    };
    Ok(Engine::new(&options)?.device)
}

/// Output channels come from the stage: one reconstruction channel, or one per label value.
fn stage_classes(stage: Stage, cfg: &TrainConfig, ds: &DatasetFile) -> Result<i64> {
    if stage == Stage::Init {
        return Ok(1);
    }
    if ds.training.iter().any(|e| e.label.is_none()) {
        return Err(Error::invalid(format!(
            "{}: fine-tune needs a label for every training case",
            cfg.dataset.display()
        )));
    }
    if let Some(l) = cfg
        .val_labels
        .iter()
        .flatten()
        .find(|l| !ds.labels.contains_key(l))
    {
        return Err(Error::invalid(format!(
            "training config: val_labels: {l} is not one of the labels of {} ({:?})",
            cfg.dataset.display(),
            ds.labels.keys().collect::<Vec<_>>()
        )));
    }
    let largest = ds.labels.keys().max().copied().ok_or_else(|| {
        Error::invalid(format!(
            "{}: fine-tune needs the \"labels\" map (value → name) to know the classes",
            cfg.dataset.display()
        ))
    })?;
    Ok(i64::from(largest) + 1)
}
