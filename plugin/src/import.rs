//! Importing PyTorch checkpoints (`.pt`, nnU-Net v1's `.model`) of UNETR and UNETR++ into lwi
//! model files.
//!
//! Two key layouts are understood: MONAI 1.6.1's `UNETR.state_dict()`, which is lwi's own, and the
//! LWI-VMS release (MONAI 0.7 names: `out.conv.*` instead of `out.conv.conv.*`, an unused
//! `vit.patch_embedding.cls_token`, an unused residual `conv3` in every ResBlock, no
//! `norm_cross_attn`, and the order heads `vit.temp_head{1..4}`). A plain state dict or a dict
//! holding one under `state_dict` (`{"epoch": …, "best_acc": …, "state_dict": {…}}`) both work.
//!
//! The pickle is read by `pytorch-reader`, which rebuilds only tensors and plain containers and
//! never executes code from the file. This path is used only by `lwi import`.

use crate::bundle::{Model, ModelMetadata, Preprocessing, Stage, sha256_file};
use crate::error::{Error, ErrorKind, Result};
use crate::model::unetr_pp::UnetrPpConfig;
use crate::model::{ArchConfig, UnetrConfig, load_state_dict};
use pytorch_reader::{DType, PytorchError, PytorchReader};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// What the checkpoint does not say and the model file must.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub config: UnetrConfig,
    pub labels: BTreeMap<u32, String>,
    pub spacing: [f64; 3],
    pub window: [f64; 2],
    /// nnU-Net's CT normalisation `[lower, upper, mean, sd]` (its plans' intensity properties:
    /// percentile_00_5, percentile_99_5, mean, sd), for UNETR++ models.
    pub ct_normalization: Option<[f64; 4]>,
    /// UNETR++: the checkpoint's nnU-Net plans (`CKPT.model.pkl` or `plans.pkl`); the spacing, the
    /// patch and the CT normalisation then come from it.
    pub plans: Option<std::path::PathBuf>,
}

/// The JSON form of the import options (the C ABI's and the CLI's).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportOptionsJson {
    arch: String,
    arch_config: serde_json::Value,
    labels: BTreeMap<u32, String>,
    #[serde(default = "default_spacing")]
    spacing: [f64; 3],
    #[serde(default = "default_window")]
    window: [f64; 2],
    #[serde(default)]
    ct_normalization: Option<[f64; 4]>,
    #[serde(default)]
    plans: Option<std::path::PathBuf>,
}

fn default_spacing() -> [f64; 3] {
    Preprocessing::default().spacing
}

fn default_window() -> [f64; 2] {
    Preprocessing::default().intensity_window
}

/// The JSON options (`{"arch", "arch_config", "labels", "spacing", "window", …}`): the
/// architecture, and the rest of the options (`config` left at UNETR's default; [`import`] sets it).
fn parse_options(json: &str) -> Result<(ArchConfig, ImportOptions)> {
    let shape = serde_json::json!({"arch_config": {}, "labels": {}});
    let o: ImportOptionsJson = crate::options::parse_shaped(json, "import options", &shape)?;
    let arch = ArchConfig::from_parts(
        &o.arch,
        &o.arch_config.to_string(),
        "import options: arch_config",
    )?;
    crate::bundle::check_labels("import options: labels", &o.labels)?;
    Ok((
        arch,
        ImportOptions {
            config: UnetrConfig::default(),
            labels: o.labels,
            spacing: o.spacing,
            window: o.window,
            ct_normalization: o.ct_normalization,
            plans: o.plans,
        },
    ))
}

/// Imports a checkpoint of the architecture the options name (`lwi import`, `lwi_model_import`).
pub fn import(checkpoint: &Path, options_json: &str) -> Result<Model> {
    match parse_options(options_json)? {
        (ArchConfig::Unetr(config), options) => {
            import_unetr(checkpoint, &ImportOptions { config, ..options })
        }
        (ArchConfig::UnetrPp(config), options) => import_unetr_pp(checkpoint, &config, &options),
    }
}

/// Every tensor of a PyTorch checkpoint (under `state_dict` when the file nests it), by dotted name.
pub fn read_checkpoint(path: &Path) -> Result<HashMap<String, Tensor>> {
    let fail = |e: PytorchError| match e {
        PytorchError::Io(io)
            if io.kind() != std::io::ErrorKind::InvalidData
                && io.kind() != std::io::ErrorKind::UnexpectedEof =>
        {
            Error::io(path, io)
        }
        other => Error::format(path, format!("not a readable PyTorch checkpoint ({other})")),
    };
    crate::io::check_regular(path)?;
    refuse_foreign_objects(path)?;
    let reader = match PytorchReader::with_top_level_key(path, "state_dict") {
        Ok(r) => r,
        Err(PytorchError::KeyNotFound(_)) => PytorchReader::new(path).map_err(fail)?,
        Err(e) => return Err(fail(e)),
    };
    let mut out = HashMap::new();
    for (name, t) in reader.into_tensors() {
        let kind = match t.dtype() {
            DType::F32 => Kind::Float,
            DType::F64 => Kind::Double,
            DType::F16 => Kind::Half,
            DType::BF16 => Kind::BFloat16,
            DType::I64 => Kind::Int64,
            other => {
                return Err(Error::format(
                    path,
                    format!("tensor {name} has dtype {other:?}; weights are floating point"),
                ));
            }
        };
        let bytes = t
            .read()
            .map_err(|e| Error::format(path, format!("tensor {name}: {e}")))?;
        let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
        out.insert(name, Tensor::f_from_data_size(&bytes, &shape, kind)?);
    }
    Ok(out)
}

/// Python objects a checkpoint may hold besides containers and numbers: tensors and storages,
/// numpy scalars (nnU-Net's metrics), dtypes and devices. Anything else — a class of the
/// trainer, a callable such as `builtins.eval` — is refused: lwi never runs it, but a file
/// that asks for it is not a plain checkpoint.
const ALLOWED_OBJECTS: [&str; 10] = [
    "torch.Tensor",
    "torch.TypedStorage",
    "torch.UntypedStorage",
    "torch.device",
    "torch.Size",
    "int",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "numpy.core.multiarray._reconstruct",
];

fn allowed_object(name: &str) -> bool {
    const DTYPES: [&str; 8] = [
        "float", "double", "half", "bfloat16", "int", "long", "bool", "uint8",
    ];
    ALLOWED_OBJECTS.contains(&name)
        || name
            .strip_prefix("torch.")
            .is_some_and(|d| DTYPES.iter().any(|t| d.starts_with(t)))
}

/// Walks the whole pickle (never executing it) and refuses one that names a global outside
/// [`ALLOWED_OBJECTS`], naming it.
fn refuse_foreign_objects(path: &Path) -> Result<()> {
    use pytorch_reader::PickleValue;
    let Ok(root) = PytorchReader::read_pickle_data(path, None) else {
        return Ok(()); // not readable as a whole: the tensor reader below says why
    };
    let mut stack = vec![root];
    while let Some(v) = stack.pop() {
        match v {
            PickleValue::List(items) => stack.extend(items),
            PickleValue::Dict(map) => stack.extend(map.into_values()),
            PickleValue::Unsupported(name) if !allowed_object(&name) => {
                return Err(Error::format(
                    path,
                    format!(
                        "the pickle names the Python object {name}, which a checkpoint does not hold; refused (lwi reads tensors and plain containers only)"
                    ),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Provenance of an imported model: the checkpoint's name and hash.
fn source(checkpoint: &Path) -> Result<String> {
    let name = checkpoint
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    Ok(format!(
        "imported from {name} (sha256 {})",
        sha256_file(checkpoint)?
    ))
}

/// The lwi name of a checkpoint tensor, or None for tensors that carry nothing lwi uses.
fn native_name(name: &str) -> Option<String> {
    let name = name.strip_prefix("module.").unwrap_or(name);
    if name.ends_with(".num_batches_tracked") || name == "vit.patch_embedding.cls_token" {
        return None;
    }
    Some(match name {
        "out.conv.weight" => "out.conv.conv.weight".into(),
        "out.conv.bias" => "out.conv.conv.bias".into(),
        other => other.into(),
    })
}

/// Builds an lwi model from a UNETR checkpoint; every tensor the architecture needs must be in it.
pub fn import_unetr(checkpoint: &Path, options: &ImportOptions) -> Result<Model> {
    let raw = read_checkpoint(checkpoint)?;
    let mut tensors: HashMap<String, Tensor> = raw
        .into_iter()
        .filter_map(|(k, v)| native_name(&k).map(|n| (n, v)))
        .collect();

    let mut preprocessing = Preprocessing {
        spacing: options.spacing,
        intensity_window: options.window,
        ..Default::default()
    };
    preprocessing.roi_size = options.config.img_size;
    let with_heads = tensors.get("vit.temp_head1.weight").map(|w| w.size()[0]);
    let stage = if with_heads.is_some() && options.config.out_channels == 1 {
        Stage::Init
    } else {
        Stage::Segmentation
    };
    let mut meta = ModelMetadata::new(
        crate::model::ArchConfig::Unetr(options.config.clone()),
        options.labels.clone(),
        preprocessing,
        stage,
    );
    meta.order_classes = with_heads;
    meta.provenance.source = Some(source(checkpoint)?);
    let model = Model::new(meta, Device::Cpu)?;
    let vars = model.vs.variables();

    // MONAI 0.7 always created a ResBlock's residual conv3 (and norm3), unused when the channel
    // count does not change; lwi, like MONAI 1.x, does not have it.
    tensors
        .retain(|k, _| vars.contains_key(k) || !(k.contains(".conv3.") || k.contains(".norm3.")));
    // MONAI 0.7 had no (unused) norm_cross_attn: give it LayerNorm's initial values.
    if !tensors.keys().any(|k| k.contains(".norm_cross_attn.")) {
        for (k, v) in vars.iter().filter(|(k, _)| k.contains(".norm_cross_attn.")) {
            let fill = if k.ends_with("weight") {
                v.ones_like()
            } else {
                v.zeros_like()
            };
            tensors.insert(k.clone(), fill.detach());
        }
    }
    load_state_dict(&model.vs, &tensors).map_err(|e| {
        Error::new(
            ErrorKind::ModelIncompatible,
            format!(
                "{}: does not fit UNETR {}: {}",
                checkpoint.display(),
                serde_json::to_string(&options.config).unwrap_or_default(),
                e.message
            ),
        )
    })?;
    Ok(model)
}

/// Builds an lwi model from a UNETR++ checkpoint: an nnU-Net v1 checkpoint
/// (`model_final_checkpoint.model`: the weights under `state_dict`, beside the optimizer state,
/// `plot_stuff`, `epoch`, …) or a plain state dict. Upstream's EPA ties `F` to `E`: `F.*` is
/// accepted only when equal to `E.*`. `num_batches_tracked` is not kept (eval and momentum 0.1
/// never read it). With `out_channels` 1 and the order heads `temp_head1..4` it is an init-train
/// (stage 1) model; a segmentation checkpoint's order heads (LWI-VMS keeps them in stage 2) are
/// dropped.
pub fn import_unetr_pp(
    checkpoint: &Path,
    config: &UnetrPpConfig,
    options: &ImportOptions,
) -> Result<Model> {
    let incompatible = |m: String| {
        Error::new(
            ErrorKind::ModelIncompatible,
            format!("{}: {m}", checkpoint.display()),
        )
    };
    let mut tensors: HashMap<String, Tensor> = read_checkpoint(checkpoint)?
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("module.").unwrap_or(&k).to_string(), v))
        .filter(|(k, _)| !k.ends_with(".num_batches_tracked"))
        .collect();
    let tied: Vec<String> = tensors
        .keys()
        .filter(|k| k.contains(".epa_block.F."))
        .cloned()
        .collect();
    for f in tied {
        let e = f.replace(".epa_block.F.", ".epa_block.E.");
        let same = tensors
            .get(&e)
            .is_some_and(|t| t.size() == tensors[&f].size() && t.equal(&tensors[&f]));
        if !same {
            return Err(incompatible(format!(
                "{f} differs from {e}: upstream's EPA ties F to E"
            )));
        }
        tensors.remove(&f);
    }
    let with_heads = tensors.get("temp_head1.weight").map(|w| w.size()[0]);
    let stage = if with_heads.is_some() && config.out_channels == 1 {
        Stage::Init
    } else {
        tensors.retain(|k, _| !k.starts_with("temp_head"));
        Stage::Segmentation
    };
    let mut preprocessing = Preprocessing {
        spacing: options.spacing,
        intensity_window: options.window,
        roi_size: config.img_size,
        pipeline: crate::bundle::Pipeline::NnUnet,
        ct_normalization: options.ct_normalization.map(|[lower, upper, mean, sd]| {
            crate::bundle::CtNormalization {
                lower,
                upper,
                mean,
                sd,
            }
        }),
        ..Default::default()
    };
    if let Some(path) = &options.plans {
        let plans = crate::plans::read(path)?;
        if plans.patch != config.img_size {
            return Err(Error::invalid(format!(
                "{}: the plans' patch {:?} differs from the architecture's img_size {:?}",
                path.display(),
                plans.patch,
                config.img_size
            )));
        }
        preprocessing.spacing = plans.spacing;
        preprocessing.ct_normalization = Some(plans.ct_normalization);
    }
    let labels = match stage {
        Stage::Init => BTreeMap::new(),
        Stage::Segmentation => options.labels.clone(),
    };
    let mut meta = ModelMetadata::new(
        ArchConfig::UnetrPp(config.clone()),
        labels,
        preprocessing,
        stage,
    );
    meta.order_classes = (stage == Stage::Init).then_some(with_heads).flatten();
    meta.provenance.source = Some(source(checkpoint)?);
    let model = Model::new(meta, Device::Cpu)?;
    load_state_dict(&model.vs, &tensors).map_err(|e| {
        incompatible(format!(
            "does not fit UNETR++ {}: {}",
            serde_json::to_string(config).unwrap_or_default(),
            e.message
        ))
    })?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::native_name;

    #[test]
    fn lwi_vms_names_map_to_monai_1x_names() {
        assert_eq!(
            native_name("out.conv.weight").as_deref(),
            Some("out.conv.conv.weight")
        );
        assert_eq!(
            native_name("module.vit.norm.bias").as_deref(),
            Some("vit.norm.bias")
        );
        assert_eq!(native_name("vit.patch_embedding.cls_token"), None);
        assert_eq!(
            native_name("encoder1.layer.norm1.num_batches_tracked"),
            None
        );
        assert_eq!(
            native_name("vit.temp_head2.weight").as_deref(),
            Some("vit.temp_head2.weight")
        );
    }
}
