//! What a stage minimises: the pretext loss of learned initialization (stage 1) or DiceCE
//! (stage 2).

use crate::bundle::{Model, Stage};
use crate::error::{Error, Result};
use crate::model::{Network, Precision, PretextHeads, with_precision};
use crate::pretext::PretextConfig;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

pub(super) enum Objective {
    /// Depth-slab shuffling + cube masking; reconstruction + order prediction (method §1).
    Pretext {
        config: PretextConfig,
        tokens: [i64; 3],
    },
    /// Dice + cross-entropy on the labels (MONAI `DiceCELoss`).
    DiceCe,
}

impl Objective {
    pub fn for_stage(stage: Stage, pretext: &PretextConfig, tokens: [i64; 3]) -> Objective {
        match stage {
            Stage::Init => Objective::Pretext {
                config: pretext.clone(),
                tokens,
            },
            Stage::Segmentation => Objective::DiceCe,
        }
    }

    /// The loss of `model` (in training mode) on the crops `x` (labels `y`), and a note on its
    /// parts for the progress message.
    pub fn loss(
        &self,
        model: &Model,
        x: &Tensor,
        y: Option<Tensor>,
        rng: &mut ChaCha8Rng,
        precision: Precision,
        device: Device,
    ) -> Result<(Tensor, String)> {
        match self {
            Objective::Pretext { config, tokens } => {
                let batch = crate::pretext::transform(x, config, rng);
                let (Some(PretextHeads::Unetr(heads)), Network::Unetr(net)) =
                    (&model.order_heads, &model.net)
                else {
                    return Err(Error::internal("init model without UNETR order heads"));
                };
                let (total, rec, cls) = with_precision(precision, device, || {
                    let (recon, features) = net.forward_features(&batch.input, true);
                    let logits = crate::pretext::order_logits(&features, heads, config, *tokens);
                    crate::pretext::loss(&recon, &batch, &logits, config)
                })?;
                let note = format!(
                    "rec {:.4} cls {:.4}",
                    rec.double_value(&[]),
                    cls.double_value(&[])
                );
                Ok((total, note))
            }
            Objective::DiceCe => {
                let y = y.ok_or_else(|| Error::internal("segmentation batch without labels"))?;
                let loss = with_precision(precision, device, || {
                    crate::loss::dice_ce(&model.net.forward_t(x, true), &y)
                })?;
                Ok((loss, String::new()))
            }
        }
    }
}
