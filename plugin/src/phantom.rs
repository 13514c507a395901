//! Seeded synthetic CT-like abdominal volumes with the 8 Synapse organs labelled, written as an
//! MSD / nnU-Net dataset (`imagesTr/`, `labelsTr/`, `dataset.json`). For the demo, tests and
//! benchmarks: any number of cases, same seed → same bytes.
//!
//! Anatomy is defined in RAS+ millimetres around the body's centre and sampled through each case's
//! own voxel→world matrix, so cases differ in spacing and orientation while labels stay exact.
//! Organs are ellipsoids (the aorta a tube) whose coordinates are bent by a smooth random field.

use crate::error::{Error, Result};
use crate::io::{nifti, write_atomically};
use crate::volume::{Affine, DType, Volume};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Synapse label ids and names of the organs the phantom draws.
pub const LABELS: [(u8, &str); 8] = [
    (1, "spleen"),
    (2, "right kidney"),
    (3, "left kidney"),
    (4, "gallbladder"),
    (6, "liver"),
    (7, "stomach"),
    (8, "aorta"),
    (11, "pancreas"),
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PhantomOptions {
    pub cases: usize,
    pub seed: u64,
    /// Voxels along x, y, z.
    pub size: [i64; 3],
    /// Millimetres; when absent each case draws its own around 3.8 × 3.8 × 4.5.
    pub spacing: Option<[f64; 3]>,
}

impl Default for PhantomOptions {
    fn default() -> Self {
        PhantomOptions {
            cases: 4,
            seed: 0,
            size: [96, 96, 64],
            spacing: None,
        }
    }
}

struct Organ {
    label: u8,
    hu: f64,
    centre: [f64; 3],
    radii: [f64; 3],
    /// A tube along z (the aorta) ignores z in its shape test.
    tube: bool,
}

/// Nominal organs in body-centred RAS+ mm. Order is priority where shapes overlap.
fn nominal_organs() -> Vec<Organ> {
    let o = |label, hu, centre, radii, tube| Organ {
        label,
        hu,
        centre,
        radii,
        tube,
    };
    vec![
        o(8, 250.0, [-15.0, -30.0, 0.0], [12.0, 12.0, 1.0], true),
        o(2, 160.0, [65.0, -55.0, -25.0], [28.0, 25.0, 50.0], false),
        o(3, 160.0, [-65.0, -55.0, -15.0], [28.0, 25.0, 50.0], false),
        o(4, 10.0, [45.0, 45.0, 5.0], [15.0, 15.0, 28.0], false),
        o(11, 45.0, [0.0, 5.0, 0.0], [60.0, 12.0, 14.0], false),
        o(1, 50.0, [-85.0, -30.0, 45.0], [30.0, 42.0, 50.0], false),
        o(7, 30.0, [-45.0, 38.0, 50.0], [45.0, 32.0, 45.0], false),
        o(6, 65.0, [60.0, 5.0, 40.0], [75.0, 70.0, 62.0], false),
    ]
}

/// A smooth random displacement: a few sinusoids of ~100–200 mm wavelength, ~4–8 mm amplitude.
struct Warp {
    waves: Vec<([f64; 3], [f64; 3], f64)>, // (amplitude per axis, wave vector, phase)
}

impl Warp {
    fn new(rng: &mut ChaCha8Rng) -> Self {
        let waves = (0..3)
            .map(|_| {
                let amp = [
                    rng.random_range(-8.0..8.0),
                    rng.random_range(-8.0..8.0),
                    rng.random_range(-6.0..6.0),
                ];
                let k = [
                    rng.random_range(-0.06..0.06),
                    rng.random_range(-0.06..0.06),
                    rng.random_range(-0.04..0.04),
                ];
                (amp, k, rng.random_range(0.0..std::f64::consts::TAU))
            })
            .collect();
        Warp { waves }
    }
    fn apply(&self, p: [f64; 3]) -> [f64; 3] {
        let mut q = p;
        for (amp, k, phase) in &self.waves {
            let s = (k[0] * p[0] + k[1] * p[1] + k[2] * p[2] + phase).sin();
            for a in 0..3 {
                q[a] += amp[a] * s;
            }
        }
        q
    }
}

/// One case: the image (int16 HU) and its label map (uint8), on the same grid.
pub fn make_case(opts: &PhantomOptions, index: usize) -> Result<(Volume, Volume)> {
    let mut rng = ChaCha8Rng::seed_from_u64(
        opts.seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(index as u64),
    );
    let [nx, ny, nz] = opts.size;
    if opts.size.iter().any(|&n| !(8..=2048).contains(&n)) {
        return Err(Error::invalid(format!(
            "phantom size {:?}: each axis must be 8..2048 voxels",
            opts.size
        )));
    }
    let spacing = match opts.spacing {
        Some(s) if s.iter().all(|v| v.is_finite() && *v > 0.0) => s,
        Some(s) => {
            return Err(Error::invalid(format!(
                "phantom spacing {s:?} must be positive and finite"
            )));
        }
        None => [3.8, 3.8, 4.5].map(|v: f64| v * rng.random_range(0.95..1.05)),
    };
    // Orientation varies between cases as it does between scanners and exports.
    let flips = [
        [1.0, 1.0, 1.0],
        [-1.0, -1.0, 1.0],
        [-1.0, 1.0, 1.0],
        [1.0, -1.0, -1.0],
    ][rng.random_range(0..4)];
    let centre = [
        rng.random_range(-10.0..10.0),
        rng.random_range(-10.0..10.0),
        rng.random_range(-10.0..10.0),
    ];
    let mut affine: Affine = [[0.0; 4]; 4];
    for a in 0..3 {
        affine[a][a] = flips[a] * spacing[a];
        affine[a][3] = centre[a] - flips[a] * spacing[a] * (opts.size[a] - 1) as f64 / 2.0;
    }
    affine[3][3] = 1.0;

    let scale = rng.random_range(0.9..1.1);
    let organs: Vec<Organ> = nominal_organs()
        .into_iter()
        .map(|o| Organ {
            centre: [0, 1, 2].map(|a| o.centre[a] * scale + rng.random_range(-8.0..8.0)),
            radii: o.radii.map(|r| r * scale * rng.random_range(0.85..1.15)),
            ..o
        })
        .collect();
    let warps: Vec<Warp> = organs.iter().map(|_| Warp::new(&mut rng)).collect();
    let body = [
        165.0 * scale * rng.random_range(0.92..1.08),
        120.0 * scale * rng.random_range(0.92..1.08),
    ];
    let noise = Normal::new(0.0, 12.0).map_err(|e| Error::internal(e.to_string()))?;

    let n = (nx * ny * nz) as usize;
    let mut hu = vec![0i16; n];
    let mut labels = vec![0u8; n];
    // x fastest, as the files store voxels.
    let mut idx = 0;
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                let v = [i as f64, j as f64, k as f64];
                let p: [f64; 3] = std::array::from_fn(|r| {
                    affine[r][0] * v[0] + affine[r][1] * v[1] + affine[r][2] * v[2] + affine[r][3]
                });
                let (value, label) = tissue(p, body, &organs, &warps);
                hu[idx] = (value + noise.sample(&mut rng))
                    .round()
                    .clamp(-1024.0, 3071.0) as i16;
                labels[idx] = label;
                idx += 1;
            }
        }
    }
    let le = |b: &[i16]| b.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let image = Volume::new(
        DType::I16.tensor_from_le_bytes(&le(&hu), opts.size)?,
        affine,
        DType::I16,
    )?;
    let label = Volume::new(
        DType::U8.tensor_from_le_bytes(&labels, opts.size)?,
        affine,
        DType::U8,
    )?;
    Ok((image, label))
}

/// HU and label at a world point.
fn tissue(p: [f64; 3], body: [f64; 2], organs: &[Organ], warps: &[Warp]) -> (f64, u8) {
    let r_body = (p[0] / body[0]).powi(2) + (p[1] / body[1]).powi(2);
    if r_body > 1.0 {
        return (-1000.0, 0); // air
    }
    for (organ, warp) in organs.iter().zip(warps) {
        let q = warp.apply(p);
        let d: f64 = (0..3)
            .filter(|&a| !(organ.tube && a == 2))
            .map(|a| ((q[a] - organ.centre[a]) / organ.radii[a]).powi(2))
            .sum();
        if d <= 1.0 {
            return (organ.hu, organ.label);
        }
    }
    // Spine: a vertebral body with a dense rim, behind the aorta.
    let spine = ((p[0] / 22.0).powi(2) + ((p[1] + 78.0) / 20.0).powi(2)).sqrt();
    if spine <= 1.0 {
        return (if spine > 0.75 { 900.0 } else { 350.0 }, 0);
    }
    if r_body > 0.80 {
        return (if r_body > 0.88 { -100.0 } else { 45.0 }, 0); // subcutaneous fat, abdominal wall muscle
    }
    (-60.0, 0) // visceral fat
}

/// Writes `cases` phantom cases and `dataset.json` under `out_dir` (a MONAI-style `validation`
/// list holds the last fifth of the cases from three cases on). Returns the dataset.json path.
pub fn write_dataset(out_dir: &Path, opts: &PhantomOptions) -> Result<PathBuf> {
    if opts.cases == 0 || opts.cases > 10_000 {
        return Err(Error::invalid(format!(
            "phantom cases must be 1..10000, got {}",
            opts.cases
        )));
    }
    for sub in ["imagesTr", "labelsTr"] {
        let d = out_dir.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    // From three cases on, the last fifth (at least one) is held out as the validation list.
    let held_out = if opts.cases >= 3 {
        opts.cases.div_ceil(5)
    } else {
        0
    };
    let (mut training, mut validation) = (Vec::new(), Vec::new());
    for index in 0..opts.cases {
        let (image, label) = make_case(opts, index)?;
        let name = format!("phantom_{index:03}.nii.gz");
        nifti::write(&image, &out_dir.join("imagesTr").join(&name), true)?;
        nifti::write(&label, &out_dir.join("labelsTr").join(&name), true)?;
        let entry = serde_json::json!({
            "image": format!("./imagesTr/{name}"),
            "label": format!("./labelsTr/{name}"),
        });
        if index < opts.cases - held_out {
            training.push(entry)
        } else {
            validation.push(entry)
        }
    }
    let mut labels = serde_json::Map::new();
    labels.insert("0".into(), "background".into());
    for (id, name) in LABELS {
        labels.insert(id.to_string(), name.into());
    }
    let dataset = serde_json::json!({
        "name": "lwi-phantom",
        "description": format!("lwi synthetic abdominal CT phantoms, seed {}", opts.seed),
        "reference": "lwi phantom generator",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": labels,
        "numTraining": training.len(),
        "numTest": 0,
        "training": training,
        "validation": validation,
        "test": [],
    });
    let path = out_dir.join("dataset.json");
    let text =
        serde_json::to_string_pretty(&dataset).map_err(|e| Error::internal(e.to_string()))?;
    write_atomically(&path, text.as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> PhantomOptions {
        PhantomOptions {
            cases: 1,
            seed: 7,
            size: [48, 40, 32],
            spacing: None,
        }
    }

    #[test]
    fn same_seed_same_voxels_other_seed_other_voxels() {
        let (a, la) = make_case(&small(), 0).unwrap();
        let (b, lb) = make_case(&small(), 0).unwrap();
        assert!(a.data.equal(&b.data) && la.data.equal(&lb.data));
        assert_eq!(a.affine, b.affine);
        let (c, _) = make_case(&PhantomOptions { seed: 8, ..small() }, 0).unwrap();
        assert!(!a.data.equal(&c.data));
    }

    #[test]
    fn every_organ_is_present_with_plausible_intensity() {
        let (image, label) = make_case(
            &PhantomOptions {
                seed: 7,
                ..Default::default()
            },
            0,
        )
        .unwrap();
        for (id, name) in LABELS {
            let mask = label.data.eq(id as i64);
            let count = mask.sum(tch::Kind::Int64).int64_value(&[]);
            assert!(count > 0, "{name} missing");
            let mean = image
                .data
                .masked_select(&mask)
                .to_kind(tch::Kind::Double)
                .mean(tch::Kind::Double)
                .double_value(&[]);
            assert!((-50.0..300.0).contains(&mean), "{name} mean HU {mean}");
        }
        let air = image.data.min().int64_value(&[]);
        assert!(air <= -950, "corners are air");
    }
}
