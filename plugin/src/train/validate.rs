//! Online validation: Dice on the dataset's validation cases, as `segment` would produce them.

use crate::bundle::Model;
use crate::dataset::DatasetFile;
use crate::error::Result;
use crate::events::{Event, Progress, report};
use std::collections::BTreeMap;

/// Dice on the validation cases (sliding window on the whole volume, back on the original grid, as
/// `segment` does): the mean over cases and labels (`only` those, when given), and the mean per label.
pub(super) fn validate(
    model: &Model,
    ds: &DatasetFile,
    only: Option<&[u32]>,
    progress: &mut dyn Progress,
) -> Result<(f64, BTreeMap<u32, f64>)> {
    let opts = crate::segment::SegmentOptions {
        blend: crate::infer::Blend::Constant,
        // nnU-Net validates online without mirroring
        mirror: Some(false),
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
            .filter(|&l| l != 0 && only.is_none_or(|o| o.contains(&l)))
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

/// [`validate`], reported as a "validate" event with the Dice per label; returns the mean Dice.
pub(super) fn validate_and_report(
    model: &Model,
    ds: &DatasetFile,
    only: Option<&[u32]>,
    epoch: u64,
    progress: &mut dyn Progress,
) -> Result<f64> {
    let (dice, per_label) = validate(model, ds, only, progress)?;
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
