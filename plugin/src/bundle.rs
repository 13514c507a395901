//! The model file: one `.safetensors` holding every tensor plus, under `__metadata__["lwi"]`, a
//! JSON document saying what the tensors are (architecture and hyperparameters, labels,
//! preprocessing, stage, provenance). Loading rebuilds the architecture from the metadata and
//! then requires exactly its tensors, with their shapes: anything else is `MODEL_INCOMPATIBLE`.

use crate::error::{Error, ErrorKind, Result};
use crate::io::write_atomically;
use crate::model::{ArchConfig, Network, PretextHeads, load_state_dict};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Device, Kind, Tensor, nn};

pub const FORMAT: &str = "lwi-model";
/// 2: the architecture is `"arch"` + `"config"` of any registered architecture (UNETR++ added).
/// Version 1 files (UNETR only, the same layout) still load.
pub const FORMAT_VERSION: u32 = 2;

/// What a model was trained for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Learnable weight initialization (self-supervised): 1 reconstruction channel + order heads.
    Init,
    /// Segmentation: one output channel per label.
    Segmentation,
}

/// How input volumes are prepared before the network sees them (method §1.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocessing {
    /// Orientation the volume is resampled into; always "RAS".
    pub orientation: String,
    /// Target voxel spacing in mm along x, y, z.
    pub spacing: [f64; 3],
    /// HU window mapped to [0, 1] with clipping.
    pub intensity_window: [f64; 2],
    /// Sliding-window / crop size in voxels (the network's `img_size`).
    pub roi_size: [i64; 3],
    /// Crop to the bounding box of voxels above the window's lower bound.
    pub crop_foreground: bool,
    /// Which pipeline prepares volumes: MONAI's (the fields above) or nnU-Net v1's.
    #[serde(default, skip_serializing_if = "Pipeline::is_monai")]
    pub pipeline: Pipeline,
    /// nnU-Net's CT normalisation (its plans' intensity properties), for the nnU-Net pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ct_normalization: Option<CtNormalization>,
}

/// How a model's input is prepared and its output put back (docs/models.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pipeline {
    /// MONAI's: RAS, spacing (trilinear), HU window, foreground crop, sliding window (UNETR).
    #[default]
    Monai,
    /// nnU-Net v1's (UNETR++): the stored voxel order, non-zero crop, spacing, CT normalisation,
    /// nnU-Net's sliding window with mirroring (`crate::nnunet`). `spacing` is then per stored axis.
    NnUnet,
}

impl Pipeline {
    fn is_monai(&self) -> bool {
        *self == Pipeline::Monai
    }
}

/// nnU-Net's "CT" normalisation: clip to the training foreground's 0.5 and 99.5 percentiles, then
/// subtract its mean and divide by its standard deviation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtNormalization {
    pub lower: f64,
    pub upper: f64,
    pub mean: f64,
    pub sd: f64,
}

impl Default for Preprocessing {
    fn default() -> Self {
        Preprocessing {
            orientation: "RAS".into(),
            spacing: [1.5, 1.5, 2.0],
            intensity_window: [-175.0, 250.0],
            roi_size: [96, 96, 96],
            crop_foreground: true,
            pipeline: Pipeline::Monai,
            ct_normalization: None,
        }
    }
}

/// Where a model came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Provenance {
    pub lwi_version: String,
    pub seed: Option<u64>,
    pub epochs: Option<u64>,
    pub dataset_fingerprint: Option<String>,
    /// Free text, e.g. "imported from X.pt (sha256 …)".
    pub source: Option<String>,
    /// Per-epoch training history of both stages (`lwi render --curves` draws it).
    #[serde(skip_serializing_if = "History::is_empty")]
    pub history: History,
}

/// The mean training loss and the validation metric of each epoch, per stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct History {
    pub init: Vec<EpochRecord>,
    pub fine_tune: Vec<EpochRecord>,
}

impl History {
    pub fn is_empty(&self) -> bool {
        self.init.is_empty() && self.fine_tune.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: u64,
    pub loss: f64,
    /// Mean validation Dice, on the epochs that validated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<f64>,
}

/// The `__metadata__["lwi"]` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "MetadataDocument", into = "MetadataDocument")]
pub struct ModelMetadata {
    pub format: String,
    pub format_version: u32,
    /// The architecture and its hyperparameters, stored as `"arch"` (its name) and `"config"`
    /// (the upstream constructor's keyword arguments).
    pub arch: ArchConfig,
    /// Classes of the order-prediction heads (the number of slabs m), when the file has them.
    pub order_classes: Option<i64>,
    /// Label value → name; a segmentation model's output channel c predicts label value c.
    pub labels: BTreeMap<u32, String>,
    pub preprocessing: Preprocessing,
    pub stage: Stage,
    pub provenance: Provenance,
}

/// The metadata as it is stored: strict about its fields, the architecture as name + config.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetadataDocument {
    format: String,
    format_version: u32,
    arch: String,
    config: serde_json::Value,
    order_classes: Option<i64>,
    labels: BTreeMap<u32, String>,
    preprocessing: Preprocessing,
    stage: Stage,
    provenance: Provenance,
}

impl TryFrom<MetadataDocument> for ModelMetadata {
    type Error = String;
    fn try_from(d: MetadataDocument) -> std::result::Result<Self, String> {
        let arch = ArchConfig::from_parts(&d.arch, &d.config.to_string(), "config")
            .map_err(|e| e.message)?;
        Ok(ModelMetadata {
            format: d.format,
            format_version: d.format_version,
            arch,
            order_classes: d.order_classes,
            labels: d.labels,
            preprocessing: d.preprocessing,
            stage: d.stage,
            provenance: d.provenance,
        })
    }
}

impl From<ModelMetadata> for MetadataDocument {
    fn from(m: ModelMetadata) -> Self {
        MetadataDocument {
            format: m.format,
            format_version: m.format_version,
            arch: m.arch.name().into(),
            config: m.arch.keyword_arguments(),
            order_classes: m.order_classes,
            labels: m.labels,
            preprocessing: m.preprocessing,
            stage: m.stage,
            provenance: m.provenance,
        }
    }
}

impl ModelMetadata {
    /// A fresh description of a `stage` model for `arch` and `labels`.
    pub fn new(
        arch: ArchConfig,
        labels: BTreeMap<u32, String>,
        preprocessing: Preprocessing,
        stage: Stage,
    ) -> Self {
        ModelMetadata {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            arch,
            order_classes: None,
            labels,
            preprocessing,
            stage,
            provenance: Provenance {
                lwi_version: env!("CARGO_PKG_VERSION").into(),
                ..Default::default()
            },
        }
    }

    /// The document must describe something lwi can build, consistently.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::new(ErrorKind::ModelIncompatible, m));
        if self.format != FORMAT || !(1..=FORMAT_VERSION).contains(&self.format_version) {
            return bad(format!(
                "model format '{}' version {} (this lwi reads '{FORMAT}' versions 1 to {FORMAT_VERSION})",
                self.format, self.format_version
            ));
        }
        if self.format_version == 1 && !matches!(self.arch, ArchConfig::Unetr(_)) {
            return bad("a version 1 model file holds a UNETR only".into());
        }
        self.arch
            .validate()
            .map_err(|e| Error::new(ErrorKind::ModelIncompatible, e.message))?;
        if self.preprocessing.orientation != "RAS" {
            return bad(format!(
                "preprocessing orientation '{}' (lwi models work in RAS)",
                self.preprocessing.orientation
            ));
        }
        if self.preprocessing.roi_size != self.arch.img_size() {
            return bad(format!(
                "roi_size {:?} differs from the network's img_size {:?}",
                self.preprocessing.roi_size,
                self.arch.img_size()
            ));
        }
        let p = &self.preprocessing;
        if let Some(n) = &p.ct_normalization {
            let finite = [n.lower, n.upper, n.mean, n.sd]
                .iter()
                .all(|v| v.is_finite());
            if !(finite && n.lower < n.upper && n.sd > 0.0) {
                return bad(format!(
                    "ct_normalization {n:?}: needs finite values, lower < upper and sd > 0"
                ));
            }
        }
        let window_ok = p.intensity_window.iter().all(|v| v.is_finite())
            && p.intensity_window[0] < p.intensity_window[1];
        if p.spacing.iter().any(|s| !s.is_finite() || *s <= 0.0) || !window_ok {
            return bad(format!(
                "preprocessing spacing {:?} / window {:?} are not usable",
                p.spacing, p.intensity_window
            ));
        }
        if self.stage == Stage::Segmentation {
            if let Some((id, name)) = self
                .labels
                .iter()
                .find(|(id, _)| i64::from(**id) >= self.arch.out_channels())
            {
                return bad(format!(
                    "label {id} ({name}) has no output channel: the network has {}",
                    self.arch.out_channels()
                ));
            }
        }
        if let Some(m) = self.order_classes {
            if m < 2 {
                return bad(format!(
                    "order_classes {m}: order prediction needs at least 2 slabs"
                ));
            }
        }
        Ok(())
    }
}

/// A model in memory: its description, its variables and the network built on them.
pub struct Model {
    pub meta: ModelMetadata,
    /// sha256 of the file the model was loaded from (manifests name models by it).
    pub file_sha256: Option<String>,
    pub vs: nn::VarStore,
    pub net: Network,
    pub order_heads: Option<PretextHeads>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// A freshly initialised model (MONAI's initialisation) on `device`.
    pub fn new(meta: ModelMetadata, device: Device) -> Result<Model> {
        meta.validate()?;
        let vs = nn::VarStore::new(device);
        let net = Network::new(&vs.root(), &meta.arch)?;
        let order_heads = meta.order_classes.map(|m| net.order_heads(&vs.root(), m));
        Ok(Model {
            meta,
            file_sha256: None,
            vs,
            net,
            order_heads,
        })
    }

    pub fn parameter_count(&self) -> usize {
        self.vs
            .trainable_variables()
            .iter()
            .map(Tensor::numel)
            .sum()
    }

    /// Reads a model file onto `device`.
    pub fn load(path: &Path, device: Device) -> Result<Model> {
        let bytes = crate::io::read_regular(path)?;
        let corrupt = |e: safetensors::SafeTensorError| {
            Error::format(path, format!("not a readable model file ({e})"))
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(corrupt)?;
        let doc = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("lwi"))
            .ok_or_else(|| Error::format(path, "safetensors file without lwi metadata (import PyTorch checkpoints with `lwi import`)"))?;
        let meta: ModelMetadata =
            crate::options::from_document(doc, "model metadata").map_err(|e| {
                Error::new(
                    ErrorKind::ModelIncompatible,
                    format!("{}: {}", path.display(), e.message),
                )
            })?;
        let file = safetensors::SafeTensors::deserialize(&bytes).map_err(corrupt)?;
        let mut tensors = HashMap::new();
        for (name, view) in file.tensors() {
            tensors.insert(name, tensor_from_view(path, &view)?);
        }
        let mut model = Model::new(meta, device).map_err(|e| in_file(path, e))?;
        load_state_dict(&model.vs, &tensors).map_err(|e| in_file(path, e))?;
        model.file_sha256 = Some(sha256_hex(&bytes));
        Ok(model)
    }

    /// Writes the model file (through a temporary name). Tensors are stored as float32, sorted by name.
    pub fn save(&self, path: &Path) -> Result<()> {
        let doc = serde_json::to_string(&self.meta).map_err(|e| Error::internal(e.to_string()))?;
        write_safetensors(
            path,
            self.vs.variables().into_iter().collect(),
            HashMap::from([("lwi".to_string(), doc)]),
        )
    }

    /// What `lwi info MODEL` and `lwi_model_info_json` show.
    pub fn info_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.meta).unwrap_or_default();
        v["parameters"] = self.parameter_count().into();
        v["device"] = device_name(self.vs.device()).into();
        v["file_sha256"] = self.file_sha256.clone().into();
        v
    }
}

/// Writes named tensors as float32 safetensors, sorted by name, with `metadata`, through a
/// temporary name: the same tensors give the same bytes.
pub(crate) fn write_safetensors(
    path: &Path,
    mut named: Vec<(String, Tensor)>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut blobs = Vec::with_capacity(named.len());
    for (name, t) in &named {
        let t = t
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?;
        let mut data = vec![0u8; t.numel() * 4];
        t.f_copy_data_u8(&mut data, t.numel())?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        blobs.push((name.clone(), shape, data));
    }
    let views = blobs
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::internal(format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::internal(e.to_string()))?;
    write_atomically(path, &bytes)
}

fn in_file(path: &Path, e: Error) -> Error {
    Error::new(e.kind, format!("{}: {}", path.display(), e.message))
}

/// A float tensor of a safetensors file, as float32.
pub(crate) fn tensor_from_view(
    path: &Path,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<Tensor> {
    use safetensors::Dtype;
    let kind = match view.dtype() {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        other => {
            return Err(Error::new(
                ErrorKind::ModelIncompatible,
                format!(
                    "{}: tensor dtype {other:?} is not a float type",
                    path.display()
                ),
            ));
        }
    };
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?.f_to_kind(Kind::Float)?)
}

/// The sha256 of a file, hex: provenance and manifests name model files by it.
pub fn sha256_file(path: &Path) -> Result<String> {
    Ok(sha256_hex(&crate::io::read_regular(path)?))
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(bytes))
}

/// "cpu" or "cuda:N".
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}
