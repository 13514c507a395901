//! Importing PyTorch checkpoints (`.pt`, nnU-Net v1's `.model`) of UNETR and UNETR++ into lwi
//! model files.
//!
//! Two key layouts are understood: MONAI 1.6.1's `UNETR.state_dict()`, which is lwi's own, and the
//! LWI-VMS release (MONAI 0.7 names: `out.conv.*` instead of `out.conv.conv.*`, an unused
//! `vit.patch_embedding.cls_token`, an unused residual `conv3` in every ResBlock, no
//! `norm_cross_attn`, and the order heads `vit.temp_head{1..4}`). A plain state dict or a dict
//! holding one under `state_dict` (`{"epoch": …, "best_acc": …, "state_dict": {…}}`) both work.
//!
//! The pickles are vetted first by [`crate::model_file::pickle`] against an allow-list ([`CHECKPOINT`]); the
//! tensors are then read by `pytorch-reader`, which rebuilds only tensors and plain containers.
//! Neither executes code from the file. This path is used only by `lwi import`.

use super::pickle::{self, PLAIN_DATA, Rules, quoted};
use super::{
    Model, ModelMetadata, MonaiPreprocessing, NnUnetPreprocessing, Preprocessing, Stage,
    sha256_file,
};
use crate::error::{Error, ErrorKind, Result};
use crate::model::unetr_pp::UnetrPpConfig;
use crate::model::{ArchConfig, Architecture, UnetrConfig, load_state_dict};
use pytorch_reader::{DType, FileFormat, PytorchError, PytorchReader};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
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
    /// Absent: the default architecture.
    #[serde(default)]
    arch: Option<String>,
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
    MonaiPreprocessing::default().spacing
}

fn default_window() -> [f64; 2] {
    MonaiPreprocessing::default().intensity_window
}

/// The JSON options (`{"arch", "arch_config", "labels", "spacing", "window", …}`): the
/// architecture, and the rest of the options (`config` left at UNETR's default; [`import`] sets it).
fn parse_options(json: &str) -> Result<(ArchConfig, ImportOptions)> {
    let shape = serde_json::json!({"arch_config": {}, "labels": {}});
    let o: ImportOptionsJson = crate::options::parse_shaped(json, "import options", &shape)?;
    let arch = ArchConfig::from_parts(
        o.arch.as_deref().unwrap_or(ArchConfig::default().name()),
        &o.arch_config.to_string(),
        "import options: arch_config",
    )?;
    super::check_labels("import options: labels", &o.labels)?;
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
/// Its pickles are vetted first ([`CHECKPOINT`]); no tensor may hold more bytes than the file, nor
/// all of them together more than twice the file (a tied weight is stored once and named twice), so
/// a view such as a stride-0 expand is refused before it is materialised.
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
    let file_len = crate::io::check_regular(path)?;
    let container = vet_pickles(path)?;
    let reader = match PytorchReader::with_top_level_key(path, "state_dict") {
        Ok(r) => r,
        Err(PytorchError::KeyNotFound(_)) => PytorchReader::new(path).map_err(fail)?,
        Err(e) => return Err(fail(e)),
    };
    let read_as = &reader.metadata().format_type;
    if container != (*read_as == FileFormat::Zip) {
        return Err(Error::format(
            path,
            format!("the container was vetted as another than the {read_as:?} it is read as"),
        ));
    }
    let mut out = HashMap::new();
    let mut total = 0u64;
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
                    format!(
                        "tensor {} has dtype {other:?}; weights are floating point",
                        quoted(&name)
                    ),
                ));
            }
        };
        let size = t.byte_len() as u64;
        total = total.saturating_add(size);
        let what = || format!("tensor {} ({:?} {:?})", quoted(&name), t.dtype(), t.shape());
        if size > file_len {
            return Err(Error::format(
                path,
                format!(
                    "{} holds {size} bytes, more than the {file_len}-byte file stores; a weight is stored whole, not as a view of fewer bytes",
                    what()
                ),
            ));
        }
        if total > file_len.saturating_mul(2) {
            return Err(Error::format(
                path,
                format!(
                    "the tensors up to {} hold {total} bytes, more than twice the {file_len}-byte file stores (a tied weight is named twice, no weight more)",
                    what()
                ),
            ));
        }
        let bytes = t
            .read()
            .map_err(|e| Error::format(path, format!("tensor {}: {e}", quoted(&name))))?;
        let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
        out.insert(name, Tensor::f_from_data_size(&bytes, &shape, kind)?);
    }
    Ok(out)
}

/// What a checkpoint's pickle may name: tensors (rebuilt from typed storages), torch's dtypes,
/// devices and sizes; what a trainer keeps beside its weights ([`PLAIN_DATA`]: `OrderedDict`,
/// numpy scalars, arrays and dtypes); and `_codecs.encode`, protocol 2's spelling of the bytes a
/// numpy scalar holds. A trainer's class, a callable such as `posix.system`, a whole pickled
/// `nn.Module` is refused: lwi never runs it, and a file that names it is not a plain checkpoint.
/// docs/formats.md lists the same.
pub const CHECKPOINT: Rules = Rules {
    not_held: "a checkpoint does not hold",
    globals: &[TORCH, PLAIN_DATA, &[("_codecs", "encode")]],
    persistent_ids: true,
};

/// The torch globals `torch.save` writes for tensors, parameters, dtypes, devices and sizes.
const TORCH: &[(&str, &str)] = &[
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "FloatStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
    ("torch", "float32"),
    ("torch", "float64"),
    ("torch", "float16"),
    ("torch", "bfloat16"),
    ("torch", "int64"),
    ("torch", "int32"),
    ("torch", "int16"),
    ("torch", "int8"),
    ("torch", "uint8"),
    ("torch", "bool"),
    ("torch", "device"),
    ("torch", "Size"),
];

/// Reads every pickle the checkpoint reader will (never running one), refusing any that names a
/// global outside [`CHECKPOINT`]: a ZIP's `data.pkl`, or the pickles a legacy file (or a plain
/// pickle) starts with. Whether the file is a ZIP.
fn vet_pickles(path: &Path) -> Result<bool> {
    let vet = |bytes: &[u8], at: usize, what: &str| {
        pickle::read(bytes, at, &CHECKPOINT)
            .map(|(_, end)| end)
            .map_err(|e| Error::format(path, format!("{what}: {}", e.message)))
    };
    let mut magic = Vec::new();
    let (file, _) = crate::io::files::open_regular(path)?;
    file.take(262)
        .read_to_end(&mut magic)
        .map_err(|e| Error::io(path, e))?;
    if magic.starts_with(b"PK\x03\x04") || magic.starts_with(b"PK\x05\x06") {
        for (name, bytes) in zip_pickles(path)? {
            vet(&bytes, 0, &quoted(&name))?;
        }
        return Ok(true);
    }
    if magic.get(257..262) == Some(b"ustar") {
        return Err(Error::unsupported(format!(
            "{}: PyTorch's TAR container (before 0.1.10) is not read; save the weights again with torch.save",
            path.display()
        )));
    }
    // A legacy file: magic number, protocol, system info, the data, the storage keys; a plain
    // pickle: one.
    let head = pickle::read_head(path)?;
    let mut at = 0;
    for _ in 0..5 {
        if at == head.len() {
            break;
        }
        at = vet(&head, at, &format!("the pickle at byte {at}"))?;
    }
    Ok(false)
}

/// The `data.pkl` entries of a ZIP checkpoint (wherever the archive roots them), each at most
/// [`pickle::MAX_BYTES`].
fn zip_pickles(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let bad = |e: zip::result::ZipError| Error::format(path, format!("not a readable ZIP ({e})"));
    let (file, _) = crate::io::files::open_regular(path)?;
    let mut zip = zip::ZipArchive::new(file).map_err(bad)?;
    let names: Vec<String> = zip
        .file_names()
        .collect::<zip::result::ZipResult<Vec<_>>>()
        .map_err(bad)?
        .into_iter()
        .filter(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
        .map(|n| n.into_owned())
        .collect();
    let mut out = Vec::new();
    for name in names {
        let mut entry = zip.by_name(&name).map_err(bad)?;
        let size = entry.size();
        if size > pickle::MAX_BYTES {
            return Err(Error::format(
                path,
                format!(
                    "{} is {size} bytes; a pickle lwi reads is at most {} bytes",
                    quoted(&name),
                    pickle::MAX_BYTES
                ),
            ));
        }
        let bytes = pickle::read_up_to(path, &mut entry, size)?;
        out.push((name, bytes));
    }
    Ok(out)
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

/// Builds an lwi model from a UNETR checkpoint; every tensor the architecture needs must be in it.
pub fn import_unetr(checkpoint: &Path, options: &ImportOptions) -> Result<Model> {
    let mut tensors = crate::model::unetr::import::renamed(read_checkpoint(checkpoint)?);

    let preprocessing = Preprocessing::Monai(MonaiPreprocessing {
        spacing: options.spacing,
        intensity_window: options.window,
        roi_size: options.config.img_size,
        ..Default::default()
    });
    let first_head = format!("{}1.weight", options.config.order_head_prefix());
    let with_heads = tensors.get(&first_head).map(|w| w.size()[0]);
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
    crate::model::unetr::import::fit_monai_0_7(&mut tensors, &model.vs.variables());
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
/// `plot_stuff`, `epoch`, …) or a plain state dict, renamed by `model::unetr_pp::import`. With
/// `out_channels` 1 and the order heads `temp_head1..4` it is an init-train (stage 1) model; a
/// segmentation checkpoint's order heads (LWI-VMS keeps them in stage 2) are dropped.
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
    let mut tensors = crate::model::unetr_pp::import::renamed(read_checkpoint(checkpoint)?)
        .map_err(|e| incompatible(e.message))?;
    let heads = config.order_head_prefix();
    let with_heads = tensors
        .get(&format!("{heads}1.weight"))
        .map(|w| w.size()[0]);
    let stage = if with_heads.is_some() && config.out_channels == 1 {
        Stage::Init
    } else {
        tensors.retain(|k, _| !k.starts_with(heads));
        Stage::Segmentation
    };
    let mut preprocessing = NnUnetPreprocessing {
        spacing: options.spacing,
        roi_size: config.img_size,
        ct_normalization: options.ct_normalization.map(|[lower, upper, mean, sd]| {
            super::CtNormalization {
                lower,
                upper,
                mean,
                sd,
            }
        }),
    };
    if let Some(path) = &options.plans {
        let plans = super::nnunet_plans::read(path)?;
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
        Preprocessing::NnUnet(preprocessing),
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
    use super::read_checkpoint;
    use std::io::Write;

    /// A PyTorch ZIP checkpoint as torch.save lays it out: `archive/data.pkl` and the storage
    /// `archive/data/0` holding two floats, 1 and 2.
    fn zip_checkpoint(dir: &std::path::Path, data_pkl: &[u8]) -> std::path::PathBuf {
        let path = dir.join("ckpt.pt");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in [
            ("archive/data.pkl", data_pkl),
            ("archive/data/0", &[0, 0, 0x80, 0x3f, 0, 0, 0, 0x40][..]),
            ("archive/byteorder", b"little"),
        ] {
            zip.start_file(name, stored).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
        path
    }

    /// `_rebuild_tensor_v2(storage 0 (2 floats), 0, SIZE, STRIDE, False, OrderedDict())`, as
    /// protocol 2 spells it; SIZE and STRIDE are pickled 1-tuples.
    fn tensor(size: &[u8], stride: &[u8]) -> Vec<u8> {
        let mut p = b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQK\x00".to_vec();
        p.extend(size);
        p.extend(stride);
        p.extend(b"\x89ccollections\nOrderedDict\n)RtR");
        p
    }

    /// `{"state_dict": {"w": TENSOR}, "meta": META}`.
    fn checkpoint(tensor: &[u8], meta: &[u8]) -> Vec<u8> {
        let mut p = b"\x80\x02}(X\x0a\x00\x00\x00state_dict}X\x01\x00\x00\x00w".to_vec();
        p.extend(tensor);
        p.extend(b"sX\x04\x00\x00\x00meta");
        p.extend(meta);
        p.extend(b"u.");
        p
    }

    const TWO: &[u8] = b"K\x02\x85";
    const DENSE: &[u8] = b"K\x01\x85";

    #[test]
    fn a_plain_zip_checkpoint_reads() {
        let dir = tempfile::tempdir().unwrap();
        let device = b"ctorch\ndevice\nX\x03\x00\x00\x00cpu\x85R";
        let path = zip_checkpoint(dir.path(), &checkpoint(&tensor(TWO, DENSE), device));
        let w = &read_checkpoint(&path).unwrap()["w"];
        assert_eq!(Vec::<f32>::try_from(w).unwrap(), [1.0, 2.0]);
    }

    #[test]
    fn a_foreign_global_in_an_allowed_calls_arguments_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let device = b"ctorch\ndevice\ncposix\nsystem\nX\x04\x00\x00\x00echo\x85R\x85R";
        let path = zip_checkpoint(dir.path(), &checkpoint(&tensor(TWO, DENSE), device));
        let e = read_checkpoint(&path).unwrap_err();
        assert!(e.message.contains("archive/data.pkl: the pickle names the Python global posix.system, which a checkpoint does not hold"), "{}", e.message);
    }

    #[test]
    fn a_foreign_call_built_with_module_state_is_refused() {
        // posix.system("echo") given {"_parameters": {"w": …}, "_buffers": {}, "_modules": {}}:
        // read as a module's state dict were the call not vetted.
        let mut module = b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00echo\x85R}(X\x0b\x00\x00\x00_parameters}X\x01\x00\x00\x00w".to_vec();
        module.extend(tensor(TWO, DENSE));
        module.extend(b"sX\x08\x00\x00\x00_buffers}X\x08\x00\x00\x00_modules}ub.");
        let dir = tempfile::tempdir().unwrap();
        let e = read_checkpoint(&zip_checkpoint(dir.path(), &module)).unwrap_err();
        assert!(e.message.contains("global posix.system,"), "{}", e.message);
    }

    #[test]
    fn a_view_of_more_bytes_than_the_file_is_refused_before_it_is_read() {
        // 4 bytes of storage seen with stride 0 as 1,000,000 floats (4 MB); 2.5e9 would be 10 GB.
        let dir = tempfile::tempdir().unwrap();
        let million = b"J\x40\x42\x0f\x00\x85";
        let path = zip_checkpoint(
            dir.path(),
            &checkpoint(&tensor(million, b"K\x00\x85"), b"N"),
        );
        let e = read_checkpoint(&path).unwrap_err();
        let expected = "tensor w (F32 [1000000]) holds 4000000 bytes, more than the";
        assert!(e.message.contains(expected), "{}", e.message);
    }
}
