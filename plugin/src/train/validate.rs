//! Online validation: Dice on the dataset's validation cases, as `segment` would produce them;
//! in a data-parallel job each rank scores its share of the cases and the sums are added up, so
//! the figures are one process's.

use crate::dataset::DatasetFile;
use crate::distributed::Peers;
use crate::error::Result;
use crate::events::{Event, Progress, report};
use crate::model_file::Model;
use std::collections::BTreeMap;

/// Dice on the validation cases (sliding window on the whole volume, back on the original grid, as
/// `segment` does): the mean over cases and labels (`only` those, when given), and the mean per
/// label. Rank r of W scores cases r, r + W, …
pub(super) fn validate(
    model: &Model,
    ds: &DatasetFile,
    only: Option<&[u32]>,
    peers: &Peers,
    progress: &mut dyn Progress,
) -> Result<(f64, BTreeMap<u32, f64>)> {
    // MONAI's `sliding_window_inference` blends with a constant by default, nnU-Net with its
    // Gaussian; nnU-Net validates online without mirroring.
    let blend = match model.meta.preprocessing.pipeline() {
        crate::model_file::Pipeline::Monai => crate::pipeline::window::Blend::Constant,
        crate::model_file::Pipeline::NnUnet => crate::pipeline::window::Blend::Gaussian,
    };
    let opts = crate::pipeline::SegmentOptions {
        blend,
        mirror: Some(crate::pipeline::options::Mirror::All(false)),
        ..Default::default()
    };
    let (rank, world) = (peers.rank() as usize, peers.world() as usize);
    let labels: Vec<u32> = model
        .meta
        .labels
        .keys()
        .copied()
        .filter(|&l| l != 0 && only.is_none_or(|o| o.contains(&l)))
        .collect();
    // (sum of Dice, count) per label of `labels`: added up over the ranks afterwards
    let mut totals = vec![0.0; 2 * labels.len()];
    for (i, entry) in ds.validation.iter().enumerate() {
        let Some(label_path) = entry.label.as_ref().filter(|_| i % world == rank) else {
            continue;
        };
        let image = crate::io::read_volume(&entry.image)?;
        let reference = crate::io::read_volume(label_path)?;
        let classes = model.meta.arch.out_channels() as u32;
        crate::dataset::check_label(&image, &reference, label_path, Some(classes))?;
        let pred = crate::pipeline::segment(model, &image, &opts, &mut crate::events::Silent)?;
        for (l, s) in crate::metrics::score(&pred, &reference, &labels)? {
            if let (Some(d), Some(k)) = (s.dice, labels.iter().position(|&x| x == l)) {
                totals[2 * k] += d;
                totals[2 * k + 1] += 1.0;
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
    let totals = peers.sum("adding up the validation Dice", &totals, true)?;
    let per_label = labels
        .iter()
        .zip(totals.chunks(2))
        .filter(|(_, sk)| sk[1] > 0.0)
        .map(|(&l, sk)| (l, sk[0] / sk[1]))
        .collect();
    let (sum, n) = totals
        .chunks(2)
        .fold((0.0, 0.0), |(s, n), sk| (s + sk[0], n + sk[1]));
    Ok((if n > 0.0 { sum / n } else { 0.0 }, per_label))
}

/// [`validate`], reported as a "validate" event with the Dice per label; returns the mean Dice.
pub(super) fn validate_and_report(
    model: &Model,
    ds: &DatasetFile,
    only: Option<&[u32]>,
    epoch: u64,
    peers: &Peers,
    progress: &mut dyn Progress,
) -> Result<f64> {
    let (dice, per_label) = validate(model, ds, only, peers, progress)?;
    let table: Vec<String> = per_label
        .iter()
        .map(|(l, d)| {
            let name = model.meta.labels.get(l).cloned();
            format!("{}:{d:.3}", name.unwrap_or_else(|| l.to_string()))
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
    Ok(dice)
}
