//! The nnunet_v1 recipe's batch source, nnU-Net v1's `DataLoader3D`: each case prepared once as
//! nnU-Net prepares it (`crate::pipeline::nnunet::train_case`: non-zero crop, resampling to the fingerprint's
//! spacing, CT normalisation; labels resampled as nnU-Net resamples segmentations), then batches
//! of patches from cases drawn with replacement, the last `round(batch · oversample)` of each
//! batch centred on a voxel of a random foreground class, the others anywhere (padding with
//! zeros where the case is smaller than the patch) — sampled larger in-plane when the spatial
//! augmentation is on, as nnU-Net does — each augmented (`nnunet_augment`). Prepared
//! cases are kept in the preprocessed cache on disk (`cache`) unless the config turns it off.

use super::TrainConfig;
use super::cache::{self, Cache};
use crate::dataset::Entry;
use crate::error::{Error, Result};
use crate::events::{Event, Progress, report};
use crate::model_file::CtNormalization;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

/// nnU-Net keeps up to this many voxel positions per class to centre patches on (or 1 % of the
/// class's voxels, if more).
const LOCATIONS_PER_CLASS: usize = 10_000;

/// One case in the network's axes `[1, z, y, x]`.
pub(super) struct PatchCase {
    image: Tensor,
    label: Option<Tensor>,
    /// Per foreground class present: flat voxel indices to centre a patch on.
    locations: Vec<Tensor>,
    /// The cache entry the tensors are mapped from (declared last: dropped after them).
    _entry: Option<memmap2::Mmap>,
}

/// Prepares each training case, or reads it from `cache`; `classes` checks label values
/// (fine-tune). `hashes` are the cases' file hashes ([`cache::case_hash`]).
pub(super) fn prepare_cases(
    entries: &[Entry],
    hashes: &[String],
    norm: &CtNormalization,
    spacing: [f64; 3],
    classes: Option<u32>,
    cache: Option<&Cache>,
    progress: &mut dyn Progress,
) -> Result<Vec<PatchCase>> {
    let settings =
        serde_json::json!({"spacing": spacing, "norm": norm, "classes": classes}).to_string();
    let mut cases = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let key = cache::key(&hashes[i..=i], &settings);
        let prepare = || prepare_case(entry, &key, spacing, norm, classes);
        let case = match cache {
            None => in_memory(prepare()?),
            Some(c) => cached(c, &key, prepare, &entry.image, progress)?,
        };
        cases.push(case);
        report(
            progress,
            Event::progress("preprocess", i as u64 + 1, entries.len() as u64),
        )?;
    }
    Ok(cases)
}

/// The case from its cache entry, prepared and stored first when there is none (or a broken one).
fn cached(
    cache: &Cache,
    key: &str,
    prepare: impl Fn() -> Result<Vec<(String, Tensor)>>,
    image: &std::path::Path,
    progress: &mut dyn Progress,
) -> Result<PatchCase> {
    match cache.get(key) {
        Some(Ok(entry)) => return Ok(from_entry(entry)),
        Some(Err(why)) => report(
            progress,
            Event {
                stage: "preprocess",
                message: format!(
                    "warning: the cache entry of {} is unreadable ({why}): preparing it again",
                    image.display()
                ),
                ..Default::default()
            },
        )?,
        None => {}
    }
    cache.put(key, &prepare()?)?;
    match cache.get(key) {
        Some(Ok(entry)) => Ok(from_entry(entry)),
        Some(Err(why)) => Err(Error::internal(format!(
            "cache entry written but unreadable: {why}"
        ))),
        None => Err(Error::internal("cache entry written but absent")),
    }
}

fn from_entry(mut entry: cache::Entry) -> PatchCase {
    let mut locations: Vec<(i64, Tensor)> = entry
        .tensors
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("loc.")?.parse().ok()?, v.shallow_clone())))
        .collect();
    locations.sort_by_key(|(c, _)| *c);
    PatchCase {
        image: entry.tensors.remove("image").unwrap_or_default(),
        label: entry.tensors.remove("label"),
        locations: locations.into_iter().map(|(_, t)| t).collect(),
        _entry: Some(entry.map),
    }
}

fn in_memory(mut tensors: Vec<(String, Tensor)>) -> PatchCase {
    let mut take = |name: &str| {
        tensors
            .iter()
            .position(|(n, _)| n == name)
            .map(|i| tensors.remove(i).1)
    };
    let (image, label) = (take("image").unwrap_or_default(), take("label"));
    PatchCase {
        image,
        label,
        locations: tensors.into_iter().map(|(_, t)| t).collect(),
        _entry: None,
    }
}

/// One case as nnU-Net prepares it: `image`, `label` (when `classes`) and `loc.N`, the locations
/// drawn from an RNG seeded by the case's key (the same with or without the cache).
fn prepare_case(
    entry: &Entry,
    key: &str,
    spacing: [f64; 3],
    norm: &CtNormalization,
    classes: Option<u32>,
) -> Result<Vec<(String, Tensor)>> {
    let (image, label) =
        crate::pipeline::nnunet::train_case::prepare_case(entry, spacing, norm, classes)?;
    let mut out = vec![("image".to_string(), image)];
    if let Some(label) = label {
        let seed = u64::from_str_radix(&key[..16], 16).unwrap_or(0);
        let mut rng: ChaCha8Rng = rand::SeedableRng::seed_from_u64(seed);
        for (class, locations) in class_locations(&label, &mut rng)? {
            out.push((format!("loc.{class}"), locations));
        }
        out.push(("label".to_string(), label));
    }
    Ok(out)
}

/// nnU-Net's `class_locations`: per class present, a random subset of its voxels.
fn class_locations(label: &Tensor, rng: &mut ChaCha8Rng) -> Result<Vec<(i64, Tensor)>> {
    let flat = label.f_reshape([-1])?;
    let largest = flat.f_max()?.int64_value(&[]);
    let mut out = Vec::new();
    for class in 1..=largest {
        let all = flat.f_eq(class)?.f_nonzero()?.f_squeeze_dim(1)?;
        let n = all.size()[0] as usize;
        if n == 0 {
            continue;
        }
        let keep = LOCATIONS_PER_CLASS.min(n).max(n.div_ceil(100));
        let chosen: Vec<i64> = rand::seq::index::sample(rng, n, keep)
            .into_iter()
            .map(|i| i as i64)
            .collect();
        out.push((class, all.f_index_select(0, &Tensor::from_slice(&chosen))?));
    }
    Ok(out)
}

/// The patches `[b, 1, patch]` (and labels) of the global batch slots `mine`, out of `slots`:
/// slot j is forced onto foreground when j ≥ round(slots · (1 − oversample)), as nnU-Net's
/// `get_do_oversample` decides for a batch of that size; each patch's draws come from its slot's
/// RNG (`rngs`), which also seeds libtorch's generator for the voxel noise.
pub(super) fn batch(
    cases: &[PatchCase],
    cfg: &TrainConfig,
    patch: [i64; 3],
    mine: std::ops::Range<u64>,
    slots: u64,
    rngs: &mut [ChaCha8Rng],
    device: Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let random_ones = (slots as f64 * (1.0 - cfg.oversample_foreground)).round_ties_even() as u64;
    let aug = &cfg.nnunet_augment;
    let sampled = aug.sampled_patch(patch);
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for (j, rng) in mine.zip(rngs) {
        let case = &cases[rng.random_range(0..cases.len())];
        let start = patch_start(case, sampled, j >= random_ones, rng);
        let image = cut(&case.image, start, sampled)?.f_to_device(device)?;
        let label = case
            .label
            .as_ref()
            .map(|l| -> Result<Tensor> { Ok(cut(l, start, sampled)?.f_to_device(device)?) })
            .transpose()?;
        tch::manual_seed((rng.random::<u64>() >> 1) as i64);
        let (image, label) = aug.spatial(image, label, patch, rng)?;
        let (image, label) = aug.apply(image, label, rng)?;
        images.push(image);
        labels.extend(label);
    }
    let labels = (!labels.is_empty())
        .then(|| Tensor::f_stack(&labels, 0))
        .transpose()?;
    Ok((Tensor::f_stack(&images, 0)?, labels))
}

/// The patch's first voxel per axis (may be negative or run past the end: padded there).
fn patch_start(
    case: &PatchCase,
    patch: [i64; 3],
    force_fg: bool,
    rng: &mut ChaCha8Rng,
) -> [i64; 3] {
    let shape: [i64; 3] = std::array::from_fn(|d| case.image.size()[d + 1]);
    let pad: [i64; 3] = std::array::from_fn(|d| (patch[d] - shape[d]).max(0));
    let lb: [i64; 3] = std::array::from_fn(|d| (-pad[d]).div_euclid(2));
    let ub: [i64; 3] = std::array::from_fn(|d| shape[d] + pad[d] / 2 + pad[d] % 2 - patch[d]);
    if force_fg && !case.locations.is_empty() {
        let class = &case.locations[rng.random_range(0..case.locations.len())];
        let flat = class.int64_value(&[rng.random_range(0..class.size()[0])]);
        let voxel = [
            flat / (shape[1] * shape[2]),
            (flat / shape[2]) % shape[1],
            flat % shape[2],
        ];
        return std::array::from_fn(|d| lb[d].max(voxel[d] - patch[d] / 2));
    }
    std::array::from_fn(|d| rng.random_range(lb[d]..=ub[d]))
}

/// `t` `[1, z, y, x]` from `start` over `patch`, zero outside.
fn cut(t: &Tensor, start: [i64; 3], patch: [i64; 3]) -> Result<Tensor> {
    let mut out = t.shallow_clone();
    let mut pads = [0i64; 6];
    for d in 0..3 {
        let n = out.size()[d + 1];
        let (lo, hi) = (start[d].max(0), (start[d] + patch[d]).min(n));
        out = out.f_narrow(d as i64 + 1, lo, hi - lo)?;
        // constant_pad_nd lists the last axis first
        pads[2 * (2 - d)] = lo - start[d];
        pads[2 * (2 - d) + 1] = start[d] + patch[d] - hi;
    }
    Ok(out.f_constant_pad_nd(pads.as_slice())?)
}
