//! Times UNETR++ forward passes (the Synapse model, 64×128×128, inference, no grad) for the
//! benchmarks in bench/, against bench/pytorch_unetr_pp.py.
//! Usage: unetr_pp_forward DEVICE BATCH PRECISION REPS [FEATURE D1 D2 D3 D4]   e.g. `cpu 1 fp32 3`;
//! `LWI_BENCH_PATCH=D,H,W` sets another input size (tiny runs that prove the benchmark's plumbing).
//! Prints one JSON line: {"median_ms", "min_ms", "batch", "device", "precision"}.

mod common;

use lwi::model::unetr_pp::UnetrPp;
use lwi::model::with_precision;
use tch::{Kind, Tensor, nn};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = common::args()?;
    let vs = nn::VarStore::new(a.device);
    let cfg = common::unetr_pp_config()?;
    let net = UnetrPp::new(&vs.root(), &cfg)?;
    let [d, h, w] = cfg.img_size;
    let input = Tensor::randn([a.batch, 1, d, h, w], (Kind::Float, a.device));
    let times = common::time(&a, || {
        let _output = with_precision(a.precision, a.device, || {
            tch::no_grad(|| net.forward_t(&input, false))
        })?;
        Ok(())
    })?;
    common::report(
        &a,
        &times,
        serde_json::json!({"arch": "unetr_pp", "feature_size": cfg.feature_size}),
    );
    Ok(())
}
