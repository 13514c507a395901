//! Where the training data comes from: the model's preprocessing (the monai recipe's settings, or
//! nnU-Net's from the dataset fingerprint), the prepared cases (in memory, or in the preprocessed
//! cache on disk) and the batches drawn from them each iteration.

use super::{Recipe, TrainConfig, batches, cache, patches, streams};
use crate::dataset::DatasetFile;
use crate::error::{Error, Result};
use crate::events::Progress;
use crate::model_file::{MonaiPreprocessing, NnUnetPreprocessing, Preprocessing};
use crate::pipeline::nnunet::fingerprint;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

/// How the model's input is prepared: the monai recipe's MONAI pipeline as configured, or nnU-Net's
/// with the dataset's fingerprint (the median spacing unless `spacing` is given).
pub(super) fn preprocessing(
    cfg: &TrainConfig,
    dataset: &DatasetFile,
    store: &Store,
    progress: &mut dyn Progress,
) -> Result<Preprocessing> {
    let roi_size = cfg.arch.img_size();
    match cfg.recipe {
        Recipe::Monai => Ok(Preprocessing::Monai(MonaiPreprocessing {
            spacing: cfg.spacing.unwrap_or(MonaiPreprocessing::default().spacing),
            intensity_window: cfg.window,
            roi_size,
            ..Default::default()
        })),
        Recipe::NnUnetV1 => {
            let mut compute = || fingerprint::compute(&dataset.training, progress);
            let print = match &store.cache {
                Some(cache) => cache.fingerprint(&store.hashes, compute)?,
                None => compute()?,
            };
            Ok(Preprocessing::NnUnet(NnUnetPreprocessing {
                spacing: cfg.spacing.unwrap_or(print.spacing),
                roi_size,
                ct_normalization: Some(print.ct),
            }))
        }
    }
}

/// The nnunet_v1 recipe's prepared data: the training cases' file hashes and the cache on disk.
pub(super) struct Store {
    hashes: Vec<String>,
    cache: Option<cache::Cache>,
}

impl Store {
    pub(super) fn open(cfg: &TrainConfig, dataset: &DatasetFile) -> Result<Store> {
        if cfg.recipe != Recipe::NnUnetV1 {
            return Ok(Store {
                hashes: Vec::new(),
                cache: None,
            });
        }
        let hashes = dataset
            .training
            .iter()
            .map(|e| cache::case_hash(e, true))
            .collect::<Result<_>>()?;
        let cache = cfg
            .cache
            .then(|| cache::Cache::open(&cfg.cache_path()))
            .transpose()?;
        Ok(Store { hashes, cache })
    }
}

/// Where batches come from.
pub(super) enum Source {
    /// The monai recipe: random crops of one case per iteration.
    Crops(Vec<batches::Prepared>),
    /// The nnunet_v1 recipe: nnU-Net's patch batches.
    Patches(Vec<patches::PatchCase>),
}

impl Source {
    pub(super) fn prepare(
        cfg: &TrainConfig,
        dataset: &DatasetFile,
        pre: &Preprocessing,
        classes: Option<u32>,
        store: &Store,
        progress: &mut dyn Progress,
    ) -> Result<Source> {
        let roi = cfg.arch.img_size();
        Ok(match pre {
            Preprocessing::Monai(pre) => Source::Crops(batches::prepare_cases(
                &dataset.training,
                pre,
                roi,
                classes,
                progress,
            )?),
            Preprocessing::NnUnet(pre) => {
                let norm = pre
                    .ct_normalization
                    .as_ref()
                    .ok_or_else(|| Error::internal("nnU-Net pipeline without its normalisation"))?;
                Source::Patches(patches::prepare_cases(
                    &dataset.training,
                    &store.hashes,
                    norm,
                    pre.spacing,
                    classes,
                    store.cache.as_ref(),
                    progress,
                )?)
            }
        })
    }

    fn len(&self) -> usize {
        match self {
            Source::Crops(c) => c.len(),
            Source::Patches(c) => c.len(),
        }
    }

    /// The epoch's steps for a global batch of `slots`: `iterations_per_epoch`, else one pass
    /// over the cases; for crops also the case of each slot of each step, drawn from `shared`
    /// (patches pick their cases as they go).
    pub(super) fn plan(&self, cfg: &TrainConfig, slots: usize, shared: &mut ChaCha8Rng) -> Plan {
        let n = self.len();
        let steps = cfg
            .iterations_per_epoch
            .map_or(n.div_ceil(slots), |i| i as usize);
        let order = match self {
            Source::Crops(_) => {
                let one_pass = cfg.iterations_per_epoch.is_none();
                streams::epoch_order(n, steps, slots, one_pass, shared)
            }
            Source::Patches(_) => Vec::new(),
        };
        Plan {
            steps,
            slots,
            order,
        }
    }

    /// This rank's share of step `step`'s global batch: the samples of the global slots `mine`,
    /// each drawn from its own stream (`rngs`, one per slot of `mine`).
    pub(super) fn batch(
        &self,
        plan: &Plan,
        step: usize,
        mine: std::ops::Range<u64>,
        rngs: &mut [ChaCha8Rng],
        cfg: &TrainConfig,
        device: Device,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let roi = cfg.arch.img_size();
        match self {
            Source::Crops(cases) => {
                let (mut images, mut labels) = (Vec::new(), Vec::new());
                for (slot, rng) in mine.zip(rngs) {
                    let case = plan.order[step * plan.slots + slot as usize];
                    let (x, y) = batches::crops(&cases[case], cfg, roi, rng, device);
                    images.push(x);
                    labels.extend(y);
                }
                let labels = (!labels.is_empty()).then(|| Tensor::cat(&labels, 0));
                Ok((Tensor::cat(&images, 0), labels))
            }
            Source::Patches(cases) => {
                patches::batch(cases, cfg, roi, mine, plan.slots as u64, rngs, device)
            }
        }
    }
}

/// One epoch's schedule.
pub(super) struct Plan {
    pub steps: usize,
    /// The global batch's slots per step.
    pub slots: usize,
    /// Crops: the case of slot j at step i is `order[i · slots + j]`.
    order: Vec<usize>,
}
