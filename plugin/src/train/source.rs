//! Where the training data comes from: the model's preprocessing (the unetr recipe's settings, or
//! nnU-Net's from the dataset fingerprint), the prepared cases (in memory, or in the preprocessed
//! cache on disk) and the batches drawn from them each iteration.

use super::{Recipe, TrainConfig, batches, cache, fingerprint, patches};
use crate::bundle::{Pipeline, Preprocessing};
use crate::dataset::DatasetFile;
use crate::error::{Error, Result};
use crate::events::Progress;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

/// How the model's input is prepared: the unetr recipe's MONAI pipeline as configured, or nnU-Net's
/// with the dataset's fingerprint (the median spacing unless `spacing` is given).
pub(super) fn preprocessing(
    cfg: &TrainConfig,
    dataset: &DatasetFile,
    store: &Store,
    progress: &mut dyn Progress,
) -> Result<Preprocessing> {
    let roi_size = cfg.arch.img_size();
    match cfg.recipe {
        Recipe::Unetr => Ok(Preprocessing {
            spacing: cfg.spacing.unwrap_or(Preprocessing::default().spacing),
            intensity_window: cfg.window,
            roi_size,
            ..Default::default()
        }),
        Recipe::UnetrPp => {
            let mut compute = || fingerprint::compute(&dataset.training, progress);
            let print = match &store.cache {
                Some(cache) => cache.fingerprint(&store.hashes, compute)?,
                None => compute()?,
            };
            Ok(Preprocessing {
                spacing: cfg.spacing.unwrap_or(print.spacing),
                roi_size,
                pipeline: Pipeline::NnUnet,
                ct_normalization: Some(print.ct),
                ..Default::default()
            })
        }
    }
}

/// The unetr_pp recipe's prepared data: the training cases' file hashes and the cache on disk.
pub(super) struct Store {
    hashes: Vec<String>,
    cache: Option<cache::Cache>,
}

impl Store {
    pub(super) fn open(cfg: &TrainConfig, dataset: &DatasetFile) -> Result<Store> {
        if cfg.recipe != Recipe::UnetrPp {
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
    /// The unetr recipe: random crops of one case per iteration.
    Crops(Vec<batches::Prepared>),
    /// The unetr_pp recipe: nnU-Net's patch batches.
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
        Ok(match cfg.recipe {
            Recipe::Unetr => Source::Crops(batches::prepare_cases(
                &dataset.training,
                pre,
                roi,
                classes,
                progress,
            )?),
            Recipe::UnetrPp => {
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

    /// The epoch's iterations: for crops, the case of each (shuffled, one pass per
    /// `iterations_per_epoch` cases); patches pick their cases as they go.
    pub(super) fn plan(&self, cfg: &TrainConfig, rng: &mut ChaCha8Rng) -> Vec<usize> {
        match self {
            Source::Crops(cases) => {
                let n = cfg.iterations_per_epoch.unwrap_or(cases.len() as u64) as usize;
                let mut plan = Vec::with_capacity(n);
                while plan.len() < n {
                    let mut order: Vec<usize> = (0..cases.len()).collect();
                    rand::seq::SliceRandom::shuffle(order.as_mut_slice(), rng);
                    plan.extend(order.into_iter().take(n - plan.len()));
                }
                plan
            }
            Source::Patches(cases) => {
                vec![0; cfg.iterations_per_epoch.unwrap_or(cases.len() as u64) as usize]
            }
        }
    }

    pub(super) fn batch(
        &self,
        case: usize,
        cfg: &TrainConfig,
        roi: [i64; 3],
        rng: &mut ChaCha8Rng,
        device: Device,
    ) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            Source::Crops(cases) => Ok(batches::crops(&cases[case], cfg, roi, rng, device)),
            Source::Patches(cases) => patches::batch(cases, cfg, roi, rng, device),
        }
    }
}
