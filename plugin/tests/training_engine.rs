//! The training engine's gradient seam: what runs between each backward pass and the optimizer
//! step (where data-parallel training averages gradients).

use lwi::bundle::{Model, Stage};
use lwi::train::{GradientSync, TrainConfig, train_with};
use tch::{Device, Tensor};

fn phantom_training(dir: &std::path::Path) -> TrainConfig {
    let opts = lwi::phantom::PhantomOptions {
        cases: 2,
        size: [48, 48, 32],
        spacing: Some([6.0, 6.0, 8.0]),
        ..Default::default()
    };
    let dataset = lwi::phantom::write_dataset(&dir.join("data"), &opts).unwrap();
    TrainConfig::from_json(
        &serde_json::json!({
            "dataset": dataset, "out": dir.join("model.safetensors"), "epochs": 2, "weight_decay": 0.0,
            "arch": {"img_size": [32, 32, 32], "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4},
            "spacing": [8.0, 8.0, 8.0], "num_samples": 1, "lr": 1e-3, "warmup_epochs": 0, "val_every": 1000,
        })
        .to_string(),
    )
    .unwrap()
}

/// Counts its calls and the parameters holding a gradient; optionally zeroes the gradients.
struct Probe {
    calls: usize,
    with_grad: Vec<usize>,
    zero: bool,
}

impl GradientSync for Probe {
    fn synchronize(&mut self, params: &[Tensor]) -> lwi::Result<()> {
        self.calls += 1;
        self.with_grad
            .push(params.iter().filter(|p| p.grad().defined()).count());
        if self.zero {
            tch::no_grad(|| {
                for p in params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.zero_();
                    }
                }
            });
        }
        Ok(())
    }
}

fn weights(model: &Model) -> Vec<(String, Tensor)> {
    let mut v = model.vs.variables().into_iter().collect::<Vec<_>>();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn the_seam_sees_every_step_between_backward_and_the_optimizer() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = phantom_training(dir.path());
    let mut probe = Probe {
        calls: 0,
        with_grad: Vec::new(),
        zero: false,
    };
    let mut silent = lwi::events::Silent;
    let trained = train_with(
        Stage::Segmentation,
        &cfg,
        Device::Cpu,
        &mut silent,
        Some(&mut probe),
    )
    .unwrap();
    assert_eq!(
        probe.calls,
        2 * 2,
        "one call per iteration: 2 epochs x 2 cases"
    );
    assert!(
        probe.with_grad.iter().all(|&n| n > 0),
        "gradients exist when it runs: {:?}",
        probe.with_grad
    );

    // Gradients zeroed there (and no weight decay): the weights never move from their seeded start.
    let dir2 = tempfile::tempdir().unwrap();
    let cfg2 = phantom_training(dir2.path());
    let mut zeroing = Probe {
        calls: 0,
        with_grad: Vec::new(),
        zero: true,
    };
    let frozen = train_with(
        Stage::Segmentation,
        &cfg2,
        Device::Cpu,
        &mut silent,
        Some(&mut zeroing),
    )
    .unwrap();
    tch::manual_seed(cfg2.seed as i64);
    let fresh = Model::new(frozen.meta.clone(), Device::Cpu).unwrap();
    for ((name, a), (_, b)) in weights(&frozen).iter().zip(weights(&fresh)) {
        assert!(
            a.equal(&b),
            "{name} moved although its gradient was zeroed at the seam"
        );
    }
    // …whereas the ordinary run moved them.
    assert!(
        weights(&trained)
            .iter()
            .zip(weights(&fresh))
            .any(|((_, a), (_, b))| !a.equal(&b))
    );
}

/// The dataset's label names go into the model file: a name the model file could not hold stops
/// the run before any case is prepared, naming the dataset file, and leaves nothing behind.
#[test]
fn a_label_name_the_model_file_cannot_hold_stops_the_run_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = phantom_training(dir.path());
    let text = std::fs::read_to_string(&cfg.dataset).unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    doc["labels"]["1"] = "x".repeat(300).into();
    std::fs::write(&cfg.dataset, doc.to_string()).unwrap();
    let Err(err) = lwi::train::train(
        Stage::Segmentation,
        &cfg,
        Device::Cpu,
        &mut lwi::events::Silent,
    ) else {
        panic!("a 300-byte label name is trained into a model file");
    };
    assert_eq!(err.kind, lwi::ErrorKind::InvalidArgument, "{}", err.message);
    assert!(
        err.message.contains("dataset.json: labels") && err.message.contains("label 1 (300 bytes)"),
        "{}",
        err.message
    );
    assert!(!cfg.out.exists() && !dir.path().join("lwi-cache").exists());
}
