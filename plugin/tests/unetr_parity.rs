//! UNETR against MONAI 1.6.1 (the reference no one here wrote): MONAI builds each configuration,
//! draws weights with a fixed seed and records its output (tests/python/monai_unetr_reference.py);
//! lwi loads that state dict strictly and must reproduce the output on CPU in fp32 within
//! max|Δ| ≤ 1e-4 · max|ref|. The report lands in target/test-reports/unetr-parity.txt.

mod common;

use common::{max_abs, monai_reference, report};
use lwi::model::{Unetr, UnetrConfig, load_state_dict};
use std::collections::HashMap;
use std::path::Path;
use tch::{Tensor, nn};

const TOLERANCE: f64 = 1e-4;

/// Loads one configuration, runs it, compares logits and the ViT features with MONAI's.
fn check(dir: &Path, name: &str) {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap()).unwrap();
    let cfg: UnetrConfig =
        serde_json::from_value(meta["config"].clone()).expect("MONAI kwargs are lwi's config keys");
    let mut all: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join(format!("{name}.safetensors")))
            .unwrap()
            .into_iter()
            .collect();
    let take = |all: &mut HashMap<String, Tensor>, k: &str| all.remove(k).unwrap();
    let (input, expected) = (take(&mut all, "__input__"), take(&mut all, "__output__"));
    let refs =
        ["__vit.hs3__", "__vit.hs6__", "__vit.hs9__", "__vit.x__"].map(|k| take(&mut all, k));

    let vs = nn::VarStore::new(tch::Device::Cpu);
    let model = Unetr::new(&vs.root(), &cfg).unwrap();
    let params: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    assert_eq!(
        params,
        meta["parameters"].as_i64().unwrap(),
        "{name}: parameter count differs from MONAI's"
    );
    load_state_dict(&vs, &all).unwrap();

    let (logits, features) = tch::no_grad(|| model.forward_features(&input, false));
    assert_eq!(logits.size(), expected.size());
    let scale = max_abs(&expected);
    let delta = max_abs(&(&logits - &expected));
    let feature_delta = features
        .iter()
        .zip(&refs)
        .map(|(a, b)| max_abs(&(a - b)) / max_abs(b))
        .fold(0.0, f64::max);
    report(
        "unetr-parity",
        &format!(
            "{name:<24} img {:?} {:?} norm {:?} res_block {} params {params}: max|Δ| {delta:.3e} (max|ref| {scale:.3e}, relative {:.2e} ≤ {TOLERANCE:.0e}); ViT features relative {feature_delta:.2e}",
            cfg.img_size,
            cfg.proj_type,
            cfg.norm_name,
            cfg.res_block,
            delta / scale
        ),
    );
    assert!(
        delta <= TOLERANCE * scale,
        "{name}: max|Δ| {delta} > {TOLERANCE} × {scale}"
    );
    assert!(
        feature_delta <= TOLERANCE,
        "{name}: ViT features differ by {feature_delta} (relative)"
    );
}

#[test]
fn small_configurations_match_monai() {
    let names = [
        "tiny_cubic",
        "non_cubic",
        "conv_embedding",
        "batch_norm",
        "basic_blocks_qkv_bias",
    ];
    let dir = monai_reference(&names);
    for name in names {
        check(dir.path(), name);
    }
}

#[test]
fn full_size_model_has_monais_parameter_count_and_output() {
    let dir = monai_reference(&["full"]);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("full.json")).unwrap()).unwrap();
    assert_eq!(
        meta["parameters"], 92_802_478,
        "MONAI 1.6.1's count for the full UNETR"
    );
    check(dir.path(), "full");
}

#[test]
fn default_config_is_the_full_size_model() {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let _ = Unetr::new(&vs.root(), &UnetrConfig::default()).unwrap();
    let params: usize = vs.trainable_variables().iter().map(|t| t.numel()).sum();
    assert_eq!(params, 92_802_478);
}

#[test]
fn initialisation_draws_from_monais_distributions() {
    // Random draws cannot be equal across libraries; their distributions must be. Per tensor: the
    // same constant where MONAI's is constant, and the same spread (std within 12% for tensors of at
    // least 500 values), uniform draws never beyond MONAI's bound.
    let dir = monai_reference(&["--init-stats"]);
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("init_stats.json")).unwrap())
            .unwrap();
    let cfg = UnetrConfig {
        in_channels: 1,
        out_channels: 3,
        img_size: [32, 32, 32],
        feature_size: 8,
        hidden_size: 48,
        mlp_dim: 96,
        num_heads: 4,
        ..Default::default()
    };
    tch::manual_seed(0);
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let _ = Unetr::new(&vs.root(), &cfg).unwrap();
    let mut checked = 0;
    for (name, t) in vs.variables() {
        let s = &stats[&name];
        let (ref_std, ref_max, numel) = (
            s["std"].as_f64().unwrap(),
            s["max_abs"].as_f64().unwrap(),
            s["numel"].as_i64().unwrap(),
        );
        let t = t.to_kind(tch::Kind::Double);
        let (std, max) = (
            if numel > 1 {
                t.std(true).double_value(&[])
            } else {
                0.0
            },
            t.abs().max().double_value(&[]),
        );
        if ref_std == 0.0 {
            assert!(
                (t.mean(tch::Kind::Double).double_value(&[]) - s["mean"].as_f64().unwrap()).abs()
                    < 1e-12
                    && std == 0.0,
                "{name}: constant init differs"
            );
        } else if numel >= 500 {
            assert!(
                (std / ref_std - 1.0).abs() < 0.12,
                "{name}: std {std} vs MONAI {ref_std}"
            );
            assert!(
                max <= ref_max * 1.05 + 1e-6,
                "{name}: max {max} vs MONAI {ref_max}"
            );
        }
        checked += 1;
    }
    report(
        "unetr-parity",
        &format!(
            "initialisation: {checked} tensors drawn from MONAI's distributions (std within 12%, constants equal)"
        ),
    );
}
