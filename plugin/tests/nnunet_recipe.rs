//! The unetr_pp recipe's parts against the code UNETR++ trains with, nnunet 1.7.1 and
//! batchgenerators 0.25.5, on the tensors tests/python/nnunet_recipe_reference.py makes: the loss
//! (Dice + CE, per sample and per batch, and over the deep-supervision outputs with their
//! downsampled targets), label maps resized as nnU-Net resizes segmentations, the poly schedule,
//! SGD with Nesterov momentum after gradient clipping, the range of random patch starts
//! (`DataLoader3D`), and each augmentation's statistics over 400 draws (its effect when applied,
//! and how often the recipe applies it). Report: target/test-reports/nnunet-recipe.txt.

mod common;

use lwi::train::{NnUnetAugment, Sgd, clip_grad_norm, deep_supervision_weights, poly};
use rand::SeedableRng;
use std::collections::HashMap;
use tch::{Kind, Tensor, nn};

fn references() -> HashMap<String, Tensor> {
    common::python_reference("nnunet_recipe_reference.py")
}

fn scalar(t: &Tensor) -> f64 {
    t.double_value(&[0])
}

fn report(line: String) {
    common::report("nnunet-recipe", &line);
}

#[test]
fn loss_schedule_and_optimizer_equal_nnunets() {
    let r = references();
    for batch_dice in [true, false] {
        let got = lwi::loss::nnunet_dice_ce(&r["loss.logits"], &r["loss.labels"], batch_dice)
            .double_value(&[]);
        let want = scalar(
            &r[&format!(
                "loss.dice_ce.batch_dice_{}",
                if batch_dice { "True" } else { "False" }
            )],
        );
        report(format!(
            "Dice+CE batch_dice {batch_dice}: lwi {got:.8} nnU-Net {want:.8}"
        ));
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
    let outputs: Vec<Tensor> = (0..3)
        .map(|i| r[&format!("loss.ds_output{i}")].shallow_clone())
        .collect();
    let labels = &r["loss.ds_labels"];
    for (i, out) in outputs.iter().enumerate() {
        let target = lwi::loss::downsample_labels(labels, &out.size()[2..]);
        assert!(
            target.equal(&r[&format!("loss.ds_target{i}")]),
            "deep-supervision target {i} differs from downsample_seg_for_ds_transform2's"
        );
    }
    let weights = deep_supervision_weights(3);
    assert_eq!(
        weights
            .iter()
            .map(|w| (w * 7.0).round())
            .collect::<Vec<_>>(),
        [4.0, 2.0, 1.0]
    );
    let got = lwi::loss::deep_supervision(&outputs, labels, &weights, true).double_value(&[]);
    let want = scalar(&r["loss.deep_supervision"]);
    report(format!("deep supervision: lwi {got:.8} nnU-Net {want:.8}"));
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");

    for (e, want) in [0u64, 1, 500, 999]
        .iter()
        .zip(Vec::<f64>::try_from(&r["poly.lr"]).unwrap())
    {
        let got = poly(1e-2, *e, 1000, 0.9);
        assert!(
            (got - want).abs() <= 1e-15 * want.abs().max(1e-300),
            "epoch {e}: {got} vs {want}"
        );
    }

    for (name, size, separate) in [
        ("whole", [31, 15, 6], None),
        ("separate", [30, 26, 12], Some(2)),
    ] {
        let got = lwi::resample::resize_labels(&r["labels.input"], size, separate).unwrap();
        let want = r[&format!("labels.{name}")].to_kind(Kind::Uint8);
        let differ = got.ne_tensor(&want).sum(Kind::Int64).int64_value(&[]);
        report(format!(
            "labels resized ({name}): {differ} of {} voxels differ from nnU-Net's",
            want.numel()
        ));
        assert_eq!(differ, 0, "labels resized ({name})");
    }

    let vs = nn::VarStore::new(tch::Device::Cpu);
    let mut p = vs.root().zeros("p", &[50]);
    let mut vs = vs;
    vs.double();
    tch::no_grad(|| p.copy_(&r["sgd.start"]));
    p = vs.variables()["p"].shallow_clone();
    let mut sgd = Sgd::new(&vs, 0.99, true, 3e-5);
    for i in 0..3 {
        p.zero_grad();
        (&p * &r[&format!("sgd.grad{i}")])
            .sum(Kind::Double)
            .backward();
        clip_grad_norm(&[p.shallow_clone()], 12.0);
        sgd.step(1e-2);
    }
    let delta = (&p - &r["sgd.end"]).abs().max().double_value(&[]);
    report(format!("SGD + clip, 3 steps: max|Δ| {delta:.1e}"));
    assert!(delta < 1e-12, "SGD differs from torch's by {delta}");
}

/// Five statistics of one output (mean, sd, min, max, mean |out − in|) and whether it changed.
fn statistics(out: &Tensor, input: &Tensor) -> [f64; 6] {
    let o = out.to_kind(Kind::Double);
    let i = input.to_kind(Kind::Double);
    [
        o.mean(Kind::Double).double_value(&[]),
        o.std(false).double_value(&[]),
        o.min().double_value(&[]),
        o.max().double_value(&[]),
        (&o - &i).abs().mean(Kind::Double).double_value(&[]),
        f64::from(u8::from(!out.equal(input))),
    ]
}

/// The augmentation with one transform at probability `p` and the others off.
fn only(name: &str, p: f64) -> NnUnetAugment {
    let mut a = NnUnetAugment {
        rotation_p: 0.0,
        scale_p: 0.0,
        noise_p: 0.0,
        blur_p: 0.0,
        brightness_p: 0.0,
        contrast_p: 0.0,
        low_res_p: 0.0,
        gamma_inverted_p: 0.0,
        gamma_p: 0.0,
        mirror_p: 0.0,
        ..Default::default()
    };
    let slot = match name {
        "noise" => &mut a.noise_p,
        "blur" => &mut a.blur_p,
        "brightness" => &mut a.brightness_p,
        "contrast" => &mut a.contrast_p,
        "low_res" => &mut a.low_res_p,
        "gamma_inverted" => &mut a.gamma_inverted_p,
        "gamma" => &mut a.gamma_p,
        "spatial" => {
            a.scale_p = p;
            &mut a.rotation_p
        }
        _ => &mut a.mirror_p,
    };
    *slot = p;
    a
}

/// Compares the mean of each statistic over the draws with the reference's; returns the failures.
fn compare(name: &str, tag: &str, rows: &[[f64; 6]], reference: &Tensor) -> Vec<String> {
    let names = ["mean", "sd", "min", "max", "mean|Δ|", "changed"];
    let n = rows.len() as f64;
    let mut failures = Vec::new();
    for (k, stat) in names.iter().enumerate() {
        let values: Vec<f64> = rows.iter().map(|row| row[k]).collect();
        let mean = values.iter().sum::<f64>() / n;
        let sd = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        let (want, want_sd) = (
            reference.double_value(&[0, k as i64]),
            reference.double_value(&[1, k as i64]),
        );
        // four standard errors of the difference of two means, plus float32 rounding
        let tolerance = 4.0 * ((sd * sd + want_sd * want_sd) / n).sqrt() + 1e-4;
        let ok = (mean - want).abs() <= tolerance;
        report(format!(
            "{name:<15} {tag:<6} {stat:<8} lwi {mean:>9.4} (sd {sd:.4})  batchgenerators {want:>9.4} (sd {want_sd:.4})  tol {tolerance:.4}{}",
            if ok { "" } else { "  FAIL" }
        ));
        if !ok {
            failures.push(format!(
                "{name} {tag} {stat}: {mean} vs {want} (± {tolerance})"
            ));
        }
    }
    failures
}

#[test]
fn each_augmentation_has_batchgenerators_statistics() {
    const DRAWS: usize = 400;
    let r = references();
    let input = r["augment.input"].unsqueeze(0).to_kind(Kind::Float);
    let recipe = NnUnetAugment::default();
    let transforms = [
        ("noise", recipe.noise_p),
        ("blur", recipe.blur_p),
        ("brightness", recipe.brightness_p),
        ("contrast", recipe.contrast_p),
        ("low_res", recipe.low_res_p),
        ("gamma_inverted", recipe.gamma_inverted_p),
        ("gamma", recipe.gamma_p),
        // batchgenerators' MirrorTransform flips each axis with probability 0.5
        ("mirror", recipe.mirror_p),
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    tch::manual_seed(17);
    let mut failures = Vec::new();
    for (name, p) in transforms {
        for (tag, prob) in [
            ("always", if name == "mirror" { p } else { 1.0 }),
            ("recipe", p),
        ] {
            let aug = only(name, prob);
            let rows: Vec<[f64; 6]> = (0..DRAWS)
                .map(|_| {
                    let (out, _) = aug.apply(input.copy(), None, &mut rng).unwrap();
                    statistics(&out, &input)
                })
                .collect();
            failures.extend(compare(
                name,
                tag,
                &rows,
                &r[&format!("augment.{name}.{tag}")],
            ));
        }
    }
    let wide = r["augment.spatial_input"].unsqueeze(0).to_kind(Kind::Float);
    let centre = wide.narrow(2, 6, 32).narrow(3, 6, 32);
    for (tag, p) in [("always", 1.0), ("recipe", recipe.rotation_p)] {
        let aug = only("spatial", p);
        assert_eq!(
            aug.sampled_patch([16, 32, 32]),
            [16, 45, 45],
            "get_patch_size"
        );
        let rows: Vec<[f64; 6]> = (0..DRAWS)
            .map(|_| {
                let (out, _) = aug
                    .spatial(wide.copy(), None, [16, 32, 32], &mut rng)
                    .unwrap();
                statistics(&out, &centre)
            })
            .collect();
        failures.extend(compare(
            "spatial",
            tag,
            &rows,
            &r[&format!("augment.spatial.{tag}")],
        ));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
