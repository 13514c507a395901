//! What a stage minimises: the pretext loss of learned initialization (stage 1), MONAI's DiceCE
//! (stage 2, monai recipe) or nnU-Net's Dice + CE over the deep-supervision outputs (stage 2,
//! nnunet_v1 recipe).

use super::streams::Epoch;
use super::{Recipe, TrainConfig};
use crate::distributed::Peers;
use crate::error::{Error, Result};
use crate::model::{Precision, with_precision};
use crate::model_file::{Model, Stage};
use crate::pretext::PretextConfig;
use tch::Tensor;

pub(super) enum Objective {
    /// Depth-slab shuffling (along batch axis `axis`) + cube masking; reconstruction + order
    /// prediction (method §1).
    Pretext { config: PretextConfig, axis: i64 },
    /// Dice + cross-entropy on the labels (MONAI `DiceCELoss`).
    DiceCe,
    /// nnU-Net's `MultipleOutputLoss2(DC_and_CE_loss)`: weights halving per output, normalised
    /// (4/7, 2/7, 1/7 for UNETR++'s three).
    DeepSupervision { batch_dice: bool },
}

impl Objective {
    pub fn new(stage: Stage, cfg: &TrainConfig) -> Objective {
        match (stage, cfg.recipe) {
            (Stage::Init, _) => {
                let config = cfg.pretext_task();
                // the slabs' axis of the network's input `[B, C, …]`
                let axis = 2 + config.axis.unwrap_or_default() as i64;
                Objective::Pretext { config, axis }
            }
            (Stage::Segmentation, Recipe::Monai) => Objective::DiceCe,
            (Stage::Segmentation, Recipe::NnUnetV1) => Objective::DeepSupervision {
                batch_dice: cfg.batch_dice,
            },
        }
    }

    /// The loss of `model` (in training mode) on the batch `x` (labels `y`), and a note on its
    /// parts for the progress message.
    /// Randomness comes from `streams` (a sample's from its slot's); `peers` sum nnU-Net's batch
    /// Dice totals over the global batch.
    pub fn loss(
        &self,
        model: &Model,
        (x, y): (&Tensor, Option<Tensor>),
        streams: &mut Epoch,
        peers: &Peers,
        precision: Precision,
    ) -> Result<(Tensor, String)> {
        let device = x.device();
        let labels = || y.ok_or_else(|| Error::internal("segmentation batch without labels"));
        match self {
            Objective::Pretext { config, axis } => {
                let batch = crate::pretext::transform_grouped(
                    x,
                    config,
                    *axis,
                    &mut streams.shared,
                    &mut streams.slots,
                );
                let heads = model
                    .order_heads
                    .as_ref()
                    .ok_or_else(|| Error::internal("init model without order heads"))?;
                let (total, rec, cls) = with_precision(precision, device, || {
                    let (recon, logits) = model.net.pretext(&batch.input, heads, config, true)?;
                    Ok::<_, Error>(crate::pretext::loss(&recon, &batch, &logits, config))
                })??;
                let note = format!(
                    "rec {:.4} cls {:.4}",
                    rec.double_value(&[]),
                    cls.double_value(&[])
                );
                Ok((total, note))
            }
            Objective::DiceCe => {
                let y = labels()?;
                let loss = with_precision(precision, device, || {
                    crate::loss::dice_ce(&model.net.forward_t(x, true), &y)
                })?;
                Ok((loss, String::new()))
            }
            Objective::DeepSupervision { batch_dice } => {
                let y = labels()?;
                let sum = |t: &Tensor| peers.sum_tensor("summing the batch Dice totals", t);
                let ranks = crate::loss::AcrossRanks {
                    world: f64::from(peers.world()),
                    sum: &sum,
                };
                let loss = with_precision(precision, device, || {
                    let outputs = model.net.deep_outputs(x, true);
                    let weights = deep_supervision_weights(outputs.len());
                    crate::loss::deep_supervision_across(
                        &outputs,
                        &y,
                        &weights,
                        *batch_dice,
                        &ranks,
                    )
                })??;
                Ok((loss, String::new()))
            }
        }
    }
}

/// nnU-Net's deep-supervision weights for `n` outputs: 1, ½, ¼, … normalised to sum 1.
pub fn deep_supervision_weights(n: usize) -> Vec<f64> {
    let raw: Vec<f64> = (0..n).map(|i| 0.5f64.powi(i as i32)).collect();
    let total: f64 = raw.iter().sum();
    raw.iter().map(|w| w / total).collect()
}
