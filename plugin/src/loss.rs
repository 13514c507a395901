//! Losses: MONAI's `DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0,
//! smooth_dr=1e-6)` for segmentation.

use crate::error::Result;
use tch::{Kind, Tensor};

/// Dice + cross-entropy. `logits` `[B, C, …]`, `labels` `[B, 1, …]` integer class values.
/// Dice per sample and channel (background included), `1 − 2Σpg / (Σp² + Σg² + 1e-6)`, averaged
/// over B×C; cross-entropy averaged over voxels; the two added.
pub fn dice_ce(logits: &Tensor, labels: &Tensor) -> Tensor {
    let classes = logits.size()[1];
    let logits = logits.to_kind(Kind::Float);
    let target = labels.squeeze_dim(1).to_kind(Kind::Int64);
    let probs = logits.softmax(1, Kind::Float);
    let spatial: Vec<i64> = (2..logits.dim() as i64).collect();
    let onehot = target
        .one_hot(classes)
        .permute(permutation_to_channels_first(logits.dim()))
        .to_kind(Kind::Float);
    let intersection = (&probs * &onehot).sum_dim_intlist(spatial.as_slice(), false, Kind::Float);
    let denominator = probs
        .square()
        .sum_dim_intlist(spatial.as_slice(), false, Kind::Float)
        + onehot
            .square()
            .sum_dim_intlist(spatial.as_slice(), false, Kind::Float);
    let ratio: Tensor = intersection * 2.0 / (denominator + 1e-6);
    let dice = ratio.neg().g_add_scalar(1.0).mean(Kind::Float);
    let ce = logits.cross_entropy_loss::<Tensor>(&target, None, tch::Reduction::Mean, -100, 0.0);
    dice + ce
}

/// `one_hot` puts classes last: [B, X, Y, Z, C] → [B, C, X, Y, Z].
fn permutation_to_channels_first(dims: usize) -> Vec<i64> {
    let last = dims as i64 - 1;
    std::iter::once(0)
        .chain(std::iter::once(last))
        .chain(1..last)
        .collect()
}

/// nnU-Net v1's `DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False}, {})`:
/// cross-entropy averaged over voxels plus the soft Dice loss −mean_c (2tp + 1e-5) /
/// (2tp + fp + fn + 1e-5 + 1e-8) over the foreground classes, on softmax probabilities; tp, fp
/// and fn summed over the batch and the voxels (`batch_dice`) or per sample.
pub fn nnunet_dice_ce(logits: &Tensor, labels: &Tensor, batch_dice: bool) -> Tensor {
    let (totals, ce) = dice_totals_and_ce(logits, labels, batch_dice);
    ce - foreground_dice(&totals)
}

/// How a data-parallel job sums batch-Dice totals over its ranks.
pub struct AcrossRanks<'a> {
    pub world: f64,
    /// The element-wise sum over the ranks of a (detached) tensor.
    pub sum: &'a dyn Fn(&Tensor) -> Result<Tensor>,
}

/// [`nnunet_dice_ce`] of a rank's share of a global batch: with `batch_dice`, tp, fp and fn are
/// summed over every rank's share, so that the loss, and the gradients averaged over the ranks,
/// are those of the whole batch in one process (as nnU-Net v2's `AllGatherGrad` makes them).
pub fn nnunet_dice_ce_across(
    logits: &Tensor,
    labels: &Tensor,
    batch_dice: bool,
    ranks: &AcrossRanks,
) -> Result<Tensor> {
    let (totals, ce) = dice_totals_and_ce(logits, labels, batch_dice);
    if !batch_dice || ranks.world <= 1.0 {
        return Ok(ce - foreground_dice(&totals));
    }
    let own = totals.detach();
    // the global totals, differentiable through this rank's own share only
    let global = &totals + ((ranks.sum)(&own)? - own);
    let dice = foreground_dice(&global);
    // averaging gradients over the ranks divides this share's by W: scaled back, value unchanged
    let w = ranks.world;
    Ok(ce - (&dice * w - dice.detach() * (w - 1.0)))
}

/// tp, fp and fn stacked `[3, (B,) C]` (summed over the batch too when `batch_dice`), and the
/// cross-entropy averaged over voxels.
fn dice_totals_and_ce(logits: &Tensor, labels: &Tensor, batch_dice: bool) -> (Tensor, Tensor) {
    let logits = logits.to_kind(Kind::Float);
    let index = labels.to_kind(Kind::Int64);
    let probs = logits.softmax(1, Kind::Float);
    // one-hot by scatter, in the logits' layout (as nnU-Net builds it)
    let onehot = probs.zeros_like().scatter_value(1, &index, 1.0);
    let axes: Vec<i64> = batch_dice
        .then_some(0)
        .into_iter()
        .chain(2..logits.dim() as i64)
        .collect();
    let sum = |t: &Tensor| t.sum_dim_intlist(axes.as_slice(), false, Kind::Float);
    let tp = sum(&(&probs * &onehot));
    // Σp(1 − g) = Σp − tp and Σ(1 − p)g = Σg − tp: no full-size temporaries for fp and fn
    let fp = sum(&probs) - &tp;
    let fn_ = sum(&onehot) - &tp;
    let target = index.squeeze_dim(1);
    let ce = logits.cross_entropy_loss::<Tensor>(&target, None, tch::Reduction::Mean, -100, 0.0);
    (Tensor::stack(&[tp, fp, fn_], 0), ce)
}

/// The mean soft Dice (2tp + 1e-5) / (2tp + fp + fn + 1e-5 + 1e-8) over the foreground classes.
fn foreground_dice(totals: &Tensor) -> Tensor {
    const SMOOTH: f64 = 1e-5;
    let (tp, fp, fn_) = (totals.get(0), totals.get(1), totals.get(2));
    let dice: Tensor = (&tp * 2.0 + SMOOTH) / (&tp * 2.0 + fp + fn_ + SMOOTH + 1e-8);
    // background excluded: the class axis is the last one left
    let classes = dice.size()[dice.dim() - 1];
    dice.narrow(-1, 1, classes - 1).mean(Kind::Float)
}

/// The labels `[B, 1, …]` at an output's size as batchgenerators' `downsample_seg_for_ds_transform2`
/// makes them (skimage order-0 resize: voxel ⌊(k + ½)·n/m⌋ of each axis).
pub fn downsample_labels(labels: &Tensor, size: &[i64]) -> Tensor {
    let mut out = labels.shallow_clone();
    for (i, &m) in size.iter().enumerate() {
        let axis = i as i64 + 2;
        let n = out.size()[axis as usize];
        if n != m {
            let idx: Vec<i64> = (0..m)
                .map(|k| (((k as f64 + 0.5) * n as f64 / m as f64) as i64).min(n - 1))
                .collect();
            out = out.index_select(axis, &Tensor::from_slice(&idx).to_device(labels.device()));
        }
    }
    out
}

/// nnU-Net's `MultipleOutputLoss2`: Σ_i weights[i] · Dice+CE(outputs[i], labels at that size).
pub fn deep_supervision(
    outputs: &[Tensor],
    labels: &Tensor,
    weights: &[f64],
    batch_dice: bool,
) -> Tensor {
    let mut total = Tensor::zeros([], (Kind::Float, labels.device()));
    for (out, &w) in outputs.iter().zip(weights) {
        let target = downsample_labels(labels, &out.size()[2..]);
        total += nnunet_dice_ce(out, &target, batch_dice) * w;
    }
    total
}

/// [`deep_supervision`] of a rank's share of a global batch ([`nnunet_dice_ce_across`]).
pub fn deep_supervision_across(
    outputs: &[Tensor],
    labels: &Tensor,
    weights: &[f64],
    batch_dice: bool,
    ranks: &AcrossRanks,
) -> Result<Tensor> {
    let mut total = Tensor::zeros([], (Kind::Float, labels.device()));
    for (out, &w) in outputs.iter().zip(weights) {
        let target = downsample_labels(labels, &out.size()[2..]);
        total += nnunet_dice_ce_across(out, &target, batch_dice, ranks)? * w;
    }
    Ok(total)
}
