//! Times UNETR segmentation training steps for the benchmarks in bench/: forward, DiceCE (MONAI's
//! DiceCELoss as lwi trains with it), backward, AdamW — the step `lwi fine-tune` runs.
//! Usage: train_step DEVICE BATCH PRECISION REPS [SIZE [FEATURE HIDDEN MLP HEADS]]
//! e.g. `cpu 2 fp32 5 64 16 192 768 4` (small) or `cuda 4 bf16 10 96` (full).
//! Prints one JSON line: {"median_ms", "min_ms", "loss_first", "loss_last", ...}.

mod common;

use lwi::model::with_precision;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = common::args()?;
    let mut t = common::training_step(&a)?;
    let mut losses = Vec::new();
    let times = common::time(&a, || {
        let loss = with_precision(a.precision, a.device, || {
            lwi::loss::dice_ce(&t.net.forward_t(&t.input, true), &t.labels)
        })?;
        t.opt.zero_grad();
        loss.f_backward()?;
        t.opt.step(1e-4);
        losses.push(loss.double_value(&[])); // reads the loss back, as the training loop does
        Ok(())
    })?;
    common::report(
        &a,
        &times,
        serde_json::json!({"loss_first": losses[0], "loss_last": losses[losses.len() - 1]}),
    );
    Ok(())
}
