//! Times UNETR forward passes (inference, no grad) for the benchmarks in bench/.
//! Usage: unetr_forward DEVICE BATCH PRECISION REPS [SIZE [FEATURE HIDDEN MLP HEADS]]   e.g. `cuda 4 bf16 20 96`
//! Prints one JSON line: {"median_ms", "min_ms", "batch", "device", "precision"}.

use lwi::model::{Precision, Unetr, UnetrConfig, with_precision};
use tch::{Device, Kind, Tensor, nn};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let device = lwi::engine::parse_device(&arg(1, "cpu"))?;
    let batch: i64 = arg(2, "1").parse()?;
    let precision: Precision = serde_json::from_str(&format!("\"{}\"", arg(3, "fp32")))?;
    let reps: usize = arg(4, "5").parse()?;
    let size: i64 = arg(5, "96").parse()?;
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    let default = UnetrConfig::default();
    let num = |i: usize, d: i64| -> Result<i64, std::num::ParseIntError> {
        arg(i, &d.to_string()).parse()
    };
    let cfg = UnetrConfig {
        img_size: [size; 3],
        feature_size: num(6, default.feature_size)?,
        hidden_size: num(7, default.hidden_size)?,
        mlp_dim: num(8, default.mlp_dim)?,
        num_heads: num(9, default.num_heads)?,
        ..default
    };
    let vs = nn::VarStore::new(device);
    let net = Unetr::new(&vs.root(), &cfg)?;
    let x = Tensor::randn([batch, 1, size, size, size], (Kind::Float, device));
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut times = Vec::new();
    for i in 0..reps + 2 {
        sync();
        let t = std::time::Instant::now();
        let y = with_precision(precision, device, || {
            tch::no_grad(|| net.forward_t(&x, false))
        })?;
        sync();
        drop(y);
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64() * 1e3); // two warm-up passes
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({"median_ms": times[times.len() / 2], "min_ms": times[0], "batch": batch,
                           "device": format!("{device:?}"), "precision": arg(3, "fp32")})
    );
    Ok(())
}
