//! The batch source: per-volume random crops (MONAI's `RandCropByPosNegLabeld`) with the method's
//! augmentation, every random decision drawn from the run's RNG so that a resumed run repeats them.

use super::{Augment, TrainConfig};
use crate::dataset::Entry;
use crate::error::Result;
use crate::events::{Event, Progress, report};
use crate::model_file::MonaiPreprocessing;
use crate::pipeline::monai::train_case::prepare_case;
use crate::pipeline::window::pad_to_roi;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

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

pub(super) struct Prepared {
    image: Tensor,
    label: Option<Tensor>,
    sampler: Sampler,
}

pub(super) fn crops(
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
        let (img, lab) = (cut(&p.image), p.label.as_ref().map(cut));
        let (img, lab) = augment(img, lab, &cfg.augment, roi, rng);
        images.push(img);
        labels.extend(lab);
    }
    let labels = (!labels.is_empty()).then(|| Tensor::stack(&labels, 0));
    (Tensor::stack(&images, 0), labels)
}

/// Flips on each axis, an in-plane quarter turn, intensity scale and shift (method §1.1).
fn augment(
    mut img: Tensor,
    mut lab: Option<Tensor>,
    a: &Augment,
    roi: [i64; 3],
    rng: &mut ChaCha8Rng,
) -> (Tensor, Option<Tensor>) {
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
    (img, lab)
}

/// The training cases preprocessed, padded to the roi and ready to sample from.
pub(super) fn prepare_cases(
    entries: &[Entry],
    pre: &MonaiPreprocessing,
    roi: [i64; 3],
    label_classes: Option<u32>,
    progress: &mut dyn Progress,
) -> Result<Vec<Prepared>> {
    let event = |done: usize| Event {
        stage: "preprocess",
        done: done as u64,
        total: entries.len() as u64,
        ..Default::default()
    };
    report(progress, event(0))?;
    let mut cases = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let case = prepare_case(entry, pre, label_classes)?;
        let image = pad_to_roi(&case.image, roi)?.0;
        let label = case
            .label
            .as_ref()
            .map(|l| pad_to_roi(l, roi))
            .transpose()?
            .map(|p| p.0);
        let sampler = Sampler::new(&image, label.as_ref());
        cases.push(Prepared {
            image,
            label,
            sampler,
        });
        report(progress, event(i + 1))?;
    }
    Ok(cases)
}
