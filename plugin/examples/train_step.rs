//! Times UNETR segmentation training steps for the benchmarks in bench/: forward, DiceCE (MONAI's
//! DiceCELoss as lwi trains with it), backward, AdamW — the step `lwi fine-tune` runs.
//! Usage: train_step DEVICE BATCH PRECISION REPS SIZE FEATURE HIDDEN MLP HEADS
//! e.g. `cpu 2 fp32 5 64 16 192 768 4` (tiny) or `cuda 4 bf16 10 96 16 768 3072 12` (full).
//! Prints one JSON line: {"median_ms", "min_ms", "loss_first", "loss_last", ...}.

use lwi::model::{Precision, Unetr, UnetrConfig, with_precision};
use lwi::train::AdamW;
use tch::{Device, Kind, Tensor, nn};

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let num = |i: usize, default: &str| arg(i, default).parse::<i64>();
    let device = lwi::engine::parse_device(&arg(1, "cpu"))?;
    let batch = num(2, "2")?;
    let precision: Precision = serde_json::from_str(&format!("\"{}\"", arg(3, "fp32")))?;
    let reps: usize = arg(4, "5").parse()?;
    let size = num(5, "64")?;
    let cfg = UnetrConfig {
        img_size: [size; 3],
        feature_size: num(6, "16")?,
        hidden_size: num(7, "192")?,
        mlp_dim: num(8, "768")?,
        num_heads: num(9, "4")?,
        ..Default::default()
    };
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let net = Unetr::new(&vs.root(), &cfg)?;
    let mut opt = AdamW::new(&vs, 1e-5);
    let x = Tensor::randn([batch, 1, size, size, size], (Kind::Float, device));
    let y = Tensor::randint(
        cfg.out_channels,
        [batch, 1, size, size, size],
        (Kind::Int64, device),
    );
    let (mut times, mut losses) = (Vec::new(), Vec::new());
    for i in 0..reps + 2 {
        sync(device);
        let t = std::time::Instant::now();
        let loss = with_precision(precision, device, || {
            lwi::loss::dice_ce(&net.forward_t(&x, true), &y)
        })?;
        opt.zero_grad();
        loss.f_backward()?;
        opt.step(1e-4);
        losses.push(loss.double_value(&[])); // reads the loss back, as the training loop does
        sync(device);
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64() * 1e3); // two warm-up steps
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({"median_ms": times[times.len() / 2], "min_ms": times[0], "batch": batch,
                           "device": format!("{device:?}"), "precision": arg(3, "fp32"),
                           "loss_first": losses[0], "loss_last": losses[losses.len() - 1]})
    );
    Ok(())
}
