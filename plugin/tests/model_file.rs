//! The model file: save → load is bit-identical; broken files are refused with the reason; PyTorch
//! checkpoints in MONAI's and LWI-VMS's layouts import to models that compute what MONAI computes.

mod common;

use common::{max_abs, monai_reference, report};
use lwi::ErrorKind;
use lwi::bundle::{Model, ModelMetadata, Preprocessing, Stage};
use lwi::import::{ImportOptions, import_unetr};
use lwi::model::unetr_pp::UnetrPpConfig;
use lwi::model::{ArchConfig, UnetrConfig};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Device, Tensor};

fn tiny() -> UnetrConfig {
    UnetrConfig {
        img_size: [32, 32, 32],
        feature_size: 8,
        hidden_size: 48,
        mlp_dim: 96,
        num_heads: 4,
        out_channels: 3,
        ..Default::default()
    }
}

fn tiny_model(order_classes: Option<i64>) -> Model {
    let labels = BTreeMap::from([
        (0, "background".to_string()),
        (1, "spleen".into()),
        (2, "liver".into()),
    ]);
    let pre = Preprocessing {
        roi_size: [32, 32, 32],
        ..Default::default()
    };
    let mut meta = ModelMetadata::new(ArchConfig::Unetr(tiny()), labels, pre, Stage::Segmentation);
    meta.order_classes = order_classes;
    meta.provenance.seed = Some(3);
    Model::new(meta, Device::Cpu).unwrap()
}

#[test]
fn save_then_load_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let model = tiny_model(Some(6));
    model.save(&path).unwrap();
    let back = Model::load(&path, Device::Cpu).unwrap();
    assert_eq!(back.meta, model.meta);
    let (a, b) = (model.vs.variables(), back.vs.variables());
    assert_eq!(a.len(), b.len());
    for (k, v) in &a {
        assert!(v.equal(&b[k]), "{k} changed in the round trip");
    }
    assert!(
        a.keys().any(|k| k == "vit.temp_head4.weight"),
        "order heads are saved"
    );
    // Saving again gives the same bytes: the file is a function of the model.
    let again = dir.path().join("again.safetensors");
    back.save(&again).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(&again).unwrap()
    );
}

fn expect(path: &Path, kind: ErrorKind, words: &str) {
    let err = Model::load(path, Device::Cpu).unwrap_err();
    assert_eq!(err.kind, kind, "{}", err.message);
    assert!(
        err.message.contains(words),
        "'{}' should say '{words}'",
        err.message
    );
}

/// Rewrites a model file with `edit` applied to its tensors (metadata kept).
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let bytes = std::fs::read(src).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut tensors: HashMap<String, Tensor> =
        Tensor::read_safetensors(src).unwrap().into_iter().collect();
    edit(&mut tensors);
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, t)| {
            let t = t.contiguous();
            let mut b = vec![0u8; t.numel() * 4];
            t.copy_data_u8(&mut b, t.numel());
            (k.clone(), t.size().iter().map(|&d| d as usize).collect(), b)
        })
        .collect();
    data.sort_by(|a, b| a.0.cmp(&b.0));
    let views: Vec<_> = data
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dst,
        safetensors::serialize(views, header.metadata().clone()).unwrap(),
    )
    .unwrap();
}

#[test]
fn broken_model_files_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    tiny_model(None).save(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    expect(&truncated, ErrorKind::Format, "not a readable model file");
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a model").unwrap();
    expect(&garbage, ErrorKind::Format, "not a readable model file");

    let misshapen = dir.path().join("misshapen.safetensors");
    rewrite(&good, &misshapen, |t| {
        t.insert(
            "out.conv.conv.weight".into(),
            Tensor::zeros([5, 8, 1, 1, 1], (tch::Kind::Float, Device::Cpu)),
        );
    });
    expect(
        &misshapen,
        ErrorKind::ModelIncompatible,
        "out.conv.conv.weight is [5, 8, 1, 1, 1], the architecture needs [3, 8, 1, 1, 1]",
    );
    let missing = dir.path().join("missing.safetensors");
    rewrite(&good, &missing, |t| {
        t.remove("decoder2.conv_block.conv1.conv.weight");
    });
    expect(
        &missing,
        ErrorKind::ModelIncompatible,
        "missing tensors: decoder2.conv_block.conv1.conv.weight",
    );
    let extra = dir.path().join("extra.safetensors");
    rewrite(&good, &extra, |t| {
        t.insert(
            "vit.temp_head1.weight".into(),
            Tensor::zeros([6, 48], (tch::Kind::Float, Device::Cpu)),
        );
    });
    expect(
        &extra,
        ErrorKind::ModelIncompatible,
        "unexpected tensors: vit.temp_head1.weight",
    );
    expect(
        &dir.path().join("absent.safetensors"),
        ErrorKind::Io,
        "No such file",
    );
}

#[test]
fn a_version_1_model_file_still_loads() {
    // Written by lwi before UNETR++ (format version 1): the same "arch" + "config" layout.
    let path = common::root().join("tests/data/unetr-v1.safetensors");
    let model = Model::load(&path, Device::Cpu).unwrap();
    assert_eq!(model.meta.format_version, 1);
    assert!(matches!(model.meta.arch, ArchConfig::Unetr(_)));
    let x = Tensor::zeros([1, 1, 32, 32, 32], (tch::Kind::Float, Device::Cpu));
    let logits = tch::no_grad(|| model.net.forward_t(&x, false));
    assert_eq!(logits.size()[1], model.meta.arch.out_channels());
}

#[test]
fn a_unetr_pp_model_file_round_trips() {
    let cfg = UnetrPpConfig {
        out_channels: 3,
        img_size: [16, 32, 32],
        feature_size: 4,
        hidden_size: 64,
        depths: [1, 1, 1, 1],
        dims: [8, 16, 32, 64],
        ..Default::default()
    };
    let labels = BTreeMap::from([
        (0, "background".to_string()),
        (1, "a".into()),
        (2, "b".into()),
    ]);
    let pre = Preprocessing {
        roi_size: cfg.img_size,
        ..Default::default()
    };
    let meta = ModelMetadata::new(ArchConfig::UnetrPp(cfg), labels, pre, Stage::Segmentation);
    let model = Model::new(meta, Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pp.safetensors");
    model.save(&path).unwrap();
    let back = Model::load(&path, Device::Cpu).unwrap();
    assert_eq!(back.meta, model.meta);
    let info = back.info_json();
    assert_eq!(info["arch"], "unetr_pp");
    assert_eq!(info["format_version"], 2);
    assert_eq!(info["config"]["dims"], serde_json::json!([8, 16, 32, 64]));
    let x = Tensor::ones([1, 1, 16, 32, 32], (tch::Kind::Float, Device::Cpu));
    let names: Vec<String> = tch::no_grad(|| back.net.outputs(&x, None))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["out1", "out2", "out3"]);
}

#[test]
fn inconsistent_metadata_is_refused() {
    let mut meta = tiny_model(None).meta;
    meta.labels.insert(7, "stomach".into());
    let err = Model::new(meta, Device::Cpu).unwrap_err();
    assert_eq!(err.kind, ErrorKind::ModelIncompatible);
    assert!(
        err.message
            .contains("label 7 (stomach) has no output channel"),
        "{}",
        err.message
    );
}

#[test]
fn imported_checkpoints_compute_what_monai_computes() {
    let dir = monai_reference(&["--checkpoints"]);
    let d = dir.path();
    let config: UnetrConfig =
        serde_json::from_slice(&std::fs::read(d.join("arch.json")).unwrap()).unwrap();
    let labels: BTreeMap<u32, String> =
        serde_json::from_slice(&std::fs::read(d.join("labels.json")).unwrap()).unwrap();
    let options = ImportOptions {
        config,
        labels,
        spacing: [1.5, 1.5, 2.0],
        window: [-175.0, 250.0],
        ct_normalization: None,
        plans: None,
    };
    let refs: HashMap<String, Tensor> = Tensor::read_safetensors(d.join("reference.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    for (file, heads) in [("monai_layout.pt", None), ("lwi_vms_layout.pt", Some(6))] {
        let model = import_unetr(&d.join(file), &options).unwrap();
        assert_eq!(model.meta.order_classes, heads, "{file}");
        assert!(
            model
                .meta
                .provenance
                .source
                .as_deref()
                .unwrap_or_default()
                .contains(file)
        );
        let out = tch::no_grad(|| model.net.forward_t(&refs["__input__"], false));
        let (delta, scale) = (
            max_abs(&(&out - &refs["__output__"])),
            max_abs(&refs["__output__"]),
        );
        report(
            "unetr-parity",
            &format!("import {file:<20} max|Δ| {delta:.3e} vs MONAI (max|ref| {scale:.3e})"),
        );
        assert!(delta <= 1e-4 * scale, "{file}: {delta}");
        // and through a model file
        let saved = d.join(format!("{file}.safetensors"));
        model.save(&saved).unwrap();
        let back = Model::load(&saved, Device::Cpu).unwrap();
        let again = tch::no_grad(|| back.net.forward_t(&refs["__input__"], false));
        assert!(again.equal(&out));
    }
    let err = import_unetr(&d.join("unknown_keys.pt"), &options).unwrap_err();
    assert_eq!(err.kind, ErrorKind::ModelIncompatible);
    assert!(
        err.message
            .contains("unexpected tensors: decoder9.extra.weight"),
        "{}",
        err.message
    );
    let wrong_arch = ImportOptions {
        config: UnetrConfig {
            feature_size: 16,
            ..options.config.clone()
        },
        ..options
    };
    let err = import_unetr(&d.join("monai_layout.pt"), &wrong_arch).unwrap_err();
    assert!(err.message.contains("wrong shapes"), "{}", err.message);
}

#[test]
fn a_file_that_is_not_a_checkpoint_is_a_format_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.pt");
    std::fs::write(&p, b"PK\x03\x04 not really a zip").unwrap();
    let options = ImportOptions {
        config: tiny(),
        labels: BTreeMap::new(),
        spacing: [1.5, 1.5, 2.0],
        window: [-175.0, 250.0],
        ct_normalization: None,
        plans: None,
    };
    let err = import_unetr(&p, &options).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Format, "{}", err.message);
}

#[test]
fn a_label_buffer_must_hold_every_class_of_the_model() {
    use lwi::DType;
    use lwi::segment::check_label_type;
    let small = tiny_model(None);
    assert!(check_label_type(&small, DType::U8).is_ok());
    assert!(check_label_type(&small, DType::U16).is_ok());
    let err = check_label_type(&small, DType::F32).unwrap_err();
    assert!(
        err.message.contains("LWI_DTYPE_UINT8 or LWI_DTYPE_UINT16"),
        "{}",
        err.message
    );
    let classes = 300;
    let labels = (0..classes)
        .map(|c| (c as u32, format!("label {c}")))
        .collect();
    let arch = ArchConfig::Unetr(UnetrConfig {
        out_channels: classes,
        ..tiny()
    });
    let pre = Preprocessing {
        roi_size: [32, 32, 32],
        ..Default::default()
    };
    let many = Model::new(
        ModelMetadata::new(arch, labels, pre, Stage::Segmentation),
        Device::Cpu,
    )
    .unwrap();
    let err = check_label_type(&many, DType::U8).unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
    assert!(
        err.message.contains("300 classes") && err.message.contains("LWI_DTYPE_UINT16"),
        "{}",
        err.message
    );
    assert!(check_label_type(&many, DType::U16).is_ok());
}
