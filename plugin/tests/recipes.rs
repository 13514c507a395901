//! Any recipe trains any architecture whose shapes fit it: UNETR with nnU-Net v1's recipe and
//! UNETR++ with MONAI's go through init-train, fine-tune and segmentation like the published
//! pairings, on the recipe's pipeline, the pretext's slabs along that pipeline's depth axis.

use lwi::bundle::{Model, Stage};
use lwi::model::{Network, PretextHeads};
use lwi::model_file::Pipeline;
use lwi::pretext::Grouping;
use lwi::train::{TrainConfig, train};
use serde_json::{Value, json};
use std::path::Path;
use tch::{Device, Kind, Tensor, nn};

const TINY_UNETR: &str = r#"{"arch": "unetr", "img_size": [32, 32, 32], "feature_size": 8,
    "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}"#;
/// MONAI's depth is the network's last axis, the one UNETR++'s (2, 4, 4) stem coarsens most: 64
/// voxels give 2 tokens there in the last stage, so 2 slabs.
const TINY_UNETR_PP: &str = r#"{"arch": "unetr_pp", "img_size": [16, 32, 64], "feature_size": 4,
    "hidden_size": 64, "num_heads": 4, "depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}"#;

fn config(dir: &Path, stage: &str, recipe: &str, arch: &str, extra: Value) -> TrainConfig {
    let mut doc = json!({
        "dataset": dir.join("data").join("dataset.json"), "out": dir.join(format!("{stage}.safetensors")),
        "recipe": recipe, "arch": serde_json::from_str::<Value>(arch).unwrap(), "epochs": 1,
        "iterations_per_epoch": 2, "batch_size": 1, "num_samples": 1, "val_every": 1000, "cache": false,
        "pretext": {"slabs": 2, "cube": 8},
    });
    if stage == "fine" {
        // the init model's recipe, as its architecture, unless given
        doc["init"] = json!(dir.join("init.safetensors"));
        doc.as_object_mut().unwrap().remove("recipe");
    }
    doc.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    TrainConfig::from_json(&doc.to_string()).unwrap()
}

/// Init-train then fine-tune `arch` with `recipe` on two phantoms, then segment one of them.
fn trains_and_segments(recipe: &str, arch: &str, pipeline: Pipeline, extra: Value) {
    let dir = tempfile::tempdir().unwrap();
    let opts = lwi::phantom::PhantomOptions {
        cases: 2,
        size: [48, 48, 32],
        spacing: Some([6.0, 6.0, 8.0]),
        ..Default::default()
    };
    lwi::phantom::write_dataset(&dir.path().join("data"), &opts).unwrap();
    let mut silent = lwi::events::Silent;
    let init_cfg = config(dir.path(), "init", recipe, arch, extra.clone());
    assert_eq!(init_cfg.pretext_task().axis, Some(pipeline.depth_axis()));
    let init = train(Stage::Init, &init_cfg, Device::Cpu, &mut silent).unwrap();
    let fine_cfg = config(dir.path(), "fine", recipe, arch, extra.clone());
    assert_eq!(fine_cfg.recipe.name(), recipe);
    // another recipe lays the volumes out differently from what the init model learnt
    let other = if recipe == "monai" {
        "nnunet_v1"
    } else {
        "monai"
    };
    let mut doc = serde_json::to_value(&fine_cfg).unwrap();
    doc["recipe"] = json!(other);
    let e = TrainConfig::from_json(&doc.to_string()).unwrap_err();
    assert!(
        e.message
            .contains(&format!("fine-tune it with {recipe}, not {other}")),
        "{}",
        e.message
    );
    let model = train(Stage::Segmentation, &fine_cfg, Device::Cpu, &mut silent).unwrap();
    for (what, m) in [("init", &init), ("fine-tune", &model)] {
        assert_eq!(m.meta.preprocessing.pipeline(), pipeline, "{what}");
        let losses = [
            &m.meta.provenance.history.init,
            &m.meta.provenance.history.fine_tune,
        ];
        assert!(
            losses
                .iter()
                .flat_map(|h| h.iter())
                .all(|r| r.loss.is_finite()),
            "{what}: {losses:?}"
        );
    }
    let reloaded = Model::load(&dir.path().join("fine.safetensors"), Device::Cpu).unwrap();
    let image = dir.path().join("data/imagesTr/phantom_000.nii.gz");
    let volume = lwi::io::read_volume(&image).unwrap();
    let opts = lwi::pipeline::options::SegmentOptions::default();
    let labels =
        lwi::pipeline::segment(&reloaded, &volume, &opts, &mut lwi::events::Silent).unwrap();
    assert_eq!(labels.dims(), volume.dims());
    assert_eq!(labels.affine, volume.affine);
}

#[test]
fn unetr_trains_with_nnunet_v1_and_segments_on_its_pipeline() {
    trains_and_segments("nnunet_v1", TINY_UNETR, Pipeline::NnUnet, json!({}));
}

#[test]
fn unetr_pp_trains_with_monai_and_segments_on_its_pipeline() {
    let extra = json!({"spacing": [8.0, 8.0, 4.0]});
    trains_and_segments("monai", TINY_UNETR_PP, Pipeline::Monai, extra);
}

/// Features whose every token holds its slab's index along grid axis `axis` (slabs of
/// `grid[axis] / m` tokens): pooled by slab, head k sees k.
fn slab_indices(grid: [i64; 3], axis: usize, m: i64, width: i64) -> Tensor {
    let shape = [1, grid[0], grid[1], grid[2], width];
    let along = Tensor::arange(grid[axis], (Kind::Float, Device::Cpu))
        .divide_scalar_mode(grid[axis] / m, "floor");
    let mut view = [1i64, 1, 1, 1, 1];
    view[1 + axis] = grid[axis];
    along
        .view(view)
        .expand(shape, false)
        .reshape([1, grid.iter().product::<i64>(), width])
}

/// Order heads whose Linear averages the pooled features: each slab's logits equal its index.
fn averaging(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            if name.contains("temp_head") {
                let fill = if name.ends_with("weight") {
                    1.0 / v.size()[1] as f64
                } else {
                    0.0
                };
                let _ = v.fill_(fill);
            }
        }
    });
}

/// A network of `arch` (a document) with 2-slab order heads that average their input.
fn averaging_heads(arch: &str) -> (lwi::model::ArchConfig, PretextHeads, nn::VarStore) {
    let doc = serde_json::from_str(arch).unwrap();
    let arch = lwi::model::ArchConfig::from_document(&doc, "arch").unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Network::new(&vs.root(), &arch).unwrap();
    let heads = net.order_heads(&vs.root(), 2);
    averaging(&vs);
    (arch, heads, vs)
}

/// Each head's logits: slab 0's row all 0, slab 1's all 1.
fn each_slab_sees_its_index(logits: impl IntoIterator<Item = Tensor>, axis: usize) {
    let want = Tensor::from_slice(&[0f32, 0., 1., 1.]).view([1, 2, 2]);
    for t in logits {
        assert!(t.allclose(&want, 1e-6, 1e-6, false), "axis {axis}: {t}");
    }
}

#[test]
fn order_heads_pool_the_slabs_along_the_axis_they_are_given() {
    let (_, heads, _vs) = averaging_heads(TINY_UNETR);
    let PretextHeads::Unetr(h) = &heads else {
        panic!("UNETR's heads")
    };
    for axis in 0..3 {
        let f = slab_indices([2, 2, 2], axis, 2, 48);
        let features = [f.shallow_clone(), f.shallow_clone(), f.shallow_clone(), f];
        each_slab_sees_its_index(h.logits(&features, Grouping::Slab, axis, [2, 2, 2]), axis);
    }
    let (pp, heads, _vs) = averaging_heads(TINY_UNETR_PP);
    let (PretextHeads::UnetrPp(h), lwi::model::ArchConfig::UnetrPp(c)) = (&heads, &pp) else {
        panic!("UNETR++'s heads")
    };
    let grids: [[i64; 3]; 4] = std::array::from_fn(|i| c.grid(i));
    // the last axis (MONAI's depth): the only one the coarsest grid [1, 1, 2] splits in two
    let axis = 2;
    let tokens: [Tensor; 4] = std::array::from_fn(|i| slab_indices(grids[i], axis, 2, c.dims[i]));
    each_slab_sees_its_index(h.forward_along(&tokens, Grouping::Slab, axis, grids), axis);
}
