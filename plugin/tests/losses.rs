//! The training losses against MONAI 1.6.1 and PyTorch on the same tensors
//! (tests/python/loss_reference.py computes the references).

mod common;

use lwi::pretext::{PretextBatch, PretextConfig, loss};
use std::collections::HashMap;
use tch::{Kind, Tensor};

fn references() -> HashMap<String, Tensor> {
    common::python_reference("loss_reference.py")
}

#[test]
fn dice_ce_equals_monais_and_the_pretext_loss_equals_pytorchs() {
    let r = references();
    let got = lwi::loss::dice_ce(&r["logits"], &r["labels"]).double_value(&[]);
    let want = r["dice_ce"].double_value(&[0]);
    common::report(
        "losses",
        &format!(
            "DiceCE: lwi {got:.8} MONAI {want:.8} |Δ| {:.1e}",
            (got - want).abs()
        ),
    );
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");

    let cfg = PretextConfig {
        slabs: 3,
        ..Default::default()
    };
    let batch = PretextBatch {
        input: r["recon"].zeros_like(),
        target: r["target"].shallow_clone(),
        perms: r["perms"].to_kind(Kind::Int64),
    };
    let heads: Vec<Tensor> = (0..4)
        .map(|i| r[&format!("head{i}")].shallow_clone())
        .collect();
    let (total, rec, cls) = loss(&r["recon"], &batch, &heads, &cfg);
    let (mse, ce) = (r["mse"].double_value(&[0]), r["ce_sum"].double_value(&[0]));
    common::report(
        "losses",
        &format!(
            "pretext: MSE lwi {:.8} torch {mse:.8}; ΣCE lwi {:.8} torch {ce:.8}",
            rec.double_value(&[]),
            cls.double_value(&[])
        ),
    );
    assert!((rec.double_value(&[]) - mse).abs() < 1e-6);
    assert!((cls.double_value(&[]) - ce).abs() < 1e-5);
    assert!((total.double_value(&[]) - (mse + ce)).abs() < 1e-5);
}
