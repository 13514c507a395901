//! Losses: MONAI's `DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0,
//! smooth_dr=1e-6)` for segmentation.

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
