//! UNETR on CUDA: fp32 and autocast (bf16, fp16) against the CPU fp32 result of the same weights.
//! Also a short fine-tune on CUDA, segment on CUDA vs CPU, and the accumulator cap (the out-of-memory
//! fallback's path). Needs a GPU, so ignored by default; scripts/gpu-check.sh runs it with `--ignored`.

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

/// Records each epoch's mean loss from the training events.
struct EpochLosses(Vec<f64>);

impl lwi::events::Progress for EpochLosses {
    fn report(&mut self, event: &lwi::events::Event) -> bool {
        if event.stage == "epoch" {
            self.0.extend(event.loss);
        }
        true
    }
}

/// A phantom dataset and a small fine-tune configuration writing into `dir`.
fn phantom_training(dir: &std::path::Path, epochs: u64) -> lwi::train::TrainConfig {
    let opts = lwi::phantom::PhantomOptions {
        cases: 3,
        size: [48, 48, 32],
        spacing: Some([6.0, 6.0, 8.0]),
        ..Default::default()
    };
    let dataset = lwi::phantom::write_dataset(&dir.join("data"), &opts).unwrap();
    lwi::train::TrainConfig::from_json(
        &serde_json::json!({
            "dataset": dataset, "out": dir.join("model.safetensors"), "epochs": epochs,
            "arch": {"img_size": [32, 32, 32], "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4},
            "spacing": [8.0, 8.0, 8.0], "num_samples": 4, "lr": 1e-3, "warmup_epochs": 1, "val_every": 1000,
        })
        .to_string(),
    )
    .unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh)"]
fn short_fine_tune_on_cuda_lowers_the_loss() {
    assert!(
        tch::Cuda::is_available(),
        "no CUDA device visible to libtorch"
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = phantom_training(dir.path(), 12);
    let mut losses = EpochLosses(Vec::new());
    lwi::train::train(
        lwi::bundle::Stage::Segmentation,
        &cfg,
        Device::Cuda(0),
        &mut losses,
    )
    .unwrap();
    let l = &losses.0;
    println!("fine-tune on cuda:0, epoch losses {l:.4?}");
    assert_eq!(l.len(), 12);
    let (first, last) = (
        l[..3].iter().sum::<f64>(),
        l[l.len() - 3..].iter().sum::<f64>(),
    );
    assert!(last < first, "loss did not fall: {l:?}");
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh)"]
fn segment_on_cuda_equals_segment_on_cpu_and_the_accumulator_cap_changes_nothing() {
    assert!(
        tch::Cuda::is_available(),
        "no CUDA device visible to libtorch"
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = phantom_training(dir.path(), 2);
    lwi::train::train(
        lwi::bundle::Stage::Segmentation,
        &cfg,
        Device::Cpu,
        &mut lwi::events::Silent,
    )
    .unwrap();
    let image = lwi::io::read_volume(&dir.path().join("data/imagesTr/phantom_000.nii.gz")).unwrap();
    let labels = |device: Device, options: &str| {
        let model = lwi::bundle::Model::load(&cfg.out, device).unwrap();
        let opts = lwi::segment::SegmentOptions::from_json(options).unwrap();
        lwi::segment::segment(&model, &image, &opts, &mut lwi::events::Silent)
            .unwrap()
            .data
    };
    let cpu = labels(Device::Cpu, "");
    let gpu = labels(Device::Cuda(0), "");
    // a 1 MiB cap keeps the sliding-window sums on the CPU: the out-of-memory fallback's path
    let capped = labels(Device::Cuda(0), r#"{"max_gpu_accumulator_mb": 1}"#);
    let agree = |a: &Tensor, b: &Tensor| {
        a.eq_tensor(b)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[])
    };
    let (with_cpu, with_cap) = (agree(&cpu, &gpu), agree(&gpu, &capped));
    println!(
        "segment cuda vs cpu: {:.4}% of voxels equal; capped accumulators vs on-GPU: {:.4}%",
        100.0 * with_cpu,
        100.0 * with_cap
    );
    assert!(
        with_cpu >= 0.999,
        "cuda and cpu labels agree on only {with_cpu}"
    );
    assert!(
        with_cap >= 0.9999,
        "capped accumulators change the labels: {with_cap}"
    );
}
