//! Dice and the 95th-percentile Hausdorff distance (HD95) in millimetres, per label, as MONAI's
//! `compute_dice` and `compute_hausdorff_distance(percentile=95, spacing=…)` compute them.
//!
//! Surfaces are mask voxels with a 6-neighbour outside the mask (outside the image counts as
//! outside), distances are exact Euclidean distances between surface voxels in world spacing, and
//! HD95 is the larger of the two directed 95th percentiles (linear interpolation, as
//! `torch.quantile`). Empty masks, stated: both empty → Dice and HD95 are undefined (None, left out
//! of means); one empty → Dice 0 and HD95 undefined (infinite).

use crate::error::{Error, Result};
use crate::volume::{DType, Volume};
use serde::Serialize;
use std::collections::BTreeSet;

/// The 8 organs of the Synapse multi-organ benchmark (BTCV label ids).
pub const SYNAPSE_8: [u32; 8] = [1, 2, 3, 4, 6, 7, 8, 11];

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LabelScore {
    pub dice: Option<f64>,
    pub hd95: Option<f64>,
}

/// A label map as plain values, x fastest.
struct Labels {
    values: Vec<u32>,
    dims: [usize; 3],
}

fn labels_of(v: &Volume) -> Result<Labels> {
    let bytes = DType::U32.le_bytes_from_tensor(&v.data.round())?;
    let values = bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let d = v.dims();
    Ok(Labels {
        values,
        dims: [d[0] as usize, d[1] as usize, d[2] as usize],
    })
}

/// Label values present (other than 0).
pub fn present_labels(v: &Volume) -> Result<BTreeSet<u32>> {
    Ok(labels_of(v)?
        .values
        .into_iter()
        .filter(|&l| l != 0)
        .collect())
}

/// Scores `pred` against `reference` for each label; both must lie on the same grid.
pub fn score(pred: &Volume, reference: &Volume, labels: &[u32]) -> Result<Vec<(u32, LabelScore)>> {
    if pred.dims() != reference.dims() {
        return Err(Error::invalid(format!(
            "prediction dims {:?} differ from the reference's {:?}",
            pred.dims(),
            reference.dims()
        )));
    }
    let worst = (0..4)
        .flat_map(|r| (0..4).map(move |c| (r, c)))
        .map(|(r, c)| (pred.affine[r][c] - reference.affine[r][c]).abs())
        .fold(0.0, f64::max);
    if worst > 1e-3 {
        return Err(Error::invalid(format!(
            "prediction and reference lie on different grids (affines differ by {worst:.3e} mm)"
        )));
    }
    let spacing = reference.spacing();
    let (p, r) = (labels_of(pred)?, labels_of(reference)?);
    Ok(labels
        .iter()
        .map(|&l| {
            let a: Vec<bool> = p.values.iter().map(|&v| v == l).collect();
            let b: Vec<bool> = r.values.iter().map(|&v| v == l).collect();
            (l, score_masks(&a, &b, p.dims, spacing))
        })
        .collect())
}

/// Dice and HD95 of two boolean masks of `dims` (x fastest) with voxel `spacing` in mm.
pub fn score_masks(
    pred: &[bool],
    reference: &[bool],
    dims: [usize; 3],
    spacing: [f64; 3],
) -> LabelScore {
    let (np, nr) = (
        pred.iter().filter(|&&v| v).count(),
        reference.iter().filter(|&&v| v).count(),
    );
    if np == 0 && nr == 0 {
        return LabelScore {
            dice: None,
            hd95: None,
        };
    }
    let both = pred
        .iter()
        .zip(reference)
        .filter(|(a, b)| **a && **b)
        .count();
    let dice = 2.0 * both as f64 / (np + nr) as f64;
    if np == 0 || nr == 0 {
        return LabelScore {
            dice: Some(dice),
            hd95: None,
        };
    }
    // Work inside the bounding box of both masks, one voxel of margin (as MONAI crops).
    let (lo, hi) = bounding_box(pred, reference, dims);
    let sub = [hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]];
    let crop = |m: &[bool]| -> Vec<bool> {
        let mut out = vec![false; sub[0] * sub[1] * sub[2]];
        for z in 0..sub[2] {
            for y in 0..sub[1] {
                for x in 0..sub[0] {
                    let (gx, gy, gz) = (x + lo[0], y + lo[1], z + lo[2]);
                    if gx < dims[0] && gy < dims[1] && gz < dims[2] {
                        out[x + sub[0] * (y + sub[1] * z)] = m[gx + dims[0] * (gy + dims[1] * gz)];
                    }
                }
            }
        }
        out
    };
    let (ep, er) = (surface(&crop(pred), sub), surface(&crop(reference), sub));
    let d_pr = directed_distances(&ep, &er, sub, spacing);
    let d_rp = directed_distances(&er, &ep, sub, spacing);
    let hd95 = quantile(d_pr, 0.95).max(quantile(d_rp, 0.95));
    LabelScore {
        dice: Some(dice),
        hd95: Some(hd95),
    }
}

/// Bounding box (start, end) of the union with one voxel of margin; `end` may pass the image edge.
fn bounding_box(a: &[bool], b: &[bool], dims: [usize; 3]) -> ([usize; 3], [usize; 3]) {
    let mut lo = dims;
    let mut hi = [0usize; 3];
    for (i, _) in a.iter().zip(b).enumerate().filter(|(_, (x, y))| **x || **y) {
        let c = [
            i % dims[0],
            (i / dims[0]) % dims[1],
            i / (dims[0] * dims[1]),
        ];
        for d in 0..3 {
            lo[d] = lo[d].min(c[d]);
            hi[d] = hi[d].max(c[d] + 1);
        }
    }
    (lo.map(|v| v.saturating_sub(1)), hi.map(|v| v + 1))
}

/// Mask voxels with a 6-neighbour outside the mask or outside the array.
fn surface(m: &[bool], dims: [usize; 3]) -> Vec<bool> {
    let idx = |x: usize, y: usize, z: usize| x + dims[0] * (y + dims[1] * z);
    let mut out = vec![false; m.len()];
    for z in 0..dims[2] {
        for y in 0..dims[1] {
            for x in 0..dims[0] {
                if !m[idx(x, y, z)] {
                    continue;
                }
                let inside = |dx: i64, dy: i64, dz: i64| {
                    let (a, b, c) = (x as i64 + dx, y as i64 + dy, z as i64 + dz);
                    a >= 0
                        && b >= 0
                        && c >= 0
                        && (a as usize) < dims[0]
                        && (b as usize) < dims[1]
                        && (c as usize) < dims[2]
                        && m[idx(a as usize, b as usize, c as usize)]
                };
                let interior = inside(1, 0, 0)
                    && inside(-1, 0, 0)
                    && inside(0, 1, 0)
                    && inside(0, -1, 0)
                    && inside(0, 0, 1)
                    && inside(0, 0, -1);
                out[idx(x, y, z)] = !interior;
            }
        }
    }
    out
}

/// For every `from` voxel, the distance in mm to the nearest `to` voxel: an exact Euclidean
/// distance transform of `to` (separable lower envelopes, Felzenszwalb & Huttenlocher), read at `from`.
fn directed_distances(from: &[bool], to: &[bool], dims: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let mut f: Vec<f64> = to
        .iter()
        .map(|&t| if t { 0.0 } else { f64::INFINITY })
        .collect();
    let strides = [1, dims[0], dims[0] * dims[1]];
    for axis in 0..3 {
        let n = dims[axis];
        let w = spacing[axis] * spacing[axis];
        let mut line = vec![0.0; n];
        let mut out = vec![0.0; n];
        let others: Vec<usize> = (0..3).filter(|&a| a != axis).collect();
        for b in 0..dims[others[1]] {
            for a in 0..dims[others[0]] {
                let base = a * strides[others[0]] + b * strides[others[1]];
                for (i, v) in line.iter_mut().enumerate() {
                    *v = f[base + i * strides[axis]];
                }
                lower_envelope(&line, w, &mut out);
                for (i, v) in out.iter().enumerate() {
                    f[base + i * strides[axis]] = *v;
                }
            }
        }
    }
    from.iter()
        .zip(&f)
        .filter(|(m, _)| **m)
        .map(|(_, d)| d.sqrt())
        .collect()
}

/// 1-D squared distance transform: out[q] = min_p (w·(q − p)² + f[p]).
fn lower_envelope(f: &[f64], w: f64, out: &mut [f64]) {
    let n = f.len();
    let sites: Vec<usize> = (0..n).filter(|&p| f[p].is_finite()).collect();
    if sites.is_empty() {
        out.iter_mut().for_each(|v| *v = f64::INFINITY);
        return;
    }
    let mut v: Vec<usize> = Vec::with_capacity(sites.len());
    let mut z: Vec<f64> = Vec::with_capacity(sites.len() + 1);
    let meet = |p: usize, q: usize| {
        ((f[p] + w * (p * p) as f64) - (f[q] + w * (q * q) as f64))
            / (2.0 * w * (p as f64 - q as f64))
    };
    for &p in &sites {
        while let Some(&q) = v.last() {
            let s = meet(p, q);
            if s <= *z.last().unwrap_or(&f64::NEG_INFINITY) {
                v.pop();
                z.pop();
            } else {
                break;
            }
        }
        let s = v.last().map_or(f64::NEG_INFINITY, |&q| meet(p, q));
        v.push(p);
        z.push(s);
    }
    z.push(f64::INFINITY);
    let mut k = 0;
    for (q, o) in out.iter_mut().enumerate() {
        while z[k + 1] < q as f64 {
            k += 1;
        }
        let p = v[k];
        *o = w * (q as f64 - p as f64).powi(2) + f[p];
    }
}

/// `torch.quantile` with linear interpolation.
fn quantile(mut d: Vec<f64>, q: f64) -> f64 {
    d.sort_by(f64::total_cmp);
    let pos = q * (d.len() - 1) as f64;
    let (i, frac) = (pos.floor() as usize, pos - pos.floor());
    if i + 1 < d.len() {
        d[i] + frac * (d[i + 1] - d[i])
    } else {
        d[i]
    }
}

/// Options of `lwi_evaluate`.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluateOptions {
    /// Label values to score; absent: every non-zero label present.
    pub labels: Option<Vec<u32>>,
}

/// `lwi evaluate`: scores a prediction against a reference, files or folders (matched by file
/// name). `labels` None means every non-zero label found in either. Returns the JSON report:
/// per-case, per-label `{"dice", "hd95"}`, per-label means, and the Synapse 8-organ mean when all
/// eight labels are scored.
pub fn evaluate(
    pred: &std::path::Path,
    reference: &std::path::Path,
    labels: Option<&[u32]>,
) -> Result<serde_json::Value> {
    use crate::io::{Format, read_volume};
    let pairs: Vec<(String, std::path::PathBuf, std::path::PathBuf)> = if reference.is_dir() {
        if !pred.is_dir() {
            return Err(Error::invalid(format!(
                "{} is a folder but {} is not",
                reference.display(),
                pred.display()
            )));
        }
        let mut names: Vec<String> = std::fs::read_dir(reference)
            .map_err(|e| Error::io(reference, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && Format::from_path(p).is_ok())
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        names.sort();
        if names.is_empty() {
            return Err(Error::invalid(format!(
                "{}: no volume files to evaluate",
                reference.display()
            )));
        }
        names
            .into_iter()
            .map(|n| (n.clone(), pred.join(&n), reference.join(&n)))
            .collect()
    } else {
        let name = reference
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        vec![(name, pred.to_path_buf(), reference.to_path_buf())]
    };
    let mut cases = Vec::new();
    let mut sums: std::collections::BTreeMap<u32, (f64, usize, f64, usize)> = Default::default();
    for (name, p, r) in &pairs {
        let (pv, rv) = (read_volume(p)?, read_volume(r)?);
        let wanted: Vec<u32> = match labels {
            Some(l) => l.to_vec(),
            None => present_labels(&rv)?
                .union(&present_labels(&pv)?)
                .copied()
                .collect(),
        };
        let scores = score(&pv, &rv, &wanted)
            .map_err(|e| Error::new(e.kind, format!("{name}: {}", e.message)))?;
        let mut per_label = serde_json::Map::new();
        for (l, s) in &scores {
            per_label.insert(
                l.to_string(),
                serde_json::json!({"dice": s.dice, "hd95": s.hd95}),
            );
            let e = sums.entry(*l).or_default();
            if let Some(d) = s.dice {
                e.0 += d;
                e.1 += 1;
            }
            if let Some(h) = s.hd95 {
                e.2 += h;
                e.3 += 1;
            }
        }
        cases.push(
            serde_json::json!({"case": name, "pred": p, "reference": r, "labels": per_label}),
        );
    }
    let mean_of = |s: f64, n: usize| if n > 0 { Some(s / n as f64) } else { None };
    let means: serde_json::Map<String, serde_json::Value> = sums
        .iter()
        .map(|(l, (d, nd, h, nh))| {
            (
                l.to_string(),
                serde_json::json!({"dice": mean_of(*d, *nd), "hd95": mean_of(*h, *nh)}),
            )
        })
        .collect();
    let synapse = SYNAPSE_8.iter().all(|l| sums.contains_key(l)).then(|| {
        let dice: Vec<f64> = SYNAPSE_8
            .iter()
            .filter_map(|l| mean_of(sums[l].0, sums[l].1))
            .collect();
        let hd: Vec<f64> = SYNAPSE_8
            .iter()
            .filter_map(|l| mean_of(sums[l].2, sums[l].3))
            .collect();
        serde_json::json!({
            "dice": mean_of(dice.iter().sum(), dice.len()),
            "hd95": mean_of(hd.iter().sum(), hd.len()),
        })
    });
    Ok(serde_json::json!({
        "cases": cases,
        "mean": means,
        "synapse_8_mean": synapse,
        "conventions": "Dice 2|P∩R|/(|P|+|R|); HD95 in mm (world spacing) = max of the two directed 95th percentiles of surface distances; both masks empty: dice and hd95 null, left out of means; one empty: dice 0, hd95 null (infinite).",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cube(dims: [usize; 3], lo: [usize; 3], hi: [usize; 3]) -> Vec<bool> {
        let mut m = vec![false; dims[0] * dims[1] * dims[2]];
        for z in lo[2]..hi[2] {
            for y in lo[1]..hi[1] {
                for x in lo[0]..hi[0] {
                    m[x + dims[0] * (y + dims[1] * z)] = true;
                }
            }
        }
        m
    }

    #[test]
    fn identical_masks_score_perfectly_and_shifts_measure_in_mm() {
        let dims = [20, 20, 20];
        let a = cube(dims, [5, 5, 5], [12, 12, 12]);
        let s = score_masks(&a, &a, dims, [1.0, 1.0, 1.0]);
        assert_eq!(
            s,
            LabelScore {
                dice: Some(1.0),
                hd95: Some(0.0)
            }
        );
        let b = cube(dims, [5, 5, 8], [12, 12, 15]); // shifted 3 voxels along z
        let s = score_masks(&a, &b, dims, [1.0, 1.0, 2.5]);
        assert!((s.hd95.unwrap() - 7.5).abs() < 1e-9, "{s:?}");
        assert!((s.dice.unwrap() - 2.0 * 4.0 / 14.0).abs() < 1e-12);
    }

    #[test]
    fn empty_masks_follow_the_stated_conventions() {
        let dims = [6, 6, 6];
        let empty = vec![false; 216];
        let some = cube(dims, [1, 1, 1], [3, 3, 3]);
        assert_eq!(
            score_masks(&empty, &empty, dims, [1.0; 3]),
            LabelScore {
                dice: None,
                hd95: None
            }
        );
        assert_eq!(
            score_masks(&some, &empty, dims, [1.0; 3]),
            LabelScore {
                dice: Some(0.0),
                hd95: None
            }
        );
    }

    #[test]
    fn distance_transform_is_exact_against_brute_force() {
        let dims = [9, 7, 5];
        let to: Vec<bool> = (0..315).map(|i| i % 37 == 3 || i % 53 == 0).collect();
        let from = vec![true; 315];
        let sp = [0.7, 1.3, 2.9];
        let got = directed_distances(&from, &to, dims, sp);
        for (i, d) in got.iter().enumerate() {
            let c = |i: usize| [i % 9, (i / 9) % 7, i / 63];
            let want = (0..315)
                .filter(|&j| to[j])
                .map(|j| {
                    (0..3)
                        .map(|a| ((c(i)[a] as f64 - c(j)[a] as f64) * sp[a]).powi(2))
                        .sum::<f64>()
                        .sqrt()
                })
                .fold(f64::INFINITY, f64::min);
            assert!((d - want).abs() < 1e-9, "voxel {i}: {d} vs {want}");
        }
    }
}
