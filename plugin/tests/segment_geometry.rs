//! The segmentation pipeline's geometry: whatever the input's orientation, spacing or format, the
//! label map lands on the input's own grid, and what sits at a world point comes back at that
//! point. The network is replaced by a threshold on the preprocessed intensity so that the expected
//! answer is known exactly.

mod common;

use lwi::bundle::Preprocessing;
use lwi::segment::{Pipeline, ResampleBack, SegmentOptions, run};
use lwi::volume::{Affine, DType, Volume};
use lwi::{Result, events::Silent};
use tch::{Device, Kind, Tensor};

/// Class 1 where the windowed intensity exceeds 0.705: half-way between soft tissue (0 HU → 0.41)
/// and the 300 HU objects (clipped to 1), so partial volumes split evenly.
fn threshold(input: &Tensor) -> Result<Tensor> {
    let fg = ((input - 0.705) * 50.0).sigmoid();
    Ok(Tensor::cat(&[1.0 - &fg, fg], 1))
}

fn pre() -> Preprocessing {
    Preprocessing {
        roi_size: [32, 32, 32],
        ..Default::default()
    }
}

fn segment(volume: &Volume, resample: ResampleBack) -> Volume {
    let preprocessing = pre();
    let pipeline = Pipeline {
        preprocessing: &preprocessing,
        classes: 2,
        device: Device::Cpu,
        predict: &threshold,
    };
    let opts = SegmentOptions {
        resample,
        ..Default::default()
    };
    run(&pipeline, volume, &opts, &mut Silent).unwrap()
}

fn apply(m: &Affine, p: [f64; 3]) -> [f64; 3] {
    std::array::from_fn(|r| (0..3).map(|k| m[r][k] * p[k]).sum::<f64>() + m[r][3])
}

/// A soft-tissue (0 HU) volume with a 300 HU ball of `radius` mm at world point `centre`.
fn ball_volume(affine: Affine, dims: [i64; 3], centre: [f64; 3], radius: f64) -> (Volume, Tensor) {
    let n = (dims[0] * dims[1] * dims[2]) as usize;
    let mut hu = vec![0f32; n];
    let mut truth = vec![0u8; n];
    for k in 0..dims[2] {
        for j in 0..dims[1] {
            for i in 0..dims[0] {
                let p = apply(&affine, [i as f64, j as f64, k as f64]);
                let d = ((p[0] - centre[0]).powi(2)
                    + (p[1] - centre[1]).powi(2)
                    + (p[2] - centre[2]).powi(2))
                .sqrt();
                let idx = (i + dims[0] * (j + dims[1] * k)) as usize;
                if d <= radius {
                    hu[idx] = 300.0;
                    truth[idx] = 1;
                }
            }
        }
    }
    let bytes: Vec<u8> = hu.iter().flat_map(|v| v.to_le_bytes()).collect();
    let data = DType::F32.tensor_from_le_bytes(&bytes, dims).unwrap();
    let truth = DType::U8.tensor_from_le_bytes(&truth, dims).unwrap();
    (Volume::new(data, affine, DType::F32).unwrap(), truth)
}

fn dice(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.gt(0).to_kind(Kind::Float), b.gt(0).to_kind(Kind::Float));
    2.0 * (&a * &b).sum(Kind::Float).double_value(&[])
        / (a.sum(Kind::Float) + b.sum(Kind::Float)).double_value(&[])
}

fn orientations() -> Vec<(&'static str, Affine)> {
    let (c, s) = (0.35f64.cos(), 0.35f64.sin());
    let (ct, st) = (0.2f64.cos(), 0.2f64.sin());
    // rotation about z, then a tilt about x, with anisotropic spacing
    let r = [[c, -s * ct, s * st], [s, c * ct, -c * st], [0.0, st, ct]];
    let sp = [1.1, 1.3, 2.5];
    let oblique: Affine = [
        [r[0][0] * sp[0], r[0][1] * sp[1], r[0][2] * sp[2], -20.0],
        [r[1][0] * sp[0], r[1][1] * sp[1], r[1][2] * sp[2], -25.0],
        [r[2][0] * sp[0], r[2][1] * sp[1], r[2][2] * sp[2], -30.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    vec![
        (
            "RAS",
            [
                [1.1, 0.0, 0.0, -22.0],
                [0.0, 1.3, 0.0, -23.4],
                [0.0, 0.0, 2.5, -37.5],
                [0.0, 0.0, 0.0, 1.0],
            ],
        ),
        (
            "LPS",
            [
                [-1.1, 0.0, 0.0, 22.0],
                [0.0, -1.3, 0.0, 23.4],
                [0.0, 0.0, 2.5, -37.5],
                [0.0, 0.0, 0.0, 1.0],
            ],
        ),
        (
            "LAS",
            [
                [-1.1, 0.0, 0.0, 22.0],
                [0.0, 1.3, 0.0, -23.4],
                [0.0, 0.0, 2.5, -37.5],
                [0.0, 0.0, 0.0, 1.0],
            ],
        ),
        // voxel axes run S, L, A: a permutation as well
        (
            "SLA",
            [
                [0.0, -1.1, 0.0, 22.0],
                [0.0, 0.0, 1.3, -23.4],
                [2.5, 0.0, 0.0, -37.5],
                [0.0, 0.0, 0.0, 1.0],
            ],
        ),
        ("oblique", oblique),
    ]
}

#[test]
fn labels_land_on_the_input_grid_at_the_right_world_point() {
    let centre = [3.0, -4.0, 6.0];
    for (name, affine) in orientations() {
        let dims = if name == "SLA" {
            [30, 40, 36]
        } else {
            [40, 36, 30]
        };
        let (volume, truth) = ball_volume(affine, dims, centre, 9.0);
        for format in ["nii.gz", "nrrd"] {
            // Through a file, as a host hands volumes over.
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("in.{format}"));
            lwi::io::write_volume(&volume, &path).unwrap();
            let input = lwi::io::read_volume(&path).unwrap();
            let labels = segment(&input, ResampleBack::Scores);
            let out = dir.path().join(format!("labels.{format}"));
            lwi::io::write_volume(&labels, &out).unwrap();
            let back = lwi::io::read_volume(&out).unwrap();
            assert_eq!(back.dims(), input.dims(), "{name} {format}: dims");
            assert_eq!(
                back.affine, input.affine,
                "{name} {format}: affine must be the input's, exactly"
            );
            let d = dice(&back.data, &truth);
            // the labelled voxels' world centroid is the ball's centre
            let idx = back.data.gt(0).nonzero().to_kind(Kind::Double);
            let mean: Vec<f64> = (0..3)
                .map(|c| idx.select(1, c).mean(Kind::Double).double_value(&[]))
                .collect();
            let got = apply(&back.affine, [mean[0], mean[1], mean[2]]);
            let off = (0..3)
                .map(|r| (got[r] - centre[r]).powi(2))
                .sum::<f64>()
                .sqrt();
            let nearest = dice(&segment(&input, ResampleBack::Nearest).data, &truth);
            common::report(
                "segment-geometry",
                &format!(
                    "{name:<8} {format:<7} dice vs truth {d:.4} (nearest-label resampling {nearest:.4}), centroid off by {off:.3} mm"
                ),
            );
            assert!(d > 0.9, "{name} {format}: dice {d}");
            assert!(off < 0.6, "{name} {format}: centroid {got:?} vs {centre:?}");
        }
    }
}

#[test]
fn a_one_voxel_thick_plane_survives_the_round_trip() {
    // Input at 3 mm between slices (as many CTs), the model works at 2 mm: a plane one input
    // voxel thick must come back whole.
    let affine: Affine = [
        [-1.5, 0.0, 0.0, 30.0],
        [0.0, -1.5, 0.0, 30.0],
        [0.0, 0.0, 3.0, -45.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let dims = [40, 40, 30];
    let mut data = Tensor::zeros(dims, (Kind::Float, Device::Cpu));
    for k in [7, 14, 21] {
        let _ = data.narrow(2, k, 1).fill_(300.0);
    }
    data = data.contiguous();
    let truth = data.gt(0.0);
    let volume = Volume::new(data, affine, DType::F32).unwrap();
    let mut kept = Vec::new();
    for method in [ResampleBack::Scores, ResampleBack::Nearest] {
        let labels = segment(&volume, method);
        let found = labels
            .data
            .gt(0)
            .logical_and(&truth)
            .sum(Kind::Int64)
            .int64_value(&[]);
        let extra = labels
            .data
            .gt(0)
            .logical_and(&truth.logical_not())
            .sum(Kind::Int64)
            .int64_value(&[]);
        let total = truth.sum(Kind::Int64).int64_value(&[]);
        common::report(
            "segment-geometry",
            &format!(
                "thin planes, {method:?}: {found}/{total} plane voxels kept, {extra} voxels added"
            ),
        );
        kept.push(found as f64 / total as f64);
    }
    assert!(
        kept[0] >= 0.99,
        "probability resampling keeps the planes: {kept:?}"
    );
}
