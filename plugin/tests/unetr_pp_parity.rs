//! UNETR++ against tensors the upstream code produced (`shared/fixtures/unetrpp/`, see its README):
//! the reduced Synapse model (feature_size 4) and its LWI stage-1 variant, loaded from the
//! fixtures' weights, run on the CPU in float32 in eval mode, must reproduce every stored output,
//! hidden state and block-level EPA input/output within the README's tolerances. The full Synapse
//! configuration must have exactly upstream's parameter count. Report: target/test-reports/unetr-pp-parity.txt.

mod common;

use common::{max_abs, report, root};
use lwi::model::load_state_dict;
use lwi::model::unetr_pp::{PpOrderHeads, UnetrPp, UnetrPpConfig};
use std::collections::HashMap;
use tch::{Device, Tensor, nn};

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = root().join("../shared/fixtures/unetrpp").join(name);
    assert!(
        path.exists(),
        "{} is missing: the UNETR++ fixtures come with shared/",
        path.display()
    );
    Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect()
}

/// The reduced model the fixtures were made with.
fn reduced(out_channels: i64) -> UnetrPpConfig {
    UnetrPpConfig {
        out_channels,
        feature_size: 4,
        hidden_size: 64,
        depths: [1, 1, 2, 2],
        dims: [8, 16, 32, 64],
        ..Default::default()
    }
}

/// Upstream weights as lwi's variables: the tied `F.*` are not stored (they are `E.*`), and
/// `num_batches_tracked` is not a variable (eval and momentum 0.1 never read it).
fn weights(files: &[&str]) -> HashMap<String, Tensor> {
    files
        .iter()
        .flat_map(|f| fixture(f))
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .collect()
}

fn check(what: &str, got: &Tensor, want: &Tensor, tolerance: f64) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let delta = max_abs(&(got - want));
    report(
        "unetr-pp-parity",
        &format!(
            "{what:<28} max|Δ| {delta:.2e} (max|ref| {:.2e}) ≤ {tolerance:.0e}",
            max_abs(want)
        ),
    );
    assert!(
        delta <= tolerance,
        "{what}: max|Δ| {delta:.3e} > {tolerance:.0e}"
    );
}

#[test]
fn the_synapse_configuration_has_upstreams_parameters() {
    let vs = nn::VarStore::new(Device::Cpu);
    UnetrPp::new(&vs.root(), &UnetrPpConfig::default()).unwrap();
    let params: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    assert_eq!(params, 42_952_850);
    let bad = UnetrPpConfig {
        img_size: [40, 128, 128],
        ..Default::default()
    };
    assert!(bad.validate().unwrap_err().message.contains("img_size"));
    let bad = UnetrPpConfig {
        dims: [32, 64, 128, 512],
        ..Default::default()
    };
    assert!(
        bad.validate()
            .unwrap_err()
            .message
            .contains("[2f, 4f, 8f, 16f]")
    );
}

/// Key → shape of an upstream key list (`shared/design/unetrpp/*.txt`), less what lwi does not
/// store: the tied `F.*` aliases and `num_batches_tracked`.
fn upstream_keys(name: &str) -> std::collections::BTreeMap<String, Vec<i64>> {
    let path = root().join("../shared/design/unetrpp").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .filter(|l| {
            !l.starts_with('#') && !l.contains("alias-of") && !l.contains("num_batches_tracked")
        })
        .filter_map(|l| {
            let key = l.split_whitespace().nth(1)?.to_string();
            let shape = l[l.find('[')? + 1..l.find(']')?]
                .split(',')
                .filter(|d| !d.trim().is_empty())
                .map(|d| d.trim().parse().unwrap())
                .collect();
            Some((key, shape))
        })
        .collect()
}

#[test]
fn the_variables_are_upstreams_keys_and_shapes() {
    for (file, cfg, heads) in [
        ("state_dict_synapse.txt", UnetrPpConfig::default(), false),
        ("state_dict_synapse_reduced.txt", reduced(3), false),
        (
            "state_dict_lwi_pretext.txt",
            UnetrPpConfig {
                out_channels: 1,
                ..Default::default()
            },
            true,
        ),
    ] {
        let vs = nn::VarStore::new(Device::Cpu);
        UnetrPp::new(&vs.root(), &cfg).unwrap();
        if heads {
            PpOrderHeads::new(&vs.root(), cfg.dims, 4);
        }
        let ours: std::collections::BTreeMap<String, Vec<i64>> = vs
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.size()))
            .collect();
        assert_eq!(ours, upstream_keys(file), "{file}");
    }
}

/// Loads `weights` into lwi's UNETR++ built from `cfg` and checks every output and hidden state of
/// the fixture `io` (README tolerances).
fn reproduces(cfg: &UnetrPpConfig, weights_file: &str, io_file: &str) {
    let io = fixture(io_file);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = UnetrPp::new(&vs.root(), cfg).unwrap();
    load_state_dict(&vs, &weights(&[weights_file])).unwrap();
    let out = tch::no_grad(|| model.forward_all(&io["x"], false));
    let tag = |name: &str| format!("{} {name}", io_file.split('.').next().unwrap_or(""));
    check(&tag("out1"), &out.out1, &io["out1"], 5e-5);
    check(&tag("out2"), &out.deep[0], &io["out2"], 5e-5);
    check(&tag("out3"), &out.deep[1], &io["out3"], 5e-5);
    for (i, t) in out.hidden.iter().enumerate() {
        let name = format!("hidden.enc{}", i + 1);
        let want = &io[&name];
        // enc1..3 are stored as maps [B, C, D, H, W], enc4 as tokens [B, N, C].
        let want = if want.dim() == 5 {
            let s = want.size();
            want.reshape([s[0], s[1], -1]).permute([0, 2, 1])
        } else {
            want.shallow_clone()
        };
        check(&tag(&name), t, &want, 5e-5);
    }
    for (t, name) in out
        .decoded
        .iter()
        .zip(["hidden.dec3", "hidden.dec2", "hidden.dec1"])
    {
        check(&tag(name), t, &io[name], 5e-5);
    }
}

#[test]
fn the_reduced_synapse_model_reproduces_the_upstream_tensors() {
    reproduces(
        &reduced(3),
        "synapse_reduced.weights.safetensors",
        "synapse_reduced.io.safetensors",
    );
}

/// `num_heads` 2 reaches the encoder stages only: upstream's decoders keep 4 heads (their EPA
/// temperatures are [4, 1, 1]), and lwi's must too.
#[test]
fn num_heads_reaches_the_encoder_only_as_upstream() {
    let cfg = UnetrPpConfig {
        num_heads: 2,
        depths: [1, 1, 1, 1],
        ..reduced(3)
    };
    reproduces(
        &cfg,
        "synapse_heads2.weights.safetensors",
        "synapse_heads2.io.safetensors",
    );
}

#[test]
fn the_lwi_pretext_variant_reproduces_recon_and_order_logits() {
    let io = fixture("lwi_pretext_reduced.io.safetensors");
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = reduced(1);
    let model = UnetrPp::new(&vs.root(), &cfg).unwrap();
    let heads = PpOrderHeads::new(&vs.root(), cfg.dims, 4);
    let mut tensors = weights(&["synapse_reduced.weights.safetensors"]);
    tensors.extend(weights(&["lwi_pretext_reduced.weights.safetensors"]));
    load_state_dict(&vs, &tensors).unwrap();
    let out = tch::no_grad(|| model.forward_all(&io["x_in"], false));
    check("recon", &out.out1, &io["recon"], 5e-5);
    check("pretext out2", &out.deep[0], &io["out2"], 5e-5);
    check("pretext out3", &out.deep[1], &io["out3"], 5e-5);
    let logits = tch::no_grad(|| heads.forward(&out.hidden));
    for (i, t) in logits.iter().enumerate() {
        let pooled = tch::no_grad(|| heads.pool_released(&out.hidden[i]));
        check(
            &format!("pooled.enc{}", i + 1),
            &pooled,
            &io[&format!("pooled.enc{}", i + 1)],
            5e-6,
        );
        check(&format!("t{}", i + 1), t, &io[&format!("t{}", i + 1)], 5e-6);
    }
}

#[test]
fn full_width_order_heads_pool_as_upstream() {
    let io = fixture("lwi_order_heads_full.safetensors");
    let vs = nn::VarStore::new(Device::Cpu);
    let heads = PpOrderHeads::new(&vs.root(), [32, 64, 128, 256], 4);
    let tensors: HashMap<String, Tensor> = io
        .iter()
        .filter(|(k, _)| k.starts_with("temp_head"))
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    load_state_dict(&vs, &tensors).unwrap();
    let tokens: [Tensor; 4] = std::array::from_fn(|i| {
        let h = &io[&format!("hidden.enc{}", i + 1)];
        if h.dim() == 5 {
            let s = h.size();
            h.reshape([s[0], s[1], -1]).permute([0, 2, 1])
        } else {
            h.shallow_clone()
        }
    });
    let logits = tch::no_grad(|| heads.forward(&tokens));
    for (i, t) in logits.iter().enumerate() {
        check(
            &format!("full t{}", i + 1),
            t,
            &io[&format!("t{}", i + 1)],
            5e-6,
        );
    }
}

#[test]
fn the_pretext_objective_reproduces_the_lwi_trainers_losses() {
    use lwi::model::{Network, PretextHeads};
    use lwi::pretext::{Grouping, PretextBatch, PretextConfig, loss};
    let io = fixture("lwi_pretext_reduced.io.safetensors");
    let vs = nn::VarStore::new(Device::Cpu);
    let arch = lwi::model::ArchConfig::UnetrPp(reduced(1));
    let net = Network::new(&vs.root(), &arch).unwrap();
    let heads = net.order_heads(&vs.root(), 4);
    let mut tensors = weights(&["synapse_reduced.weights.safetensors"]);
    tensors.extend(weights(&["lwi_pretext_reduced.weights.safetensors"]));
    load_state_dict(&vs, &tensors).unwrap();
    assert!(matches!(heads, PretextHeads::UnetrPp(_)));
    // the released trainer: one permutation for the batch, the order heads pooled as upstream
    let cfg = PretextConfig {
        slabs: 4,
        cube: 4,
        grouping: Grouping::Released,
        per_batch: true,
        ..Default::default()
    };
    let batch = PretextBatch {
        input: io["x_in"].shallow_clone(),
        target: io["target"].shallow_clone(),
        perms: io["perm"].view([1, 4]),
    };
    let (total, rec, cls) = tch::no_grad(|| {
        let (recon, logits) = net.pretext(&batch.input, &heads, &cfg, false).unwrap();
        loss(&recon, &batch, &logits, &cfg)
    });
    let want_cls: f64 = (1..=4)
        .map(|j| io[&format!("loss_cls{j}")].double_value(&[]))
        .sum();
    for (what, got, want) in [
        (
            "loss_rec",
            rec.double_value(&[]),
            io["loss_rec"].double_value(&[]),
        ),
        ("Σ loss_cls", cls.double_value(&[]), want_cls),
        (
            "loss",
            total.double_value(&[]),
            io["loss"].double_value(&[]),
        ),
    ] {
        report(
            "unetr-pp-parity",
            &format!("pretext {what:<10} lwi {got:.7} upstream {want:.7}"),
        );
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "{what}: {got} vs {want}"
        );
    }
}
