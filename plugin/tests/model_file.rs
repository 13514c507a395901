//! The model file: save → load is bit-identical; broken files are refused with the reason; PyTorch
//! checkpoints in MONAI's and LWI-VMS's layouts import to models that compute what MONAI computes.

mod common;

use common::{max_abs, monai_reference, report};
use lwi::ErrorKind;
use lwi::model::unetr_pp::UnetrPpConfig;
use lwi::model::{ArchConfig, UnetrConfig};
use lwi::model_file::import::{ImportOptions, import_unetr};
use lwi::model_file::{
    Model, ModelMetadata, MonaiPreprocessing, NnUnetPreprocessing, Preprocessing, Stage,
};
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
    let pre = Preprocessing::Monai(MonaiPreprocessing {
        roi_size: [32, 32, 32],
        ..Default::default()
    });
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
    rewrite_with(src, dst, edit, |_| {});
}

/// Rewrites a model file with `edit_meta` applied to its `"lwi"` document (tensors kept).
fn rewrite_metadata(src: &Path, dst: &Path, edit_meta: impl FnOnce(&mut serde_json::Value)) {
    rewrite_with(src, dst, |_| {}, edit_meta);
}

fn rewrite_with(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
    edit_meta: impl FnOnce(&mut serde_json::Value),
) {
    let bytes = std::fs::read(src).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut metadata = header.metadata().clone().unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(&metadata["lwi"]).unwrap();
    edit_meta(&mut doc);
    metadata.insert("lwi".into(), doc.to_string());
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
    std::fs::write(dst, safetensors::serialize(views, Some(metadata)).unwrap()).unwrap();
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
fn a_version_2_unetr_pp_model_file_still_loads_segments_and_saves_as_version_3() {
    // Written by lwi's fine-tune with format 2, whose preprocessing was one flat union of both
    // pipelines' fields: a nnU-Net model carried MONAI's orientation, HU window and crop unread.
    let path = common::root().join("tests/data/unetr_pp-v2.safetensors");
    let model = Model::load(&path, Device::Cpu).unwrap();
    assert_eq!(model.meta.format_version, 2);
    let Preprocessing::NnUnet(pre) = &model.meta.preprocessing else {
        panic!("{:?}: not the nnU-Net pipeline", model.meta.preprocessing);
    };
    assert_eq!((pre.spacing, pre.roi_size), ([8.0; 3], [16, 32, 32]));
    assert!(pre.ct_normalization.is_some());
    let mut affine = [[0.0; 4]; 4];
    (0..3).for_each(|d| affine[d][d] = 8.0);
    affine[3][3] = 1.0;
    let data = Tensor::arange(24 * 24 * 16, (tch::Kind::Float, Device::Cpu)).view([24, 24, 16]);
    let volume = lwi::Volume::new(data.remainder(300.0), affine, lwi::DType::F32).unwrap();
    let opts = lwi::pipeline::SegmentOptions::default();
    let labels = lwi::pipeline::segment(&model, &volume, &opts, &mut lwi::events::Silent).unwrap();
    assert_eq!(labels.dims(), [24, 24, 16]);
    let dir = tempfile::tempdir().unwrap();
    let again = dir.path().join("v3.safetensors");
    model.save(&again).unwrap();
    let back = Model::load(&again, Device::Cpu).unwrap();
    assert_eq!(back.meta.format_version, 3);
    assert_eq!(back.meta.preprocessing, model.meta.preprocessing);
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
    let pre = Preprocessing::NnUnet(NnUnetPreprocessing {
        spacing: [1.5, 1.5, 2.0],
        roi_size: cfg.img_size,
        ct_normalization: None,
    });
    let meta = ModelMetadata::new(ArchConfig::UnetrPp(cfg), labels, pre, Stage::Segmentation);
    let model = Model::new(meta, Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pp.safetensors");
    model.save(&path).unwrap();
    let back = Model::load(&path, Device::Cpu).unwrap();
    assert_eq!(back.meta, model.meta);
    let info = back.info_json();
    assert_eq!(info["arch"], "unetr_pp");
    assert_eq!(info["format_version"], 3);
    assert_eq!(info["preprocessing"]["pipeline"], "nn_unet");
    assert!(info["preprocessing"].get("intensity_window").is_none());
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
    use lwi::pipeline::check_label_type;
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
    let pre = Preprocessing::Monai(MonaiPreprocessing {
        roi_size: [32, 32, 32],
        ..Default::default()
    });
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

/// The values `ArchConfig::values` counts from a configuration (checked against its ceiling
/// before anything is built) are those of the network built from it.
#[test]
fn the_values_a_configuration_implies_are_the_networks() {
    use lwi::model::blocks::NormKind;
    use lwi::model::{Network, ProjType};
    let pp = UnetrPpConfig {
        out_channels: 3,
        img_size: [16, 32, 32],
        feature_size: 4,
        hidden_size: 64,
        depths: [1, 2, 1, 1],
        dims: [8, 16, 32, 64],
        ..Default::default()
    };
    let configs = [
        ArchConfig::Unetr(UnetrConfig::default()),
        ArchConfig::Unetr(tiny()),
        ArchConfig::Unetr(UnetrConfig {
            proj_type: ProjType::Conv,
            norm_name: NormKind::Batch,
            qkv_bias: true,
            in_channels: 2,
            num_layers: 5,
            ..tiny()
        }),
        ArchConfig::Unetr(UnetrConfig {
            conv_block: false,
            res_block: false,
            ..tiny()
        }),
        ArchConfig::UnetrPp(UnetrPpConfig::default()),
        ArchConfig::UnetrPp(pp.clone()),
        ArchConfig::UnetrPp(UnetrPpConfig {
            do_ds: false,
            in_channels: 2,
            num_heads: 2,
            proj_size: [8, 16, 4, 4],
            ..pp
        }),
    ];
    for cfg in configs {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        Network::new(&vs.root(), &cfg).unwrap();
        let built: i128 = vs.variables().values().map(|t| t.numel() as i128).sum();
        assert_eq!(cfg.values(), built, "{cfg:?}");
    }
}

/// Metadata fields beyond their ceilings are refused naming the file, the field and the value,
/// before anything is built (`num_layers` 10⁹ used to abort the process).
#[test]
fn absurd_metadata_is_refused_naming_the_file_the_field_and_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    tiny_model(Some(2)).save(&good).unwrap();
    let big = 1i64 << 62;
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "/config/img_size",
            serde_json::json!([1_000_000_000, 32, 32]),
            "img_size [1000000000, 32, 32]",
        ),
        (
            "/config/img_size",
            serde_json::json!([16384, 16384, 16384]),
            "img_size [16384, 16384, 16384]",
        ),
        (
            "/config/hidden_size",
            serde_json::json!(1_000_000),
            "hidden_size must be in [1, 4096], got 1000000",
        ),
        (
            "/config/mlp_dim",
            serde_json::json!(1_000_000_000_000i64),
            "mlp_dim must be in [1, 16384], got 1000000000000",
        ),
        (
            "/config/num_heads",
            serde_json::json!(big),
            "num_heads must be in [1, 64], got 4611686018427387904",
        ),
        (
            "/config/num_layers",
            serde_json::json!(1_000_000_000),
            "num_layers must be in [4, 64], got 1000000000",
        ),
        (
            "/config/out_channels",
            serde_json::json!(big),
            "out_channels must be in [1, 1024], got 4611686018427387904",
        ),
        (
            "/order_classes",
            serde_json::json!(big),
            "order_classes 4611686018427387904",
        ),
        (
            "/preprocessing/roi_size",
            serde_json::json!([1_000_000, 32, 32]),
            "roi_size [1000000, 32, 32]",
        ),
        (
            "/preprocessing/spacing",
            serde_json::json!([1e-6, 1.5, 2.0]),
            "spacing [1e-6, 1.5, 2.0]",
        ),
        (
            "/preprocessing/intensity_window",
            serde_json::json!([-1e300, 250.0]),
            "intensity_window [-1e300, 250.0]",
        ),
    ];
    for (i, (at, value, words)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("absurd{i}.safetensors"));
        rewrite_metadata(&good, &path, |doc| *doc.pointer_mut(at).unwrap() = value);
        let err = Model::load(&path, Device::Cpu).unwrap_err();
        assert_eq!(
            err.kind,
            ErrorKind::ModelIncompatible,
            "{at}: {}",
            err.message
        );
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            err.message.contains(&name) && err.message.contains(words),
            "{at}: '{}' should name the file and say '{words}'",
            err.message
        );
    }
}

/// Within the ceilings, the metadata must still describe the file's own tensors: a size that
/// disagrees with them is named before the network is built.
#[test]
fn metadata_that_does_not_describe_the_tensors_is_refused_before_building() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    tiny_model(Some(2)).save(&good).unwrap();
    for (at, value, words) in [
        (
            "/config/feature_size",
            serde_json::json!(128),
            "encoder1.layer.conv1.conv.weight is [8, 1, 3, 3, 3], the architecture needs [128, 1, 3, 3, 3] (from the metadata's feature_size 128 and in_channels 1)",
        ),
        (
            "/config/mlp_dim",
            serde_json::json!(16384),
            "vit.blocks.11.mlp.linear1.weight is [96, 48], the architecture needs [16384, 48]",
        ),
        (
            "/config/num_layers",
            serde_json::json!(64),
            "missing tensors: vit.blocks.63.mlp.linear1.weight (from the metadata's num_layers 64",
        ),
        (
            "/order_classes",
            serde_json::json!(64),
            "vit.temp_head1.weight is [2, 48], the architecture needs [64, 48]",
        ),
    ] {
        let path = dir.path().join("lying.safetensors");
        rewrite_metadata(&good, &path, |doc| *doc.pointer_mut(at).unwrap() = value);
        expect(&path, ErrorKind::ModelIncompatible, words);
    }
}

fn tiny_pp(num_heads: i64) -> Model {
    let cfg = UnetrPpConfig {
        out_channels: 2,
        img_size: [16, 32, 32],
        feature_size: 4,
        hidden_size: 64,
        num_heads,
        depths: [1, 1, 1, 1],
        dims: [8, 16, 32, 64],
        ..Default::default()
    };
    let pre = Preprocessing::Monai(MonaiPreprocessing {
        roi_size: cfg.img_size,
        ..Default::default()
    });
    let labels = BTreeMap::from([(0, "background".to_string()), (1, "a".into())]);
    let meta = ModelMetadata::new(ArchConfig::UnetrPp(cfg), labels, pre, Stage::Segmentation);
    Model::new(meta, Device::Cpu).unwrap()
}

/// A UNETR++ file lwi wrote when it gave the decoders `num_heads` heads (not upstream's 4)
/// describes another network: refused, naming the tensor and why.
#[test]
fn a_unetr_pp_file_whose_decoders_have_num_heads_heads_is_refused_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let now = dir.path().join("heads2.safetensors");
    tiny_pp(2).save(&now).unwrap();
    assert!(Model::load(&now, Device::Cpu).is_ok());
    let old = dir.path().join("old.safetensors");
    rewrite(&now, &old, |t| {
        for k in t.keys().cloned().collect::<Vec<_>>() {
            if k.starts_with("decoder") && k.contains("epa_block.temperature") {
                t.insert(k, Tensor::ones([2, 1, 1], (tch::Kind::Float, Device::Cpu)));
            }
        }
    });
    expect(
        &old,
        ErrorKind::ModelIncompatible,
        "decoder5.decoder_block.0.0.epa_block.temperature is [2, 1, 1], the architecture needs [4, 1, 1] (UNETR++ decoders have 4 heads whatever num_heads is",
    );
    let err = Model::load(&old, Device::Cpu).unwrap_err();
    assert!(
        err.message.contains("re-import or re-train"),
        "{}",
        err.message
    );
    // num_heads 4: the decoders' heads are the encoder's, files are unchanged
    let four = dir.path().join("heads4.safetensors");
    tiny_pp(4).save(&four).unwrap();
    assert!(Model::load(&four, Device::Cpu).is_ok());
}

/// NaN or infinite weights would segment every voxel as background: refused at load, naming the
/// first such tensor by name.
#[test]
fn non_finite_weights_are_refused_naming_the_first_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    tiny_model(None).save(&good).unwrap();
    for (value, what) in [
        (f64::NAN, "NaN"),
        (f64::INFINITY, "inf"),
        (f64::NEG_INFINITY, "-inf"),
    ] {
        let bad = dir.path().join(format!("{what}.safetensors"));
        rewrite(&good, &bad, |t| {
            for name in [
                "vit.norm.bias",
                "out.conv.conv.weight",
                "decoder2.conv_block.conv1.conv.weight",
            ] {
                let _ = t[name].get(0).fill_(value);
            }
        });
        expect(
            &bad,
            ErrorKind::ModelIncompatible,
            "tensor decoder2.conv_block.conv1.conv.weight holds NaN or infinite values",
        );
    }
}

/// Whatever the writer accepts, the reader reads back: label names and counts are bounded when
/// a model is made, and a header beyond the reader's ceiling is never written.
#[test]
fn what_the_writer_accepts_the_reader_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut meta = tiny_model(None).meta;
    meta.labels.insert(1, "x".repeat(100 << 20));
    let Err(err) = Model::new(meta, Device::Cpu) else {
        panic!("a model with a 100 MB label name is made");
    };
    assert!(
        err.message.contains("label 1") && err.message.contains("104857600 bytes"),
        "{}",
        &err.message[..err.message.len().min(300)]
    );
    assert!(err.message.len() < 300, "the name is not repeated");
    let mut meta = tiny_model(None).meta;
    meta.labels = (0..2000).map(|i| (i, format!("l{i}"))).collect();
    let err = Model::new(meta, Device::Cpu).unwrap_err();
    assert!(
        err.message.contains("2000 labels, at most 1024"),
        "{}",
        err.message
    );

    let mut model = tiny_model(None);
    model.meta.provenance.source = Some("s".repeat(101_000_000));
    let path = dir.path().join("huge.safetensors");
    let Err(err) = model.save(&path) else {
        panic!("a header beyond the reader's ceiling is written");
    };
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
    assert!(
        err.message.contains("lwi.provenance.source") && err.message.contains("100000000"),
        "{}",
        &err.message[..err.message.len().min(300)]
    );
    assert!(!path.exists(), "nothing is left behind");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // just under the ceiling it is written and reads back
    model.meta.provenance.source = Some("s".repeat(90_000_000));
    model.save(&path).unwrap();
    assert_eq!(Model::load(&path, Device::Cpu).unwrap().meta, model.meta);
}
