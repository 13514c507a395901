//! What a training run is asked to do: the dataset, the architecture, the recipe (the stage's
//! optimizer, schedule, sampling, augmentation and loss, as data) and any field of it overridden,
//! checked when read.

use super::nnunet_augment::NnUnetAugment;
use crate::distributed::DistributedConfig;
use crate::error::{Error, Result};
use crate::model::ArchConfig;
use crate::model_file::{Pipeline, Stage};
use crate::pretext::{Grouping, PretextConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A training recipe: the defaults of every field, chosen from the architecture unless given.
/// Named by what it is; the names of the architectures they were written for (`unetr`,
/// `unetr_pp`) still read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recipe {
    /// MONAI's BTCV recipe (UNETR): RAS and HU window, AdamW, warmup-cosine, pos/neg crops, DiceCE.
    #[serde(rename = "monai", alias = "unetr")]
    Monai,
    /// nnU-Net v1's (UNETR++): dataset fingerprint, median spacing, CT normalisation, SGD with
    /// Nesterov momentum, poly 0.9, patches with foreground oversampling, nnU-Net's augmentation,
    /// Dice + CE over the deep-supervision outputs.
    #[serde(rename = "nnunet_v1", alias = "unetr_pp")]
    NnUnetV1,
}

impl Recipe {
    pub fn name(self) -> &'static str {
        match self {
            Recipe::Monai => "monai",
            Recipe::NnUnetV1 => "nnunet_v1",
        }
    }

    /// The pipeline that prepares the recipe's volumes (and the model's, once trained).
    pub fn pipeline(self) -> Pipeline {
        match self {
            Recipe::Monai => Pipeline::Monai,
            Recipe::NnUnetV1 => Pipeline::NnUnet,
        }
    }

    /// The recipe whose pipeline is `pipeline` (an init model's: its fine-tune's default).
    fn of_pipeline(pipeline: Pipeline) -> Recipe {
        match pipeline {
            Pipeline::Monai => Recipe::Monai,
            Pipeline::NnUnet => Recipe::NnUnetV1,
        }
    }

    /// The recipe an architecture was published with: its default.
    fn for_arch(arch: &ArchConfig) -> Recipe {
        match arch {
            ArchConfig::Unetr(_) => Recipe::Monai,
            ArchConfig::UnetrPp(_) => Recipe::NnUnetV1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// `torch.optim.AdamW` (betas 0.9/0.999, eps 1e-8).
    Adamw,
    /// `torch.optim.SGD` with `momentum` and `nesterov`.
    Sgd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Linear warmup over `warmup_epochs`, then cosine to 0, stepped every `sched_step_every`.
    WarmupCosine,
    /// nnU-Net's `poly_lr`: lr · (1 − epoch / epochs)^`poly_exponent`.
    Poly,
}

/// Augmentation probabilities (method §1.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augment {
    /// Per axis.
    pub flip_p: f64,
    /// Rotation by k·90°, k ∈ {1, 2, 3}, in the x–y plane.
    pub rot90_p: f64,
    /// v ← v·(1 + f), f ~ U(−0.1, 0.1).
    pub scale_p: f64,
    /// v ← v + o, o ~ U(−0.1, 0.1).
    pub shift_p: f64,
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            flip_p: 0.2,
            rot90_p: 0.2,
            scale_p: 0.1,
            shift_p: 0.1,
        }
    }
}

/// Everything a training run is told; every field has its recipe's default and unknown fields are
/// errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// MSD/nnU-Net dataset.json or MONAI datalist.
    pub dataset: PathBuf,
    /// The model file to write; fine-tune also keeps the best validation model as `NAME.best.safetensors`;
    /// the resumable checkpoint is `OUT.ckpt`.
    pub out: PathBuf,
    /// The architecture document: `"arch"` ("unetr", the default, or "unetr_pp") and the upstream
    /// constructor's keyword arguments; `out_channels` is decided by the stage.
    #[serde(with = "arch_document")]
    pub arch: ArchConfig,
    /// Where the other fields' defaults come from; absent: the architecture's.
    pub recipe: Recipe,
    /// fine-tune: the init-train model to start from; absent = random initialisation.
    pub init: Option<PathBuf>,
    pub epochs: u64,
    /// Iterations per epoch; absent: one pass over the training cases (⌈cases / global batch⌉).
    pub iterations_per_epoch: Option<u64>,
    pub seed: u64,
    /// "auto", "cpu" or "cuda:N"; absent: the engine's device.
    pub device: Option<String>,
    pub threads: Option<i32>,
    /// Absent: the recipe's for the stage (unetr 1e-4; unetr_pp 1e-4 for init-train, 1e-2 for
    /// fine-tune).
    pub lr: Option<f64>,
    pub optimizer: OptimizerKind,
    /// SGD only.
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub schedule: ScheduleKind,
    pub warmup_epochs: u64,
    /// Epochs between scheduler steps: 1 (upstream MONAI), 100 reproduces the released code (§7.2).
    pub sched_step_every: u64,
    pub poly_exponent: f64,
    /// The gradients' total L2 norm is clipped to this (`clip_grad_norm_`).
    pub grad_clip: Option<f64>,
    /// monai recipe: crops per volume per iteration.
    pub num_samples: i64,
    /// monai recipe: positive : negative crop-centre ratio.
    pub pos: f64,
    pub neg: f64,
    /// Samples per iteration on each rank (the global batch is this times the world size): unetr
    /// recipe, volumes (each giving `num_samples` crops); nnunet_v1 recipe, patches.
    pub batch_size: i64,
    /// nnunet_v1 recipe: the share of each batch forced to hold foreground (nnU-Net's 0.33).
    pub oversample_foreground: f64,
    /// Voxel spacing in mm (x, y, z); absent: the nnunet_v1 recipe uses the training cases' median.
    pub spacing: Option<[f64; 3]>,
    /// monai recipe: the HU window mapped to [0, 1].
    pub window: [f64; 2],
    /// monai recipe's augmentation.
    pub augment: Augment,
    /// nnunet_v1 recipe's augmentation (nnU-Net v1's).
    pub nnunet_augment: NnUnetAugment,
    /// nnunet_v1 recipe: keep each prepared case in the preprocessed cache on disk (read
    /// memory-mapped) instead of in memory.
    pub cache: bool,
    /// The cache's folder; absent: `lwi-cache` beside `out`.
    pub cache_dir: Option<PathBuf>,
    /// nnunet_v1 recipe: Dice over the whole batch (nnU-Net's `batch_dice`) rather than per sample.
    pub batch_dice: bool,
    pub pretext: PretextConfig,
    /// bf16 autocast on CUDA.
    pub amp: bool,
    pub val_every: u64,
    /// The labels the validation Dice is the mean of; absent: every label of the dataset
    /// (Synapse's 8 organs of the method: `[1, 2, 3, 4, 6, 7, 8, 11]`).
    pub val_labels: Option<Vec<u32>>,
    pub checkpoint_every: u64,
    /// Continue from `OUT.ckpt` if it exists.
    pub resume: bool,
    /// false: train without the network's dropout (for ablations, and for a data-parallel run
    /// to equal one process exactly: dropout masks are drawn per rank).
    pub dropout: bool,
    /// Data-parallel training: the launcher's environment is read unless `enabled` is false.
    pub distributed: DistributedConfig,
    /// Whether the document set `arch.out_channels` (the stage decides it; a different explicit
    /// value is worth a warning, the default is not).
    #[serde(skip)]
    pub out_channels_given: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig::recipe(Recipe::Monai, ArchConfig::default())
    }
}

/// The most epochs a run may ask for: far beyond any recipe (the method's longest is 5000), small
/// enough that iteration counts cannot overflow.
pub const MAX_EPOCHS: u64 = 1_000_000;

impl TrainConfig {
    /// A recipe's defaults for `arch`.
    pub fn recipe(recipe: Recipe, arch: ArchConfig) -> TrainConfig {
        let unetr = TrainConfig {
            dataset: PathBuf::new(),
            out: PathBuf::new(),
            arch,
            recipe,
            init: None,
            epochs: 100,
            iterations_per_epoch: None,
            seed: 0,
            device: None,
            threads: None,
            lr: None,
            optimizer: OptimizerKind::Adamw,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 1e-5,
            schedule: ScheduleKind::WarmupCosine,
            warmup_epochs: 50,
            sched_step_every: 1,
            poly_exponent: 0.9,
            grad_clip: None,
            num_samples: 4,
            pos: 1.0,
            neg: 1.0,
            batch_size: 1,
            oversample_foreground: 0.33,
            spacing: Some([1.5, 1.5, 2.0]),
            window: [-175.0, 250.0],
            augment: Augment::default(),
            nnunet_augment: NnUnetAugment::default(),
            cache: true,
            cache_dir: None,
            batch_dice: true,
            pretext: PretextConfig::default(),
            amp: true,
            val_every: 100,
            val_labels: None,
            checkpoint_every: 1,
            resume: false,
            dropout: true,
            distributed: DistributedConfig::default(),
            out_channels_given: false,
        };
        match recipe {
            Recipe::Monai => unetr,
            // unetrpp.md (d): the upstream trainer's settings, LWI's pretext (b.6).
            Recipe::NnUnetV1 => TrainConfig {
                epochs: 1000,
                iterations_per_epoch: Some(250),
                batch_size: 2,
                optimizer: OptimizerKind::Sgd,
                momentum: 0.99,
                nesterov: true,
                weight_decay: 3e-5,
                schedule: ScheduleKind::Poly,
                grad_clip: Some(12.0),
                spacing: None,
                amp: false,
                val_every: 50,
                pretext: PretextConfig {
                    slabs: 4,
                    cube: 4,
                    mask_ratio: 0.4,
                    grouping: Grouping::Slab,
                    per_batch: true,
                    ..Default::default()
                },
                ..unetr
            },
        }
    }

    /// The pretext task as this run poses it: its slabs along the depth axis of the recipe's
    /// pipeline, whichever the architecture.
    pub fn pretext_task(&self) -> PretextConfig {
        PretextConfig {
            axis: Some(self.recipe.pipeline().depth_axis()),
            ..self.pretext.clone()
        }
    }

    /// The learning rate of `stage`: the config's, else the recipe's.
    pub fn learning_rate(&self, stage: Stage) -> f64 {
        self.lr.unwrap_or(match (self.recipe, stage) {
            (Recipe::NnUnetV1, Stage::Segmentation) => 1e-2,
            _ => 1e-4,
        })
    }

    /// Parses and checks a training configuration: the recipe's defaults (from `"recipe"`, else the
    /// architecture's), then every field the document gives (nested objects field by field); every
    /// value out of range is `InvalidArgument` naming the field and the value.
    pub fn from_json(json: &str) -> Result<TrainConfig> {
        const WHAT: &str = "training config";
        let doc: Value = match crate::options::document(json, WHAT) {
            Ok(Value::Array(layers)) => layered(layers)?,
            Ok(v @ Value::Object(_)) => v,
            // not an object (or empty): the parser words the error, the check the missing fields
            _ => {
                let c: TrainConfig = crate::options::parse(json, WHAT)?;
                c.check()?;
                return Ok(c);
            }
        };
        // fine-tune from an init-train model: its architecture and its recipe, unless the document
        // gives them (which must then be the same)
        let init = match doc.get("init") {
            Some(Value::String(p)) => Some(InitModel::read(Path::new(p))?),
            _ => None,
        };
        let arch = match (doc.get("arch"), &init) {
            (None, Some(init)) => init.arch.clone(),
            (None, None) => ArchConfig::default(),
            (Some(a @ Value::Object(_)), init) => {
                let arch = ArchConfig::from_document(a, "training config: arch")?;
                if let Some(init) = init {
                    init.same_architecture(&arch)?;
                }
                arch
            }
            (Some(other), _) => {
                return Err(Error::invalid(format!(
                    "{WHAT}: \"arch\" must be an architecture document {{\"arch\": \"unetr_pp\", …}}, got {}",
                    crate::options::describe(other)
                )));
            }
        };
        let out_channels_given = doc.pointer("/arch/out_channels").is_some();
        let recipe = match (doc.get("recipe"), &init) {
            (None, Some(init)) => init.recipe,
            (None, None) => Recipe::for_arch(&arch),
            (Some(r), init) => {
                let recipe: Recipe = serde_json::from_value(r.clone()).map_err(|_| {
                    Error::invalid(format!(
                        "{WHAT}: \"recipe\" must be \"monai\" (or \"unetr\") or \"nnunet_v1\" (or \"unetr_pp\"), got {}",
                        crate::options::describe(r)
                    ))
                })?;
                if let Some(init) = init {
                    init.same_recipe(recipe)?;
                }
                recipe
            }
        };
        let mut merged = serde_json::to_value(TrainConfig::recipe(recipe, arch))
            .map_err(|e| Error::internal(e.to_string()))?;
        let shape = merged.clone();
        if let (Value::Object(base), Value::Object(given)) = (&mut merged, doc) {
            for (key, value) in given {
                match (base.get_mut(&key), value) {
                    (Some(Value::Object(b)), Value::Object(g)) if key != "arch" => b.extend(g),
                    (_, value) => {
                        base.insert(key, value);
                    }
                }
            }
        }
        let mut c: TrainConfig = crate::options::parse_shaped(&merged.to_string(), WHAT, &shape)?;
        c.out_channels_given = out_channels_given;
        c.check()?;
        Ok(c)
    }

    /// Every value in range, or an error naming the field and the value.
    fn check(&self) -> Result<()> {
        let c = self;
        if c.dataset.as_os_str().is_empty() || c.out.as_os_str().is_empty() {
            return Err(Error::invalid(
                "training config: \"dataset\" and \"out\" are required",
            ));
        }
        let counts = [
            ("epochs", c.epochs as i64),
            ("num_samples", c.num_samples),
            ("batch_size", c.batch_size),
            ("sched_step_every", c.sched_step_every as i64),
            ("checkpoint_every", c.checkpoint_every as i64),
            ("val_every", c.val_every as i64),
            (
                "iterations_per_epoch",
                c.iterations_per_epoch.map_or(1, |n| n as i64),
            ),
        ];
        if let Some((name, v)) = counts.iter().find(|(_, v)| *v < 1) {
            return Err(Error::invalid(format!(
                "training config: {name} must be at least 1, got {v}"
            )));
        }
        let ranges = [
            ("lr", c.lr.unwrap_or(1.0), f64::MIN_POSITIVE, f64::MAX),
            ("weight_decay", c.weight_decay, 0.0, f64::MAX),
            ("momentum", c.momentum, 0.0, 1.0),
            ("poly_exponent", c.poly_exponent, 0.0, f64::MAX),
            (
                "grad_clip",
                c.grad_clip.unwrap_or(1.0),
                f64::MIN_POSITIVE,
                f64::MAX,
            ),
            ("oversample_foreground", c.oversample_foreground, 0.0, 1.0),
            ("pos", c.pos, 0.0, f64::MAX),
            ("neg", c.neg, 0.0, f64::MAX),
        ];
        if let Some((name, v, lo, hi)) = ranges.iter().find(|(_, v, lo, hi)| !(v >= lo && v <= hi))
        {
            let range = if *hi == f64::MAX {
                if *lo > 0.0 {
                    "positive".to_string()
                } else {
                    "non-negative".to_string()
                }
            } else {
                format!("in [{lo}, {hi}]")
            };
            return Err(Error::invalid(format!(
                "training config: {name} must be {range}, got {v}"
            )));
        }
        if c.pos + c.neg <= 0.0 {
            return Err(Error::invalid(
                "training config: pos + neg must be positive",
            ));
        }
        if c.epochs > MAX_EPOCHS || c.iterations_per_epoch.unwrap_or(0) > MAX_EPOCHS {
            return Err(Error::invalid(format!(
                "training config: epochs {} or iterations_per_epoch {:?} is more than {MAX_EPOCHS}",
                c.epochs, c.iterations_per_epoch
            )));
        }
        if c.window[0].partial_cmp(&c.window[1]) != Some(std::cmp::Ordering::Less) {
            return Err(Error::invalid(format!(
                "training config: window {:?} must be [low, high] with low < high (HU)",
                c.window
            )));
        }
        if let Some(s) = c.spacing {
            crate::model_file::check_spacing("training config: spacing", s)?;
        }
        if c.recipe == Recipe::Monai && c.spacing.is_none() {
            return Err(Error::invalid(
                "training config: the monai recipe needs \"spacing\" (it has no dataset fingerprint)",
            ));
        }
        c.distributed.check()?;
        c.nnunet_augment.check().map_err(|e| {
            Error::invalid(format!("training config: nnunet_augment: {}", e.message))
        })?;
        c.arch
            .validate()
            .map_err(|e| Error::invalid(format!("training config: arch: {}", e.message)))
    }

    /// Where the preprocessed cache lives.
    pub(super) fn cache_path(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(|| {
            let dir = self.out.parent().filter(|p| !p.as_os_str().is_empty());
            dir.unwrap_or(Path::new(".")).join("lwi-cache")
        })
    }

    pub(super) fn checkpoint_path(&self) -> PathBuf {
        with_suffix(&self.out, ".ckpt")
    }

    /// What every rank of a data-parallel job must agree on: the config without the fields that
    /// are each rank's own (its rank, its device and threads).
    pub(super) fn digest(&self) -> [u8; 32] {
        use sha2::Digest;
        let mut common = self.clone();
        (common.distributed.rank, common.distributed.local_rank) = (None, None);
        (common.device, common.threads) = (None, None);
        let text = serde_json::to_string(&common).unwrap_or_default();
        sha2::Sha256::digest(text.as_bytes()).into()
    }
}

/// The init-train model a fine-tune starts from, as its header describes it.
struct InitModel {
    path: PathBuf,
    /// `out_channels` aside: the stage decides it.
    arch: ArchConfig,
    /// The recipe whose pipeline its model file records.
    recipe: Recipe,
}

impl InitModel {
    fn read(path: &Path) -> Result<InitModel> {
        let meta = crate::model_file::ModelMetadata::read(path)?;
        if meta.stage != Stage::Init {
            return Err(Error::new(
                crate::error::ErrorKind::ModelIncompatible,
                format!(
                    "training config: init {}: not an init-train model (stage {:?})",
                    path.display(),
                    meta.stage
                ),
            ));
        }
        Ok(InitModel {
            path: path.to_path_buf(),
            arch: meta.arch,
            recipe: Recipe::of_pipeline(meta.preprocessing.pipeline()),
        })
    }

    /// A recipe the document gives must be the init model's: its weights learnt the volumes as
    /// that recipe's pipeline lays them out.
    fn same_recipe(&self, recipe: Recipe) -> Result<()> {
        if recipe == self.recipe {
            return Ok(());
        }
        Err(Error::new(
            crate::error::ErrorKind::ModelIncompatible,
            format!(
                "training config: init {} was trained with the {} recipe (its {} pipeline lays the \
                 volumes out differently); fine-tune it with {}, not {}",
                self.path.display(),
                self.recipe.name(),
                self.recipe.pipeline().name(),
                self.recipe.name(),
                recipe.name()
            ),
        ))
    }

    /// An architecture the document gives must be the init model's, `out_channels` aside.
    fn same_architecture(&self, arch: &ArchConfig) -> Result<()> {
        let mut want = self.arch.clone();
        want.set_out_channels(arch.out_channels());
        if want == *arch {
            return Ok(());
        }
        let doc = |a: &ArchConfig| {
            let mut v = a.keyword_arguments();
            if let Some(o) = v.as_object_mut() {
                o.insert("arch".into(), a.name().into());
                o.remove("out_channels");
            }
            v
        };
        Err(Error::new(
            crate::error::ErrorKind::ModelIncompatible,
            format!(
                "training config: \"arch\" {} differs from the architecture of init {} {} (leave \"arch\" \
             out to take the init model's)",
                doc(arch),
                self.path.display(),
                doc(&self.arch)
            ),
        ))
    }
}

/// `arch` as the document users write: `{"arch": name, …keyword arguments}`.
mod arch_document {
    use crate::model::ArchConfig;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(arch: &ArchConfig, s: S) -> Result<S::Ok, S::Error> {
        let mut doc = arch.keyword_arguments();
        if let Some(o) = doc.as_object_mut() {
            o.insert("arch".into(), arch.name().into());
        }
        serde::Serialize::serialize(&doc, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ArchConfig, D::Error> {
        let doc = serde_json::Value::deserialize(d)?;
        ArchConfig::from_document(&doc, "arch").map_err(|e| serde::de::Error::custom(e.message))
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// A host's layers of one training config (a user's file, then the host's own settings): objects
/// merged in order, a later layer's top-level key replacing an earlier one's. Within one layer a key
/// given twice is refused, as everywhere.
fn layered(layers: Vec<Value>) -> Result<Value> {
    let mut merged = serde_json::Map::new();
    for (i, layer) in layers.into_iter().enumerate() {
        match layer {
            Value::Object(fields) => merged.extend(fields),
            other => {
                return Err(Error::invalid(format!(
                    "training config: layer {i} of the list must be an object, got {}",
                    crate::options::describe(&other)
                )));
            }
        }
    }
    Ok(Value::Object(merged))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_config_fields_are_errors() {
        let err =
            TrainConfig::from_json(r#"{"dataset": "d.json", "out": "m.safetensors", "epoch": 3}"#)
                .unwrap_err();
        assert!(err.message.contains("epoch"), "{}", err.message);
        assert!(TrainConfig::from_json(r#"{"dataset": "d.json"}"#).is_err());
        assert!(
            TrainConfig::from_json("").is_err(),
            "dataset and out are required"
        );
        assert!(TrainConfig::from_json("[1]").is_err());
        let c = TrainConfig::from_json(r#"{"dataset": "d.json", "out": "m"}"#).unwrap();
        assert_eq!(c.learning_rate(Stage::Init), 1e-4);
        assert_eq!(c.optimizer, OptimizerKind::Adamw);
    }

    #[test]
    fn layers_merge_in_order_and_each_refuses_a_key_twice() {
        let layers = r#"[{"epochs": 7, "seed": 3, "lr": 0.5}, {"dataset": "d.json", "out": "m", "epochs": 2}]"#;
        let c = TrainConfig::from_json(layers).unwrap();
        assert_eq!((c.epochs, c.seed, c.lr), (2, 3, Some(0.5)));
        let twice = r#"[{"epochs": 7, "epochs": 8}, {"dataset": "d.json", "out": "m"}]"#;
        let err = TrainConfig::from_json(twice).unwrap_err();
        assert!(err.message.contains("epochs"), "{}", err.message);
        let err = TrainConfig::from_json(r#"[{"dataset": "d.json", "out": "m"}, 3]"#).unwrap_err();
        assert!(err.message.contains("layer 1"), "{}", err.message);
    }

    #[test]
    fn recipes_are_named_by_what_they_are_and_their_former_names_still_read() {
        for (name, recipe) in [
            ("monai", Recipe::Monai),
            ("unetr", Recipe::Monai),
            ("nnunet_v1", Recipe::NnUnetV1),
            ("unetr_pp", Recipe::NnUnetV1),
        ] {
            let arch = match recipe {
                Recipe::Monai => "unetr",
                Recipe::NnUnetV1 => "unetr_pp",
            };
            let json = format!(
                r#"{{"dataset": "d.json", "out": "m", "recipe": "{name}", "arch": {{"arch": "{arch}"}}, "spacing": [1.5, 1.5, 2.0]}}"#
            );
            let c = TrainConfig::from_json(&json).unwrap();
            assert_eq!(c.recipe, recipe);
            let written = serde_json::to_value(&c).unwrap();
            assert_eq!(written["recipe"], recipe.name());
        }
    }

    #[test]
    fn each_architectures_own_axis_is_its_default_recipes_depth() {
        use crate::model::{unetr, unetr_pp};
        let pp = ArchConfig::UnetrPp(Default::default());
        for (arch, home) in [
            (ArchConfig::default(), unetr::HOME_AXIS),
            (pp, unetr_pp::HOME_AXIS),
        ] {
            assert_eq!(
                Recipe::for_arch(&arch).pipeline().depth_axis(),
                home,
                "{}",
                arch.name()
            );
        }
    }

    #[test]
    fn any_recipe_trains_any_architecture_its_slabs_along_the_recipes_depth() {
        for (recipe, arch, depth) in [
            ("monai", "unetr_pp", 2),
            ("nnunet_v1", "unetr", 0),
            ("monai", "unetr", 2),
            ("nnunet_v1", "unetr_pp", 0),
        ] {
            let json = format!(
                r#"{{"dataset": "d.json", "out": "m", "recipe": "{recipe}", "arch": {{"arch": "{arch}"}}}}"#
            );
            let c = TrainConfig::from_json(&json).unwrap();
            assert_eq!((c.recipe.name(), c.arch.name()), (recipe, arch));
            assert_eq!(c.pretext_task().axis, Some(depth), "{recipe} {arch}");
            assert_eq!(
                c.pretext.axis, None,
                "the axis is the run's, not the config's"
            );
        }
    }

    #[test]
    fn the_recipe_follows_the_architecture_and_any_field_overrides_it() {
        let named =
            r#"{"dataset": "d.json", "out": "m", "arch": {"arch": "unetr", "feature_size": 8}}"#;
        assert_eq!(TrainConfig::from_json(named).unwrap().recipe, Recipe::Monai);
        let pp = r#"{"dataset": "d.json", "out": "m", "arch": {"arch": "unetr_pp"},
                     "pretext": {"grouping": "released"}, "momentum": 0.95}"#;
        let c = TrainConfig::from_json(pp).unwrap();
        assert_eq!(c.recipe, Recipe::NnUnetV1);
        assert_eq!(
            (c.optimizer, c.momentum, c.schedule),
            (OptimizerKind::Sgd, 0.95, ScheduleKind::Poly)
        );
        assert_eq!(
            (
                c.learning_rate(Stage::Init),
                c.learning_rate(Stage::Segmentation)
            ),
            (1e-4, 1e-2)
        );
        // a nested field overrides that field alone
        assert_eq!(
            (c.pretext.grouping, c.pretext.slabs),
            (Grouping::Released, 4)
        );
        let mut back = TrainConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        back.out_channels_given = c.out_channels_given;
        assert_eq!(back, c, "a checkpoint's config reads back as itself");
        let mixed = r#"{"dataset": "d.json", "out": "m", "recipe": "unetr_pp"}"#;
        let c = TrainConfig::from_json(mixed).unwrap();
        assert_eq!((c.recipe, c.arch.name()), (Recipe::NnUnetV1, "unetr"));
        let wrong =
            r#"{"dataset": "d.json", "out": "m", "arch": {"arch": "unetr_pp"}, "batch_size": "2"}"#;
        let err = TrainConfig::from_json(wrong).unwrap_err();
        assert!(err.message.contains("batch_size"), "{}", err.message);
    }
}
