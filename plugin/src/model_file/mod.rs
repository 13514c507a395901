//! The model file: one `.safetensors` holding every tensor plus, under `__metadata__["lwi"]`, a
//! JSON document saying what the tensors are (architecture and hyperparameters, labels,
//! preprocessing, stage, provenance). Loading rebuilds the architecture from the metadata and
//! then requires exactly its tensors, with their shapes: anything else is `MODEL_INCOMPATIBLE`.

use crate::error::{Error, ErrorKind, Result};
use crate::model::{ArchConfig, Network, PretextHeads, load_state_dict};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Device, Tensor, nn};

pub mod import;
pub mod nnunet_plans;
pub mod pickle;
pub mod preprocessing;
mod tensors;

pub use preprocessing::{
    CtNormalization, MonaiPreprocessing, NnUnetPreprocessing, Pipeline, Preprocessing,
};

pub(crate) use tensors::{tensor_from_view, write_safetensors};

pub const FORMAT: &str = "lwi-model";
/// 3: the preprocessing section holds its pipeline's fields only, tagged by `"pipeline"`.
/// 2: the architecture is `"arch"` + `"config"` of any registered architecture (UNETR++ added).
/// Files of versions 1 and 2 (a flat union of both pipelines' preprocessing fields) still load.
pub const FORMAT_VERSION: u32 = 3;

/// Ceilings of the preprocessing and label fields (docs/model-file.md); the architecture's are in
/// [`crate::model::limits`].
pub mod bounds {
    /// Voxel spacing, mm (10 µm to 10 cm).
    pub const SPACING_MM: [f64; 2] = [0.01, 100.0];
    /// Magnitude of any intensity (HU window, CT normalisation).
    pub const MAX_INTENSITY: f64 = 1e6;
    /// Smallest CT normalisation standard deviation.
    pub const MIN_SD: f64 = 1e-6;
    /// Bytes of one label name.
    pub const MAX_LABEL_NAME_BYTES: usize = 256;
    /// Bytes of a safetensors header (tensor table and metadata): the reader's own ceiling, which
    /// the writer checks too.
    pub const MAX_HEADER_BYTES: u64 = 100_000_000;
}

/// A spacing of three finite values within [`bounds::SPACING_MM`], else an error naming `what`.
pub fn check_spacing(what: &str, spacing: [f64; 3]) -> Result<()> {
    let [lo, hi] = bounds::SPACING_MM;
    if spacing.iter().all(|s| (lo..=hi).contains(s)) {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{what} {spacing:?} must be three values in [{lo}, {hi}] mm"
    )))
}

/// Label names: at most [`crate::model::limits::MAX_CLASSES`] of them, each at most
/// [`bounds::MAX_LABEL_NAME_BYTES`] long without control characters (the message never repeats
/// a name whole).
pub fn check_labels(what: &str, labels: &BTreeMap<u32, String>) -> Result<()> {
    let max = crate::model::limits::MAX_CLASSES;
    if labels.len() as u64 > max as u64 {
        return Err(Error::invalid(format!(
            "{what}: {} labels, at most {max}",
            labels.len()
        )));
    }
    let limit = bounds::MAX_LABEL_NAME_BYTES;
    for (id, name) in labels {
        if name.len() > limit || name.chars().any(char::is_control) {
            return Err(Error::invalid(format!(
                "{what}: the name of label {id} ({} bytes) must be at most {limit} bytes without \
                 control characters",
                name.len()
            )));
        }
    }
    Ok(())
}

/// What a model was trained for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Learnable weight initialization (self-supervised): 1 reconstruction channel + order heads.
    Init,
    /// Segmentation: one output channel per label.
    Segmentation,
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
    preprocessing: serde_json::Value,
    stage: Stage,
    provenance: Provenance,
}

impl TryFrom<MetadataDocument> for ModelMetadata {
    type Error = String;
    fn try_from(d: MetadataDocument) -> std::result::Result<Self, String> {
        let arch = ArchConfig::from_parts(&d.arch, &d.config.to_string(), "config")
            .map_err(|e| e.message)?;
        let preprocessing = Preprocessing::from_document(d.preprocessing, d.format_version)?;
        Ok(ModelMetadata {
            format: d.format,
            format_version: d.format_version,
            arch,
            order_classes: d.order_classes,
            labels: d.labels,
            preprocessing,
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
            preprocessing: m.preprocessing.to_document(),
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

    /// The `"lwi"` document of the model file `path` (None: the file has none), every field
    /// checked against its ceiling.
    fn from_document(path: &Path, doc: Option<&str>) -> Result<ModelMetadata> {
        let doc = doc.ok_or_else(|| Error::format(path, "safetensors file without lwi metadata (import PyTorch checkpoints with `lwi import`)"))?;
        let meta: ModelMetadata =
            crate::options::from_document(doc, "model metadata").map_err(|e| {
                Error::new(
                    ErrorKind::ModelIncompatible,
                    format!("{}: {}", path.display(), e.message),
                )
            })?;
        meta.validate().map_err(|e| in_file(path, e))?;
        Ok(meta)
    }

    /// The metadata of the model file `path`, from its header alone (the tensors are not read).
    pub fn read(path: &Path) -> Result<ModelMetadata> {
        use std::io::Read;
        let (file, len) = crate::io::files::open_regular(path)?;
        let mut file = std::io::BufReader::new(file);
        let mut prefix = [0u8; 8];
        let not_model =
            |why: &str| Error::format(path, format!("not a readable model file ({why})"));
        file.read_exact(&mut prefix)
            .map_err(|_| not_model("shorter than a header"))?;
        let n = u64::from_le_bytes(prefix);
        if n > bounds::MAX_HEADER_BYTES || n > len.saturating_sub(8) {
            return Err(not_model("header too large"));
        }
        let mut header = Vec::new();
        file.take(n)
            .read_to_end(&mut header)
            .map_err(|e| Error::io(path, e))?;
        let header: serde_json::Value =
            serde_json::from_slice(&header).map_err(|_| not_model("its header is not JSON"))?;
        let doc = header.pointer("/__metadata__/lwi").and_then(|d| d.as_str());
        Self::from_document(path, doc)
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
        if self.preprocessing.roi_size() != self.arch.img_size() {
            return bad(format!(
                "roi_size {:?} differs from the network's img_size {:?}",
                self.preprocessing.roi_size(),
                self.arch.img_size()
            ));
        }
        self.preprocessing
            .validate()
            .and_then(|()| check_labels("labels", &self.labels))
            .map_err(|e| Error::new(ErrorKind::ModelIncompatible, e.message))?;
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
            let max = crate::model::limits::MAX_ORDER_CLASSES;
            if !(2..=max).contains(&m) {
                return bad(format!(
                    "order_classes {m}: order prediction needs 2 to {max} slabs"
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
        let doc = header.metadata().as_ref().and_then(|m| m.get("lwi"));
        let meta = ModelMetadata::from_document(path, doc.map(String::as_str))?;
        // The sizes must agree with the file's own tensors before anything is allocated for the
        // network.
        let shapes: HashMap<String, Vec<i64>> = header
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let shape = info.shape.iter().map(|&d| i64::try_from(d).unwrap_or(-1));
                (name, shape.collect())
            })
            .collect();
        meta.arch
            .check_shapes(meta.order_classes, &shapes)
            .map_err(|e| in_file(path, e))?;
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
    /// A model read from an older format is written in the current one.
    pub fn save(&self, path: &Path) -> Result<()> {
        let meta = ModelMetadata {
            format_version: FORMAT_VERSION,
            ..self.meta.clone()
        };
        let doc = serde_json::to_string(&meta).map_err(|e| Error::internal(e.to_string()))?;
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
        v["device"] = crate::engine::device_name(self.vs.device()).into();
        v["file_sha256"] = self.file_sha256.clone().into();
        v
    }
}

fn in_file(path: &Path, e: Error) -> Error {
    Error::new(e.kind, format!("{}: {}", path.display(), e.message))
}

/// The sha256 of a file, hex: provenance and manifests name model files by it.
pub fn sha256_file(path: &Path) -> Result<String> {
    Ok(sha256_hex(&crate::io::read_regular(path)?))
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(bytes))
}
