//! nnU-Net v1's dataset fingerprint, as much of it as the nnunet_v1 recipe uses
//! (`DatasetAnalyzer.collect_intensity_properties`, `ExperimentPlanner.get_target_spacing`): the
//! median voxel spacing of the training cases, and the intensity statistics of their foreground
//! (every 10th labelled voxel of each case cropped to its non-zero box, in the stored array's
//! (z, y, x) order, all cases together): 0.5 and 99.5 percentiles, mean and standard deviation.
//! It is computed once per run and stored in the model file as its preprocessing.

use crate::dataset::{Entry, check_label};
use crate::error::{Error, Result};
use crate::events::{Event, Progress, report};
use crate::model_file::CtNormalization;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Fingerprint {
    /// Median spacing per stored axis (x, y, z), mm.
    pub spacing: [f64; 3],
    pub ct: CtNormalization,
}

/// nnU-Net's foreground voxels of one case: the image cropped to its non-zero box, where the
/// label is positive (without a label: where the image is non-zero), every 10th in C order of
/// the (z, y, x) array.
fn foreground_voxels(entry: &Entry) -> Result<(Tensor, [f64; 3])> {
    let image = crate::io::read_volume(&entry.image)?;
    let data = image.data.f_to_kind(Kind::Float)?;
    let mask = match &entry.label {
        Some(path) => {
            let label = crate::io::read_volume(path)?;
            check_label(&image, &label, path, None)?;
            label.data.f_gt(0)?
        }
        None => data.f_ne(0.0)?,
    };
    let (start, end) = super::prepare::nonzero_box(&data)?;
    let crop = |t: &Tensor| -> Result<Tensor> {
        let mut t = t.shallow_clone();
        for d in 0..3 {
            t = t.f_narrow(d as i64, start[d], end[d] - start[d])?;
        }
        Ok(t.f_permute([2, 1, 0])?.f_contiguous()?.f_reshape([-1])?)
    };
    let voxels = crop(&data)?.f_masked_select(&crop(&mask)?)?;
    let every_tenth =
        Tensor::f_arange_start_step(0, voxels.size()[0], 10, (Kind::Int64, voxels.device()))?;
    Ok((voxels.f_index_select(0, &every_tenth)?, image.spacing()))
}

/// numpy's `percentile` (linear interpolation) of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// The fingerprint of the training cases.
pub fn compute(entries: &[Entry], progress: &mut dyn Progress) -> Result<Fingerprint> {
    let mut voxels = Vec::new();
    let mut spacings: [Vec<f64>; 3] = Default::default();
    for (i, entry) in entries.iter().enumerate() {
        let (v, spacing) = foreground_voxels(entry)?;
        voxels.push(v);
        for d in 0..3 {
            spacings[d].push(spacing[d]);
        }
        report(
            progress,
            Event::progress("fingerprint", i as u64 + 1, entries.len() as u64),
        )?;
    }
    let all = Tensor::f_cat(&voxels, 0)?.f_to_kind(Kind::Double)?;
    let mut values = Vec::<f64>::try_from(&all).map_err(|e| Error::internal(e.to_string()))?;
    if values.is_empty() {
        return Err(Error::invalid(
            "dataset fingerprint: the training cases have no foreground voxels (labels > 0) to \
             take the CT normalisation from",
        ));
    }
    values.sort_by(f64::total_cmp);
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let sd = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    let spacing = std::array::from_fn(|d| {
        let mut s = spacings[d].clone();
        s.sort_by(f64::total_cmp);
        percentile(&s, 50.0)
    });
    Ok(Fingerprint {
        spacing,
        ct: CtNormalization {
            lower: percentile(&values, 0.5),
            upper: percentile(&values, 99.5),
            mean,
            // a constant foreground would divide by zero
            sd: if sd > 0.0 { sd } else { 1.0 },
        },
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles_interpolate_as_numpy() {
        let v = [1.0, 2.0, 4.0, 8.0];
        assert_eq!(super::percentile(&v, 50.0), 3.0);
        assert!((super::percentile(&v, 99.5) - 7.94).abs() < 1e-12);
        assert!((super::percentile(&v, 0.5) - 1.015).abs() < 1e-12);
    }
}
