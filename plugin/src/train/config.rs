//! What a training run is asked to do: the dataset, the architecture, the stage's schedule,
//! sampling and augmentation, checked when read.

use crate::error::{Error, Result};
use crate::model::UnetrConfig;
use crate::pretext::PretextConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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

/// Everything a training run is told; every field has a default and unknown fields are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// MSD/nnU-Net dataset.json or MONAI datalist.
    pub dataset: PathBuf,
    /// The model file to write; fine-tune also keeps the best validation model as `NAME.best.safetensors`;
    /// the resumable checkpoint is `OUT.ckpt`.
    pub out: PathBuf,
    /// MONAI UNETR keyword arguments; `out_channels` is decided by the stage.
    pub arch: UnetrConfig,
    /// fine-tune: the init-train model to start from; absent = random initialisation.
    pub init: Option<PathBuf>,
    pub epochs: u64,
    pub seed: u64,
    /// "auto", "cpu" or "cuda:N"; absent: the engine's device.
    pub device: Option<String>,
    pub threads: Option<i32>,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_epochs: u64,
    /// Epochs between scheduler steps: 1 (upstream MONAI), 100 reproduces the released code (§7.2).
    pub sched_step_every: u64,
    /// Crops per volume per iteration.
    pub num_samples: i64,
    /// Positive : negative crop-centre ratio.
    pub pos: f64,
    pub neg: f64,
    pub spacing: [f64; 3],
    pub window: [f64; 2],
    pub augment: Augment,
    pub pretext: PretextConfig,
    /// bf16 autocast on CUDA.
    pub amp: bool,
    pub val_every: u64,
    pub checkpoint_every: u64,
    /// Continue from `OUT.ckpt` if it exists.
    pub resume: bool,
    /// Whether the document set `arch.out_channels` (the stage decides it; a different explicit
    /// value is worth a warning, the default is not).
    #[serde(skip)]
    pub out_channels_given: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            dataset: PathBuf::new(),
            out: PathBuf::new(),
            arch: UnetrConfig::default(),
            init: None,
            epochs: 100,
            seed: 0,
            device: None,
            threads: None,
            lr: 1e-4,
            weight_decay: 1e-5,
            warmup_epochs: 50,
            sched_step_every: 1,
            num_samples: 4,
            pos: 1.0,
            neg: 1.0,
            spacing: [1.5, 1.5, 2.0],
            window: [-175.0, 250.0],
            augment: Augment::default(),
            pretext: PretextConfig::default(),
            amp: true,
            val_every: 100,
            checkpoint_every: 1,
            resume: false,
            out_channels_given: false,
        }
    }
}

/// The most epochs a run may ask for: far beyond any recipe (the method's longest is 5000), small
/// enough that iteration counts cannot overflow.
pub const MAX_EPOCHS: u64 = 1_000_000;

impl TrainConfig {
    /// Parses and checks a training configuration: every value out of range is
    /// `InvalidArgument` naming the field and the value.
    pub fn from_json(json: &str) -> Result<TrainConfig> {
        let json = Self::without_arch_name(json)?;
        let mut c: TrainConfig = crate::options::parse(&json, "training config")?;
        c.out_channels_given = serde_json::from_str::<serde_json::Value>(&json)
            .is_ok_and(|v| v.pointer("/arch/out_channels").is_some());
        c.check()?;
        Ok(c)
    }

    /// An architecture config may name its architecture (`"arch": "unetr"`, as `--arch-config`
    /// files do): accepted for UNETR, refused for UNETR++, which lwi does not train yet.
    fn without_arch_name(json: &str) -> Result<String> {
        let Ok(mut doc) = serde_json::from_str::<serde_json::Value>(json) else {
            return Ok(json.to_string()); // the parser below words the error
        };
        let name = doc
            .get_mut("arch")
            .and_then(|a| a.as_object_mut())
            .and_then(|a| a.remove("arch"));
        match name {
            None => Ok(json.to_string()),
            Some(n) if n == "unetr" => Ok(doc.to_string()),
            Some(n) if n == "unetr_pp" => Err(Error::unsupported(
                "training config: lwi does not train UNETR++ yet; import a trained checkpoint with \
                 `lwi import --arch unetr_pp` (docs/models.md)",
            )),
            Some(other) => Err(Error::unsupported(format!(
                "training config: \"arch\": {other} is not an architecture lwi trains (unetr)"
            ))),
        }
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
            ("sched_step_every", c.sched_step_every as i64),
            ("checkpoint_every", c.checkpoint_every as i64),
            ("val_every", c.val_every as i64),
        ];
        if let Some((name, v)) = counts.iter().find(|(_, v)| *v < 1) {
            return Err(Error::invalid(format!(
                "training config: {name} must be at least 1, got {v}"
            )));
        }
        if !(c.lr > 0.0
            && c.weight_decay >= 0.0
            && c.pos >= 0.0
            && c.neg >= 0.0
            && c.pos + c.neg > 0.0)
        {
            return Err(Error::invalid(
                "training config: lr must be positive; weight_decay, pos and neg non-negative",
            ));
        }
        if c.epochs > MAX_EPOCHS {
            return Err(Error::invalid(format!(
                "training config: epochs {} is more than {MAX_EPOCHS}",
                c.epochs
            )));
        }
        if c.window[0].partial_cmp(&c.window[1]) != Some(std::cmp::Ordering::Less) {
            return Err(Error::invalid(format!(
                "training config: window {:?} must be [low, high] with low < high (HU)",
                c.window
            )));
        }
        if c.spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::invalid(format!(
                "training config: spacing {:?} must be three positive millimetre values",
                c.spacing
            )));
        }
        c.arch
            .validate()
            .map_err(|e| Error::invalid(format!("training config: arch: {}", e.message)))
    }

    pub(super) fn checkpoint_path(&self) -> PathBuf {
        with_suffix(&self.out, ".ckpt")
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn unknown_config_fields_are_errors() {
        let err =
            TrainConfig::from_json(r#"{"dataset": "d.json", "out": "m.safetensors", "epoch": 3}"#)
                .unwrap_err();
        assert!(err.message.contains("epoch"), "{}", err.message);
        assert!(TrainConfig::from_json(r#"{"dataset": "d.json"}"#).is_err());
        assert_eq!(
            TrainConfig::from_json(r#"{"dataset": "d.json", "out": "m"}"#)
                .unwrap()
                .lr,
            1e-4
        );
    }

    #[test]
    fn an_architecture_file_may_name_its_architecture() {
        let named =
            r#"{"dataset": "d.json", "out": "m", "arch": {"arch": "unetr", "feature_size": 8}}"#;
        assert_eq!(TrainConfig::from_json(named).unwrap().arch.feature_size, 8);
        let pp = r#"{"dataset": "d.json", "out": "m", "arch": {"arch": "unetr_pp"}}"#;
        let err = TrainConfig::from_json(pp).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unsupported);
        assert!(err.message.contains("UNETR++"), "{}", err.message);
    }
}
