//! Times data-parallel UNETR training steps for bench/run.py: run under torchrun, or alone (a group
//! of one of the backend asked for), it reports on rank 0 a step without gradient averaging, the
//! same step with the gradients averaged across the ranks (25 MiB buckets, as `lwi fine-tune`
//! does), the averaging alone, and one all-reduce of 92.8 M floats (the full UNETR's gradient,
//! 371 MB; `LWI_BENCH_FLAT=N` floats instead).
//! Usage: dist_step DEVICE BATCH PRECISION REPS [SIZE [FEATURE HIDDEN MLP HEADS]] (as train_step);
//! `LWI_DIST_BACKEND` picks gloo or nccl (default: nccl on CUDA). Prints one JSON line on rank 0.

mod common;

use lwi::distributed::{DistributedConfig, Peers};
use lwi::model::with_precision;
use tch::{Kind, Tensor};

/// UNETR's parameter count at full size (hidden 768, 12 layers, 96³).
const FULL_UNETR_FLOATS: i64 = 92_800_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = common::args()?;
    let mut cfg = DistributedConfig {
        backend: std::env::var("LWI_DIST_BACKEND").unwrap_or_else(|_| "auto".into()),
        ..Default::default()
    };
    if std::env::var("WORLD_SIZE").map_or(true, |w| w.trim() == "1") {
        // alone (torchrun's world of one included, which lwi runs as a single process): a group
        // of one all the same, so that the collectives run (NCCL's smoke test on one GPU)
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        (cfg.rank, cfg.world_size) = (Some(0), Some(1));
        (cfg.master_addr, cfg.master_port) = (Some("127.0.0.1".into()), Some(port));
    }
    let (peers, device) = Peers::join(&cfg, a.device, false)?;
    let a = common::Args { device, ..a };
    let mut t = common::training_step(&a)?;
    let mut step = |sync: bool| -> Result<(), Box<dyn std::error::Error>> {
        let loss = with_precision(a.precision, a.device, || {
            lwi::loss::dice_ce(&t.net.forward_t(&t.input, true), &t.labels)
        })?;
        t.opt.zero_grad();
        loss.f_backward()?;
        if sync {
            peers.average_gradients(t.opt.params())?;
        }
        t.opt.step(1e-4);
        let _ = peers.sum("the loss", &[loss.double_value(&[])], false)?;
        Ok(())
    };
    let plain = common::time(&a, || step(false))?;
    let synced = common::time(&a, || step(true))?;
    let averaging = common::time(&a, || Ok(peers.average_gradients(t.opt.params())?))?;
    let flat_floats = match std::env::var("LWI_BENCH_FLAT") {
        Ok(n) => n.parse()?,
        Err(_) => FULL_UNETR_FLOATS,
    };
    let flat = Tensor::ones([flat_floats], (Kind::Float, a.device)).set_requires_grad(true);
    flat.sum(Kind::Float).backward();
    let flat_times = common::time(&a, || {
        Ok(peers.average_gradients(std::slice::from_ref(&flat))?)
    })?;
    let floats: i64 = t.opt.params().iter().map(Tensor::numel).sum::<usize>() as i64;
    if peers.lead() {
        let median = |t: &[f64]| t[t.len() / 2];
        common::report(
            &a,
            &synced,
            serde_json::json!({
                "world": peers.world(), "backend": peers.backend().map(|b| b.name()),
                "step_ms": median(&plain), "synced_ms": median(&synced),
                "averaging_ms": median(&averaging), "gradient_floats": floats,
                "flat_ms": median(&flat_times), "flat_floats": flat_floats,
            }),
        );
    }
    Ok(())
}
