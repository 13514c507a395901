//! UNETR on CUDA: fp32 and autocast (bf16, fp16) against the CPU fp32 result of the same weights.
//! Needs a GPU, so ignored by default; scripts/gpu-check.sh runs it with `--ignored`.

use lwi::model::{Precision, Unetr, UnetrConfig, load_state_dict, with_precision};
use tch::{Device, Kind, Tensor, nn};

fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(Device::Cpu).to_kind(Kind::Float);
    (&a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh)"]
fn unetr_on_cuda_matches_the_cpu_in_fp32_and_under_autocast() {
    assert!(
        tch::Cuda::is_available(),
        "no CUDA device visible to libtorch"
    );
    tch::manual_seed(0);
    let cfg = UnetrConfig::default();
    let cpu_vs = nn::VarStore::new(Device::Cpu);
    let cpu = Unetr::new(&cpu_vs.root(), &cfg).unwrap();
    let gpu_vs = nn::VarStore::new(Device::Cuda(0));
    let gpu = Unetr::new(&gpu_vs.root(), &cfg).unwrap();
    load_state_dict(&gpu_vs, &cpu_vs.variables()).unwrap();

    let x = Tensor::randn([2, 1, 96, 96, 96], (Kind::Float, Device::Cpu));
    let expected = tch::no_grad(|| cpu.forward_t(&x, false));
    let xg = x.to_device(Device::Cuda(0));
    // TF32 convolutions (libtorch's default on Ampere and newer) bound fp32 agreement near 1e-3.
    for (precision, tolerance) in [
        (Precision::Fp32, 5e-3),
        (Precision::Bf16, 6e-2),
        (Precision::Fp16, 2e-2),
    ] {
        let out = with_precision(precision, Device::Cuda(0), || {
            tch::no_grad(|| gpu.forward_t(&xg, false))
        })
        .unwrap();
        assert_eq!(out.size(), expected.size());
        let r = relative(&out, &expected);
        println!(
            "cuda {precision:?}: output kind {:?}, max|Δ|/max|ref| vs CPU fp32 = {r:.2e} (tolerance {tolerance:.0e})",
            out.kind()
        );
        assert!(r <= tolerance, "{precision:?}: {r}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh)"]
fn training_step_runs_under_bf16_autocast() {
    assert!(
        tch::Cuda::is_available(),
        "no CUDA device visible to libtorch"
    );
    let cfg = UnetrConfig {
        img_size: [64, 64, 64],
        ..Default::default()
    };
    let vs = nn::VarStore::new(Device::Cuda(0));
    let net = Unetr::new(&vs.root(), &cfg).unwrap();
    let x = Tensor::randn([2, 1, 64, 64, 64], (Kind::Float, Device::Cuda(0)));
    let loss = with_precision(Precision::Bf16, Device::Cuda(0), || {
        net.forward_t(&x, true)
            .to_kind(Kind::Float)
            .square()
            .mean(Kind::Float)
    })
    .unwrap();
    loss.backward();
    // Unused parameters (MONAI's norm_cross_attn) get no gradient at all.
    let grads: f64 = vs
        .trainable_variables()
        .iter()
        .map(|v| v.grad())
        .filter(Tensor::defined)
        .map(|g| g.abs().sum(Kind::Float).double_value(&[]))
        .sum();
    println!(
        "bf16 training step: loss {:.4}, Σ|grad| {grads:.3e}",
        loss.double_value(&[])
    );
    assert!(grads.is_finite() && grads > 0.0);
}
