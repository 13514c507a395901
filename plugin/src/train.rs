//! The training loop shared by init-train (stage 1, self-supervised) and fine-tune (stage 2):
//! patch sampling, augmentation, AdamW with a warmup-cosine schedule, checkpoints that resume
//! exactly, progress and cancellation, validation and best/last model files.

use crate::bundle::{Model, ModelMetadata, Preprocessing, Stage};
use crate::dataset::{DatasetFile, prepare_case};
use crate::engine::{Engine, EngineOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::events::{Event, Progress, report};
use crate::model::{
    ArchConfig, Network, Precision, PretextHeads, UnetrConfig, load_state_dict, with_precision,
};
use crate::preprocess::pad_to_roi;
use crate::pretext::PretextConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

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

    fn checkpoint_path(&self) -> PathBuf {
        with_suffix(&self.out, ".ckpt")
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Linear warmup then cosine annealing to 0 (LinearWarmupCosineAnnealingLR, warmup from 0),
/// after `steps` scheduler steps.
pub fn learning_rate(base: f64, warmup: u64, max: u64, steps: u64) -> f64 {
    if steps < warmup {
        if warmup <= 1 {
            base
        } else {
            base * steps as f64 / (warmup - 1) as f64
        }
    } else if max <= warmup {
        base
    } else {
        0.5 * base
            * (1.0 + (std::f64::consts::PI * (steps - warmup) as f64 / (max - warmup) as f64).cos())
    }
}

/// AdamW exactly as `torch.optim.AdamW` (betas 0.9/0.999, eps 1e-8, decoupled weight decay), with
/// its state in plain tensors so checkpoints hold it. Public for the training-step benchmark.
pub struct AdamW {
    names: Vec<String>,
    params: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
    weight_decay: f64,
}

impl AdamW {
    pub fn new(vs: &tch::nn::VarStore, weight_decay: f64) -> AdamW {
        let mut vars: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let m = vars.iter().map(|(_, t)| t.zeros_like()).collect();
        let v = vars.iter().map(|(_, t)| t.zeros_like()).collect();
        let (names, params) = vars.into_iter().unzip();
        AdamW {
            names,
            params,
            m,
            v,
            step: 0,
            weight_decay,
        }
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.zero_grad();
        }
    }

    pub fn step(&mut self, lr: f64) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        self.step += 1;
        let t = self.step as i32;
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        tch::no_grad(|| {
            for ((p, m), v) in self.params.iter_mut().zip(&mut self.m).zip(&mut self.v) {
                let g = p.grad();
                if !g.defined() {
                    continue; // a parameter the loss does not reach
                }
                let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                let _ = m.g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
                let _ = v.g_mul_scalar_(b2).g_add_(&(g.square() * (1.0 - b2)));
                let denom = v.sqrt() / c2.sqrt() + eps;
                let _ = p.g_sub_(&(m.shallow_clone() / denom * (lr / c1)));
            }
        });
    }
}

/// What a checkpoint remembers besides tensors.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    epochs_done: u64,
    adam_step: u64,
    rng_word_pos: String,
    best_metric: Option<f64>,
    config: TrainConfig,
    model: ModelMetadata,
}

fn save_checkpoint(path: &Path, model: &Model, opt: &AdamW, state: &CheckpointState) -> Result<()> {
    let mut named: Vec<(String, Tensor)> = model
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| (format!("model.{n}"), t))
        .collect();
    for (i, name) in opt.names.iter().enumerate() {
        named.push((format!("adam_m.{name}"), opt.m[i].shallow_clone()));
        named.push((format!("adam_v.{name}"), opt.v[i].shallow_clone()));
    }
    let doc = serde_json::to_string(state).map_err(|e| Error::internal(e.to_string()))?;
    crate::bundle::write_safetensors(
        path,
        named,
        HashMap::from([("lwi_checkpoint".to_string(), doc)]),
    )
}

fn load_checkpoint(
    path: &Path,
    device: Device,
) -> Result<(CheckpointState, HashMap<String, Tensor>)> {
    let bytes = crate::io::read_regular(path)?;
    let bad = |m: String| Error::format(path, format!("not a usable checkpoint ({m})"));
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let doc = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("lwi_checkpoint"))
        .ok_or_else(|| bad("no lwi_checkpoint metadata".into()))?;
    let state: CheckpointState = serde_json::from_str(doc).map_err(|e| bad(e.to_string()))?;
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut tensors = HashMap::new();
    for (name, view) in file.tensors() {
        tensors.insert(
            name,
            crate::bundle::tensor_from_view(path, &view)?.f_to_device(device)?,
        );
    }
    Ok((state, tensors))
}

/// Random crops centred, in proportion pos : neg, on labelled and on unlabelled-but-foreground
/// voxels (MONAI `RandCropByPosNegLabeld`); without labels, on foreground voxels.
struct Sampler {
    fg: Tensor,
    bg: Tensor,
}

impl Sampler {
    fn new(image: &Tensor, label: Option<&Tensor>) -> Sampler {
        let flat_image = image.reshape([-1]);
        match label {
            Some(l) => {
                let flat = l.reshape([-1]);
                let fg = flat.gt(0).nonzero().squeeze_dim(1);
                let bg = flat
                    .eq(0)
                    .logical_and(&flat_image.gt(0.0))
                    .nonzero()
                    .squeeze_dim(1);
                Sampler { fg, bg }
            }
            None => Sampler {
                fg: flat_image.gt(0.0).nonzero().squeeze_dim(1),
                bg: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
            },
        }
    }

    fn centre(&self, rng: &mut ChaCha8Rng, pos: f64, neg: f64, dims: [i64; 3]) -> [i64; 3] {
        let (nf, nb) = (self.fg.size()[0], self.bg.size()[0]);
        let use_fg = nb == 0 || (nf > 0 && rng.random::<f64>() < pos / (pos + neg));
        let (pool, n) = if use_fg {
            (&self.fg, nf)
        } else {
            (&self.bg, nb)
        };
        if n == 0 {
            return [dims[0] / 2, dims[1] / 2, dims[2] / 2];
        }
        let flat = pool.int64_value(&[rng.random_range(0..n)]);
        [
            flat / (dims[1] * dims[2]),
            (flat / dims[2]) % dims[1],
            flat % dims[2],
        ]
    }
}

struct Prepared {
    image: Tensor,
    label: Option<Tensor>,
    sampler: Sampler,
}

fn crops(
    p: &Prepared,
    cfg: &TrainConfig,
    roi: [i64; 3],
    rng: &mut ChaCha8Rng,
    device: Device,
) -> (Tensor, Option<Tensor>) {
    let s = p.image.size();
    let dims = [s[1], s[2], s[3]];
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for _ in 0..cfg.num_samples {
        let c = p.sampler.centre(rng, cfg.pos, cfg.neg, dims);
        let start: Vec<i64> = (0..3)
            .map(|d| (c[d] - roi[d] / 2).clamp(0, dims[d] - roi[d]))
            .collect();
        let cut = |t: &Tensor| {
            t.narrow(1, start[0], roi[0])
                .narrow(2, start[1], roi[1])
                .narrow(3, start[2], roi[2])
                .to_device(device)
        };
        let (mut img, mut lab) = (cut(&p.image), p.label.as_ref().map(cut));
        // Augmentation (decisions from the run's RNG so a resumed run repeats them).
        let a = &cfg.augment;
        for axis in 1..4 {
            if rng.random::<f64>() < a.flip_p {
                img = img.flip([axis]);
                lab = lab.map(|l| l.flip([axis]));
            }
        }
        if roi[0] == roi[1] && rng.random::<f64>() < a.rot90_p {
            let k = rng.random_range(1..4);
            img = img.rot90(k, [1, 2]);
            lab = lab.map(|l| l.rot90(k, [1, 2]));
        }
        if rng.random::<f64>() < a.scale_p {
            img = &img * (1.0 + rng.random_range(-0.1..0.1));
        }
        if rng.random::<f64>() < a.shift_p {
            img = &img + rng.random_range(-0.1..0.1);
        }
        images.push(img);
        labels.extend(lab);
    }
    let labels = (!labels.is_empty()).then(|| Tensor::stack(&labels, 0));
    (Tensor::stack(&images, 0), labels)
}

/// Runs init-train (`stage` Init) or fine-tune (`stage` Segmentation) as `cfg` says, on `device`
/// unless the config names one; writes the model file(s) and returns the final model.
pub fn train(
    stage: Stage,
    cfg: &TrainConfig,
    device: Device,
    progress: &mut dyn Progress,
) -> Result<Model> {
    // A libtorch failure inside tch's infallible operations (out of memory among them) is an
    // error of this call, not a panic.
    crate::error::catch_panic(|| train_stage(stage, cfg, device, progress))
}

fn train_stage(
    stage: Stage,
    cfg: &TrainConfig,
    device: Device,
    progress: &mut dyn Progress,
) -> Result<Model> {
    let device = match (&cfg.device, cfg.threads) {
        (None, None) => device,
        (name, threads) => {
            let options = EngineOptions {
                device: name
                    .clone()
                    .unwrap_or_else(|| crate::bundle::device_name(device)),
                threads,
            };
            Engine::new(&options)?.device
        }
    };
    // Decided before any work: a pretext task that cannot split this roi is refused at once.
    if stage == Stage::Init {
        let tokens = cfg.arch.feat_size();
        cfg.pretext
            .validate(cfg.arch.img_size, tokens)
            .map_err(|e| Error::invalid(format!("training config: {}", e.message)))?;
    }
    let ds = DatasetFile::read(&cfg.dataset)?;
    let pre = Preprocessing {
        spacing: cfg.spacing,
        intensity_window: cfg.window,
        roi_size: cfg.arch.img_size,
        ..Default::default()
    };

    // Output channels come from the stage: one reconstruction channel, or one per label value.
    let classes = match stage {
        Stage::Init => 1,
        Stage::Segmentation => {
            if ds.training.iter().any(|e| e.label.is_none()) {
                return Err(Error::invalid(format!(
                    "{}: fine-tune needs a label for every training case",
                    cfg.dataset.display()
                )));
            }
            let largest = ds.labels.keys().max().copied().ok_or_else(|| {
                Error::invalid(format!(
                    "{}: fine-tune needs the \"labels\" map (value → name) to know the classes",
                    cfg.dataset.display()
                ))
            })?;
            i64::from(largest) + 1
        }
    };
    let mut arch = cfg.arch.clone();
    if arch.out_channels != classes && cfg.out_channels_given && stage == Stage::Segmentation {
        report(
            progress,
            Event {
                stage: "setup",
                message: format!(
                    "warning: out_channels {} overridden by the stage: {classes}",
                    arch.out_channels
                ),
                ..Default::default()
            },
        )?;
    }
    arch.out_channels = classes;
    let tokens = arch.feat_size();
    // Label values are checked against the classes when fine-tuning (init-train ignores them).
    let label_classes = (stage == Stage::Segmentation).then_some(classes as u32);
    let labels: BTreeMap<u32, String> = if stage == Stage::Init {
        BTreeMap::new()
    } else {
        ds.labels.clone()
    };
    let mut meta = ModelMetadata::new(ArchConfig::Unetr(arch.clone()), labels, pre.clone(), stage);
    meta.order_classes = (stage == Stage::Init).then_some(cfg.pretext.slabs);
    meta.provenance.seed = Some(cfg.seed);
    meta.provenance.epochs = Some(cfg.epochs);
    meta.provenance.dataset_fingerprint = Some(ds.fingerprint());

    tch::manual_seed(cfg.seed as i64);
    let mut model = Model::new(meta, device)?;
    if let (Stage::Segmentation, Some(init)) = (stage, &cfg.init) {
        model.meta.provenance.history.init = transfer_from_init(&model, init, device)?;
    }
    let mut opt = AdamW::new(&model.vs, cfg.weight_decay);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut first_epoch = 0;
    let mut best: Option<f64> = None;
    let ckpt = cfg.checkpoint_path();
    if cfg.resume && ckpt.exists() {
        let (state, tensors) = load_checkpoint(&ckpt, device)?;
        let mut expected = state.config.clone();
        expected.resume = cfg.resume;
        expected.epochs = cfg.epochs;
        expected.out_channels_given = cfg.out_channels_given;
        if expected != *cfg {
            return Err(Error::invalid(format!(
                "{}: written by a run with another configuration; resume needs the same one (epochs may grow)",
                ckpt.display()
            )));
        }
        let weights: HashMap<String, Tensor> = tensors
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("model.")
                    .map(|n| (n.to_string(), v.shallow_clone()))
            })
            .collect();
        load_state_dict(&model.vs, &weights)?;
        tch::no_grad(|| {
            for (i, name) in opt.names.iter().enumerate() {
                if let (Some(m), Some(v)) = (
                    tensors.get(&format!("adam_m.{name}")),
                    tensors.get(&format!("adam_v.{name}")),
                ) {
                    opt.m[i].copy_(m);
                    opt.v[i].copy_(v);
                }
            }
        });
        opt.step = state.adam_step;
        rng.set_word_pos(
            state
                .rng_word_pos
                .parse::<u128>()
                .map_err(|_| Error::format(&ckpt, "bad RNG position"))?,
        );
        first_epoch = state.epochs_done;
        best = state.best_metric;
        model.meta.provenance.history = state.model.provenance.history.clone();
    }

    report(
        progress,
        Event {
            stage: "preprocess",
            done: 0,
            total: ds.training.len() as u64,
            ..Default::default()
        },
    )?;
    let mut cases = Vec::new();
    for (i, entry) in ds.training.iter().enumerate() {
        let case = prepare_case(entry, &pre, label_classes)?;
        let image = pad_to_roi(&case.image, arch.img_size)?.0;
        let label = case
            .label
            .as_ref()
            .map(|l| pad_to_roi(l, arch.img_size))
            .transpose()?
            .map(|p| p.0);
        let sampler = Sampler::new(&image, label.as_ref());
        cases.push(Prepared {
            image,
            label,
            sampler,
        });
        report(
            progress,
            Event {
                stage: "preprocess",
                done: i as u64 + 1,
                total: ds.training.len() as u64,
                ..Default::default()
            },
        )?;
    }

    // bf16 needs no loss scaling; on GPUs without it (before Ampere) training runs fp32 rather than
    // fp16 without a scaler.
    let precision = if cfg.amp && crate::model::precision::bf16_supported(device) {
        Precision::Bf16
    } else {
        Precision::Fp32
    };
    let iters = cases.len() as u64;
    for epoch in first_epoch..cfg.epochs {
        let lr = learning_rate(
            cfg.lr,
            cfg.warmup_epochs,
            cfg.epochs,
            epoch / cfg.sched_step_every,
        );
        let mut order: Vec<usize> = (0..cases.len()).collect();
        rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rng);
        let mut epoch_loss = 0.0;
        for (it, &ci) in order.iter().enumerate() {
            let (x, y) = crops(&cases[ci], cfg, arch.img_size, &mut rng, device);
            let (loss, parts) = match stage {
                Stage::Init => {
                    let batch = crate::pretext::transform(&x, &cfg.pretext, &mut rng);
                    let (Some(PretextHeads::Unetr(heads)), Network::Unetr(net)) =
                        (&model.order_heads, &model.net)
                    else {
                        return Err(Error::internal("init model without UNETR order heads"));
                    };
                    let (total, rec, cls) = with_precision(precision, device, || {
                        let (recon, features) = net.forward_features(&batch.input, true);
                        let logits =
                            crate::pretext::order_logits(&features, heads, &cfg.pretext, tokens);
                        crate::pretext::loss(&recon, &batch, &logits, &cfg.pretext)
                    })?;
                    (
                        total,
                        format!(
                            "rec {:.4} cls {:.4}",
                            rec.double_value(&[]),
                            cls.double_value(&[])
                        ),
                    )
                }
                Stage::Segmentation => {
                    let y =
                        y.ok_or_else(|| Error::internal("segmentation batch without labels"))?;
                    let loss = with_precision(precision, device, || {
                        crate::loss::dice_ce(&model.net.forward_t(&x, true), &y)
                    })?;
                    (loss, String::new())
                }
            };
            opt.zero_grad();
            loss.f_backward()?;
            opt.step(lr);
            let l = loss.double_value(&[]);
            if !l.is_finite() {
                return Err(Error::invalid(format!(
                    "training diverged: the loss became {l} at epoch {} iteration {} (lr {lr:e}): \
                     lower \"lr\"",
                    epoch + 1,
                    it + 1
                )));
            }
            epoch_loss += l;
            report(
                progress,
                Event {
                    stage: "train",
                    done: epoch * iters + it as u64 + 1,
                    total: cfg.epochs * iters,
                    epoch: Some(epoch),
                    loss: Some(l),
                    message: format!("lr {lr:.3e} {parts}"),
                    ..Default::default()
                },
            )?;
        }
        let done = epoch + 1;
        let mut metric = None;
        let mut save_best = false;
        if stage == Stage::Segmentation
            && !ds.validation.is_empty()
            && (done % cfg.val_every == 0 || done == cfg.epochs)
        {
            let (dice, per_label) = validate(&model, &ds, progress)?;
            metric = Some(dice);
            let table: Vec<String> = per_label
                .iter()
                .map(|(l, d)| {
                    format!(
                        "{}:{d:.3}",
                        model
                            .meta
                            .labels
                            .get(l)
                            .cloned()
                            .unwrap_or_else(|| l.to_string())
                    )
                })
                .collect();
            report(
                progress,
                Event {
                    stage: "validate",
                    done: ds.validation.len() as u64,
                    total: ds.validation.len() as u64,
                    epoch: Some(epoch),
                    metric: Some(dice),
                    message: format!("Dice per label {}", table.join(" ")),
                    ..Default::default()
                },
            )?;
            if best.is_none_or(|b| dice > b) {
                best = Some(dice);
                save_best = true;
            }
        }
        let record = crate::bundle::EpochRecord {
            epoch: done,
            loss: epoch_loss / iters as f64,
            metric,
        };
        match stage {
            Stage::Init => model.meta.provenance.history.init.push(record),
            Stage::Segmentation => model.meta.provenance.history.fine_tune.push(record),
        }
        if save_best {
            model.save(&cfg.out.with_extension("best.safetensors"))?;
        }
        // Checkpoint first, so that an "epoch" event means its checkpoint is on disk.
        if done % cfg.checkpoint_every == 0 || done == cfg.epochs {
            let state = CheckpointState {
                epochs_done: done,
                adam_step: opt.step,
                rng_word_pos: rng.get_word_pos().to_string(),
                best_metric: best,
                config: cfg.clone(),
                model: model.meta.clone(),
            };
            save_checkpoint(&ckpt, &model, &opt, &state)?;
        }
        report(
            progress,
            Event {
                stage: "epoch",
                done,
                total: cfg.epochs,
                epoch: Some(epoch),
                loss: Some(epoch_loss / iters as f64),
                metric,
                ..Default::default()
            },
        )?;
    }
    model.save(&cfg.out)?;
    Ok(model)
}

/// Stage 2 starts from every stage-1 tensor except the output conv, which is fresh for the
/// dataset's classes; the order heads are not carried (they get no gradient in stage 2). Returns
/// stage 1's training history.
fn transfer_from_init(
    model: &Model,
    init: &Path,
    device: Device,
) -> Result<Vec<crate::bundle::EpochRecord>> {
    let stage1 = Model::load(init, device)?;
    if stage1.meta.stage != Stage::Init {
        return Err(Error::new(
            ErrorKind::ModelIncompatible,
            format!(
                "{}: not an init-train model (stage {:?})",
                init.display(),
                stage1.meta.stage
            ),
        ));
    }
    let mut want = stage1.meta.arch.clone();
    want.set_out_channels(model.meta.arch.out_channels());
    if want != model.meta.arch {
        return Err(Error::new(
            ErrorKind::ModelIncompatible,
            format!(
                "{}: its architecture {} differs from the one asked for {}",
                init.display(),
                serde_json::to_string(&stage1.meta.arch).unwrap_or_default(),
                serde_json::to_string(&model.meta.arch).unwrap_or_default()
            ),
        ));
    }
    let arch = &model.meta.arch;
    let mut tensors: HashMap<String, Tensor> = stage1
        .vs
        .variables()
        .into_iter()
        .filter(|(k, _)| !k.starts_with(arch.order_head_prefix()))
        .collect();
    for (k, v) in model
        .vs
        .variables()
        .into_iter()
        .filter(|(k, _)| arch.output_heads().iter().any(|h| k.starts_with(h)))
    {
        tensors.insert(k, v.detach().copy());
    }
    load_state_dict(&model.vs, &tensors)?;
    Ok(stage1.meta.provenance.history.init.clone())
}

/// Dice on the validation cases (sliding window on the whole volume, back on the original grid, as
/// `segment` does): the mean over cases and labels, and the mean per label.
fn validate(
    model: &Model,
    ds: &DatasetFile,
    progress: &mut dyn Progress,
) -> Result<(f64, BTreeMap<u32, f64>)> {
    let opts = crate::segment::SegmentOptions {
        blend: crate::infer::Blend::Constant,
        ..Default::default()
    };
    let mut sum = 0.0;
    let mut n = 0usize;
    let mut per_label: BTreeMap<u32, (f64, usize)> = BTreeMap::new();
    for (i, entry) in ds.validation.iter().enumerate() {
        let Some(label_path) = &entry.label else {
            continue;
        };
        let image = crate::io::read_volume(&entry.image)?;
        let reference = crate::io::read_volume(label_path)?;
        let classes = model.meta.arch.out_channels() as u32;
        crate::dataset::check_label(&image, &reference, label_path, Some(classes))?;
        let pred = crate::segment::segment(model, &image, &opts, &mut crate::events::Silent)?;
        let labels: Vec<u32> = model
            .meta
            .labels
            .keys()
            .copied()
            .filter(|&l| l != 0)
            .collect();
        for (l, s) in crate::metrics::score(&pred, &reference, &labels)? {
            if let Some(d) = s.dice {
                sum += d;
                n += 1;
                let e = per_label.entry(l).or_default();
                e.0 += d;
                e.1 += 1;
            }
        }
        report(
            progress,
            Event {
                stage: "validate",
                done: i as u64 + 1,
                total: ds.validation.len() as u64,
                ..Default::default()
            },
        )?;
    }
    let per_label = per_label
        .into_iter()
        .map(|(l, (s, k))| (l, s / k as f64))
        .collect();
    Ok((if n > 0 { sum / n as f64 } else { 0.0 }, per_label))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_linear_warmup_cosine_annealing() {
        // warmup 50 over max 800 as LinearWarmupCosineAnnealingLR(warmup_start_lr=0, eta_min=0)
        assert_eq!(learning_rate(1e-4, 50, 800, 0), 0.0);
        assert!((learning_rate(1e-4, 50, 800, 49) - 1e-4).abs() < 1e-18);
        assert!((learning_rate(1e-4, 50, 800, 10) - 1e-4 * 10.0 / 49.0).abs() < 1e-18);
        assert!((learning_rate(1e-4, 50, 800, 50) - 1e-4).abs() < 1e-18);
        assert!((learning_rate(1e-4, 50, 800, 425) - 0.5e-4).abs() < 1e-12);
        // the released code's step-every-100 in stage 1: epoch 150 has seen one step
        assert!((learning_rate(1e-4, 50, 800, 150 / 100) - 1e-4 / 49.0).abs() < 1e-18);
    }

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
