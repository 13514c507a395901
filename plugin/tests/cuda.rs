//! UNETR and UNETR++ on CUDA: fp32 and autocast (bf16, fp16) against the CPU fp32 result of the same
//! weights, and a bf16 training step of each. Also a short fine-tune on CUDA, segment on CUDA vs CPU
//! (UNETR's pipeline with the accumulator cap, the out-of-memory fallback's path; UNETR++'s nnU-Net
//! pipeline with its mirrorings, the cap and a simulated out-of-memory in its window loop). Needs a GPU, so ignored by default; scripts/gpu-check.sh runs it
//! with `--ignored`.

use lwi::model::unetr_pp::{UnetrPp, UnetrPpConfig};
use lwi::model::{Precision, Unetr, UnetrConfig, load_state_dict, with_precision};
use tch::{Device, Kind, Tensor, nn};

/// The first GPU; the test fails (never passes silently) without one.
fn gpu() -> Device {
    assert!(
        tch::Cuda::is_available(),
        "no CUDA device visible to libtorch"
    );
    Device::Cuda(0)
}

fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(Device::Cpu).to_kind(Kind::Float);
    (&a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh)"]
fn unetr_on_cuda_matches_the_cpu_in_fp32_and_under_autocast() {
    let cuda = gpu();
    let cc = lwi::model::precision::cuda_compute_capability(cuda);
    println!(
        "compute capability {cc:?}: bf16 runs as {:?}",
        Precision::Bf16.on(cuda)
    );
    assert!(
        cc.is_some_and(|cc| cc >= 75),
        "the driver reports no compute capability: {cc:?}"
    );
    tch::manual_seed(0);
    let cfg = UnetrConfig::default();
    let cpu_vs = nn::VarStore::new(Device::Cpu);
    let cpu = Unetr::new(&cpu_vs.root(), &cfg).unwrap();
    let gpu_vs = nn::VarStore::new(cuda);
    let gpu = Unetr::new(&gpu_vs.root(), &cfg).unwrap();
    load_state_dict(&gpu_vs, &cpu_vs.variables()).unwrap();

    let x = Tensor::randn([2, 1, 96, 96, 96], (Kind::Float, Device::Cpu));
    let expected = tch::no_grad(|| cpu.forward_t(&x, false));
    let xg = x.to_device(cuda);
    agrees_in_every_precision("UNETR", &|x| gpu.forward_t(x, false), &xg, &expected);
}

/// `forward` (inference) on `x` (on the GPU) under fp32, bf16 and fp16 against the CPU's fp32 `expected`.
/// TF32 convolutions (libtorch's default on Ampere and newer) bound fp32 agreement near 1e-3.
fn agrees_in_every_precision(
    name: &str,
    forward: &dyn Fn(&Tensor) -> Tensor,
    x: &Tensor,
    expected: &Tensor,
) {
    let device = x.device();
    for (precision, tolerance) in [
        (Precision::Fp32, 5e-3),
        (Precision::Bf16, 6e-2),
        (Precision::Fp16, 2e-2),
    ] {
        let out = with_precision(precision, device, || tch::no_grad(|| forward(x))).unwrap();
        assert_eq!(out.size(), expected.size());
        let r = relative(&out, expected);
        println!(
            "{name} cuda {precision:?}: output kind {:?}, max|Δ|/max|ref| vs CPU fp32 = {r:.2e} (tolerance {tolerance:.0e})",
            out.kind()
        );
        assert!(r <= tolerance, "{name} {precision:?}: {r}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh)"]
fn training_step_runs_under_bf16_autocast() {
    let cuda = gpu();
    let cfg = UnetrConfig {
        img_size: [64, 64, 64],
        ..Default::default()
    };
    let vs = nn::VarStore::new(cuda);
    let net = Unetr::new(&vs.root(), &cfg).unwrap();
    let x = Tensor::randn([2, 1, 64, 64, 64], (Kind::Float, cuda));
    let loss = with_precision(Precision::Bf16, cuda, || {
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

/// A phantom dataset in `dir`/data and a small fine-tune configuration writing into `dir`: `recipe`'s
/// keys added to the dataset, output and epochs.
fn phantom_config(
    dir: &std::path::Path,
    epochs: u64,
    recipe: serde_json::Value,
) -> lwi::train::TrainConfig {
    let opts = lwi::phantom::PhantomOptions {
        cases: 3,
        size: [48, 48, 32],
        spacing: Some([6.0, 6.0, 8.0]),
        ..Default::default()
    };
    let dataset = lwi::phantom::write_dataset(&dir.join("data"), &opts).unwrap();
    let mut cfg = serde_json::json!({
        "dataset": dataset, "out": dir.join("model.safetensors"), "epochs": epochs,
    });
    for (k, v) in recipe.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    lwi::train::TrainConfig::from_json(&cfg.to_string()).unwrap()
}

/// A tiny UNETR's fine-tune on phantoms, writing into `dir`.
fn phantom_training(dir: &std::path::Path, epochs: u64) -> lwi::train::TrainConfig {
    phantom_config(
        dir,
        epochs,
        serde_json::json!({
            "arch": {"img_size": [32, 32, 32], "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4},
            "spacing": [8.0, 8.0, 8.0], "num_samples": 4, "lr": 1e-3, "warmup_epochs": 1, "val_every": 1000,
        }),
    )
}

/// The labels `segment` gives `image` with the model file `path` loaded on `device`.
fn labels(
    path: &std::path::Path,
    image: &lwi::volume::Volume,
    device: Device,
    options: &str,
) -> Tensor {
    let model = lwi::model_file::Model::load(path, device).unwrap();
    let opts = lwi::pipeline::SegmentOptions::from_json(options).unwrap();
    lwi::pipeline::segment(&model, image, &opts, &mut lwi::events::Silent)
        .unwrap()
        .data
}

/// The fraction of equal voxels.
fn agree(a: &Tensor, b: &Tensor) -> f64 {
    a.eq_tensor(b)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[])
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh)"]
fn short_fine_tune_on_cuda_lowers_the_loss() {
    let cuda = gpu();
    let dir = tempfile::tempdir().unwrap();
    let cfg = phantom_training(dir.path(), 12);
    let mut losses = EpochLosses(Vec::new());
    lwi::train::train(
        lwi::model_file::Stage::Segmentation,
        &cfg,
        cuda,
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
    let cuda = gpu();
    let dir = tempfile::tempdir().unwrap();
    let cfg = phantom_training(dir.path(), 2);
    lwi::train::train(
        lwi::model_file::Stage::Segmentation,
        &cfg,
        Device::Cpu,
        &mut lwi::events::Silent,
    )
    .unwrap();
    let image = lwi::io::read_volume(&dir.path().join("data/imagesTr/phantom_000.nii.gz")).unwrap();
    let cpu = labels(&cfg.out, &image, Device::Cpu, "");
    let gpu = labels(&cfg.out, &image, cuda, "");
    // a 1 MiB cap keeps the sliding-window sums on the CPU: the out-of-memory fallback's path
    let capped = labels(&cfg.out, &image, cuda, r#"{"max_gpu_accumulator_mb": 1}"#);
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

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh)"]
fn unetr_pp_on_cuda_matches_the_cpu_in_fp32_and_under_autocast() {
    let cuda = gpu();
    tch::manual_seed(0);
    // the Synapse model: EPA's normalisations and softmaxes, BatchNorm (eval) under autocast
    let cfg = UnetrPpConfig::default();
    let cpu_vs = nn::VarStore::new(Device::Cpu);
    let cpu = UnetrPp::new(&cpu_vs.root(), &cfg).unwrap();
    let gpu_vs = nn::VarStore::new(cuda);
    let gpu = UnetrPp::new(&gpu_vs.root(), &cfg).unwrap();
    load_state_dict(&gpu_vs, &cpu_vs.variables()).unwrap();

    let [d, h, w] = cfg.img_size;
    let x = Tensor::randn([1, 1, d, h, w], (Kind::Float, Device::Cpu));
    let expected = tch::no_grad(|| cpu.forward_t(&x, false));
    let xg = x.to_device(cuda);
    agrees_in_every_precision("UNETR++", &|x| gpu.forward_t(x, false), &xg, &expected);
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh)"]
fn unetr_pp_training_step_runs_under_bf16_autocast() {
    let cuda = gpu();
    tch::manual_seed(0);
    let cfg = UnetrPpConfig::default();
    let vs = nn::VarStore::new(cuda);
    let net = UnetrPp::new(&vs.root(), &cfg).unwrap();
    let [d, h, w] = cfg.img_size;
    let x = Tensor::randn([2, 1, d, h, w], (Kind::Float, cuda));
    let y = Tensor::randint(cfg.out_channels, [2, 1, d, h, w], (Kind::Int64, cuda));
    let weights = lwi::train::deep_supervision_weights(3);
    let loss = with_precision(Precision::Bf16, cuda, || {
        let all = net.forward_all(&x, true);
        let outputs: Vec<Tensor> = std::iter::once(all.out1).chain(all.deep).collect();
        lwi::loss::deep_supervision(&outputs, &y, &weights, true)
    })
    .unwrap();
    loss.backward();
    let grads: Vec<f64> = vs
        .trainable_variables()
        .iter()
        .map(|v| v.grad())
        .filter(Tensor::defined)
        .map(|g| g.abs().sum(Kind::Float).double_value(&[]))
        .collect();
    let total: f64 = grads.iter().sum();
    println!(
        "UNETR++ bf16 training step: loss {:.4}, {} gradients, Σ|grad| {total:.3e}",
        loss.double_value(&[]),
        grads.len()
    );
    assert!(loss.double_value(&[]).is_finite());
    assert!(grads.iter().all(|g| g.is_finite()) && total > 0.0);
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh)"]
fn unetr_pp_segment_on_cuda_equals_segment_on_cpu() {
    let cuda = gpu();
    let dir = tempfile::tempdir().unwrap();
    // a tiny UNETR++ trained by the unetr_pp recipe, so that the model carries nnU-Net's pipeline
    // trained long enough that few voxels sit on a near-tie between classes
    let cfg = phantom_config(
        dir.path(),
        3,
        serde_json::json!({
            "arch": {"arch": "unetr_pp", "img_size": [32, 32, 32], "feature_size": 2, "hidden_size": 32,
                     "num_heads": 2, "dims": [4, 8, 16, 32], "depths": [1, 1, 1, 1], "proj_size": [16, 16, 16, 8]},
            "iterations_per_epoch": 4, "val_every": 1000,
        }),
    );
    lwi::train::train(
        lwi::model_file::Stage::Segmentation,
        &cfg,
        Device::Cpu,
        &mut lwi::events::Silent,
    )
    .unwrap();
    let image = lwi::io::read_volume(&dir.path().join("data/imagesTr/phantom_000.nii.gz")).unwrap();
    // fp32 only: bf16's forward is checked above, and a barely trained model's near-ties would
    // make its labels a test of the training rather than of CUDA
    let cpu = labels(&cfg.out, &image, Device::Cpu, "");
    let gpu = labels(&cfg.out, &image, cuda, "");
    let same = agree(&cpu, &gpu);
    println!(
        "UNETR++ segment (nnU-Net pipeline, 8 mirrorings) cuda vs cpu: {:.4}% of voxels equal",
        100.0 * same
    );
    assert!(same >= 0.999, "cuda and cpu labels agree on only {same}");

    // the shared window's sums on the CPU: capped, or after a GPU out-of-memory in the window
    // loop (simulated at the first window's prediction), with a warning event
    let capped = labels(&cfg.out, &image, cuda, r#"{"max_gpu_accumulator_mb": 1}"#);
    let model = lwi::model_file::Model::load(&cfg.out, cuda).unwrap();
    let lwi::model_file::Preprocessing::NnUnet(preprocessing) = &model.meta.preprocessing else {
        panic!("not a model of nnU-Net's pipeline")
    };
    let failed = std::cell::Cell::new(false);
    let predict = |x: &Tensor| -> lwi::Result<Tensor> {
        if !failed.replace(true) {
            return Err(lwi::Error::new(
                lwi::ErrorKind::OutOfMemory,
                "CUDA out of memory (simulated)",
            ));
        }
        Ok(tch::no_grad(|| model.net.forward_t(x, false)).softmax(1, Kind::Float))
    };
    let segmenter = lwi::pipeline::nnunet::Segmenter {
        preprocessing,
        classes: model.meta.arch.out_channels(),
        device: cuda,
        predict: &predict,
    };
    let mut warnings = Warnings(Vec::new());
    let opts = lwi::pipeline::SegmentOptions::default();
    let after_oom = lwi::pipeline::nnunet::run(&segmenter, &image, &opts, &mut warnings)
        .unwrap()
        .data;
    assert!(
        warnings
            .0
            .iter()
            .any(|m| m.contains("retrying with them on the CPU")),
        "{:?}",
        warnings.0
    );
    for (what, other) in [("capped", &capped), ("after out-of-memory", &after_oom)] {
        let same = agree(&gpu, other);
        println!(
            "UNETR++ segment, sums on the GPU vs {what}: {:.4}% of voxels equal",
            100.0 * same
        );
        assert!(same >= 0.9999, "{what}: the labels agree on only {same}");
    }
}

/// The messages of warning events.
struct Warnings(Vec<String>);

impl lwi::events::Progress for Warnings {
    fn report(&mut self, event: &lwi::events::Event) -> bool {
        if event.message.starts_with("warning") {
            self.0.push(event.message.clone());
        }
        true
    }
}

/// ATen's `leaky_relu(instance_norm(a) + skip)` in float32, the reference for the fused kernel.
fn aten_norm_act(a: &Tensor, skip: Option<(&Tensor, bool)>) -> Tensor {
    use lwi::model::blocks::{Norm, activate};
    let f32 = |t: &Tensor| t.to_kind(Kind::Float);
    let skip = skip.map(|(b, normed)| (normed.then_some(&Norm::Instance), f32(b)));
    lwi::model::fused::with_fused(false, || activate(&Norm::Instance, &f32(a), skip, false))
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh)"]
fn the_fused_norm_kernel_equals_aten_for_every_dtype_and_skip() {
    use lwi::model::fused::{Skip, calls, last_failure, norm_act};
    let cuda = gpu();
    tch::manual_seed(1);
    // Odd sizes (rows not a multiple of anything, voxels not of the block size), a UNETR-sized
    // level, and a large offset from zero (the variance must not cancel).
    for shape in [[2i64, 5, 17, 9, 33], [4, 16, 96, 96, 96], [3, 7, 1, 1, 2]] {
        for (kind, tolerance) in [
            (Kind::Float, 1e-4),
            (Kind::Half, 4e-3),
            (Kind::BFloat16, 3e-2),
        ] {
            let make = |offset: f64| {
                (Tensor::randn(shape, (Kind::Float, cuda)) * 3.0 + offset).to_kind(kind)
            };
            let (a, b) = (make(20.0), make(-5.0));
            for (name, skip, reference) in [
                ("none", Skip::None, aten_norm_act(&a, None)),
                ("raw", Skip::Raw(&b), aten_norm_act(&a, Some((&b, false)))),
                (
                    "normed",
                    Skip::Normed(&b),
                    aten_norm_act(&a, Some((&b, true))),
                ),
            ] {
                let before = calls();
                let y = tch::no_grad(|| norm_act(&a, &skip, 1e-5, 0.01)).unwrap_or_else(|| {
                    panic!("the fused kernel did not run: {:?}", last_failure())
                });
                assert_eq!(calls(), before + 1);
                assert_eq!((y.size(), y.kind()), (a.size(), a.kind()));
                let err = (y.to_kind(Kind::Float) - &reference)
                    .abs()
                    .max()
                    .double_value(&[]);
                let scale = reference.abs().max().double_value(&[]).max(1.0);
                println!(
                    "fused {shape:?} {kind:?} skip {name}: max|Δ| {err:.2e} (scale {scale:.1})"
                );
                assert!(err / scale <= tolerance, "{shape:?} {kind:?} {name}: {err}");
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh)"]
fn unetr_with_the_fused_kernel_equals_unetr_without() {
    use lwi::model::fused::{calls, with_fused};
    let cuda = gpu();
    tch::manual_seed(0);
    let vs = nn::VarStore::new(cuda);
    let net = Unetr::new(&vs.root(), &UnetrConfig::default()).unwrap();
    let x = Tensor::randn([2, 1, 96, 96, 96], (Kind::Float, cuda));
    // fp32 convolutions run in TF32 (10-bit mantissa), which turns the kernels' last-bit differences
    // into ~1e-3 of the output, as between the CPU and CUDA.
    for (precision, tolerance) in [
        (Precision::Fp32, 2e-3),
        (Precision::Bf16, 6e-2),
        (Precision::Fp16, 2e-2),
    ] {
        let run = |fused: bool| {
            with_precision(precision, cuda, || {
                with_fused(fused, || tch::no_grad(|| net.forward_t(&x, false)))
            })
            .unwrap()
            .to_kind(Kind::Float)
        };
        let aten = run(false);
        let before = calls();
        let fused = run(true);
        let used = calls() - before;
        let r = relative(&fused, &aten.to_device(Device::Cpu));
        println!(
            "UNETR {precision:?}: {used} fused kernels per forward, max|Δ|/max|ref| vs ATen {r:.2e}"
        );
        assert!(used > 0, "{precision:?}: the fused kernel was not used");
        assert!(r <= tolerance, "{precision:?}: {r}");
    }
}
