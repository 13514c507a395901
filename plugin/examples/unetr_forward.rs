//! Times UNETR forward passes (inference, no grad) for the benchmarks in bench/.
//! Usage: unetr_forward DEVICE BATCH PRECISION REPS [SIZE [FEATURE HIDDEN MLP HEADS]]   e.g. `cuda 4 bf16 20 96`
//! Prints one JSON line: {"median_ms", "min_ms", "batch", "device", "precision"}.

mod common;

use lwi::model::fused::with_fused;
use lwi::model::{Unetr, with_precision};
use tch::{Kind, Tensor, nn};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = common::args()?;
    let vs = nn::VarStore::new(a.device);
    let net = Unetr::new(&vs.root(), &a.cfg)?;
    let [x, y, z] = a.cfg.img_size;
    let input = Tensor::randn([a.batch, 1, x, y, z], (Kind::Float, a.device));
    let times = common::time(&a, || {
        let _output = with_precision(a.precision, a.device, || {
            with_fused(a.fused, || tch::no_grad(|| net.forward_t(&input, false)))
        })?;
        Ok(())
    })?;
    common::report(&a, &times, serde_json::json!({}));
    Ok(())
}
