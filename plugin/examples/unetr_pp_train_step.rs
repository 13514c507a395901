//! Times UNETR++ training steps the way the nnunet_v1 recipe trains (for bench/, against
//! bench/pytorch_unetr_pp_train_step.py): 64×128×128 patches, forward in training mode, nnU-Net's
//! Dice + CE over the three deep-supervision outputs, backward, gradient clipping to 12, SGD with
//! Nesterov momentum — the step `lwi fine-tune` runs with that recipe.
//! Usage: unetr_pp_train_step DEVICE BATCH PRECISION REPS [FEATURE D1 D2 D3 D4]
//! e.g. `cpu 2 fp32 3 4 1 1 2 2` (reduced) or `cuda 2 bf16 10 16 3 3 3 3` (Synapse);
//! `LWI_BENCH_PATCH=D,H,W` sets another patch (tiny runs that prove the benchmark's plumbing).
//! Prints one JSON line: {"median_ms", "min_ms", "loss_first", "loss_last", ...}.

mod common;

use lwi::model::unetr_pp::UnetrPp;
use lwi::model::with_precision;
use lwi::train::{Optimizer, Sgd, clip_grad_norm, deep_supervision_weights};
use tch::{Kind, Tensor, nn};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = common::args()?;
    let cfg = common::unetr_pp_config()?;
    tch::manual_seed(0);
    let vs = nn::VarStore::new(a.device);
    let net = UnetrPp::new(&vs.root(), &cfg)?;
    let mut opt = Optimizer::Sgd(Sgd::new(&vs, 0.99, true, 3e-5));
    let [d, h, w] = cfg.img_size;
    let input = Tensor::randn([a.batch, 1, d, h, w], (Kind::Float, a.device));
    let labels = Tensor::randint(14, [a.batch, 1, d, h, w], (Kind::Int64, a.device));
    let weights = deep_supervision_weights(3);
    let mut losses = Vec::new();
    let times = common::time(&a, || {
        opt.zero_grad();
        let loss = with_precision(a.precision, a.device, || {
            let all = net.forward_all(&input, true);
            let outputs: Vec<Tensor> = std::iter::once(all.out1).chain(all.deep).collect();
            lwi::loss::deep_supervision(&outputs, &labels, &weights, true)
        })?;
        loss.f_backward()?;
        clip_grad_norm(opt.params(), 12.0);
        opt.step(1e-2);
        losses.push(loss.double_value(&[])); // reads the loss back, as the training loop does
        Ok(())
    })?;
    common::report(
        &a,
        &times,
        serde_json::json!({"arch": "unetr_pp", "feature_size": cfg.feature_size,
            "loss_first": losses[0], "loss_last": losses[losses.len() - 1]}),
    );
    Ok(())
}
