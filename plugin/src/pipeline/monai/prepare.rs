//! MONAI's preparation of a volume for the network, and the way back — its chain
//! (`Orientationd("RAS")`, `Spacingd`, `ScaleIntensityRanged`, `CropForegroundd`) expressed as grids:
//! a [`Grid`] is a voxel lattice placed in RAS world space. Reorientation is exact (a permutation and
//! flips of the lattice); the spacing change defines a new lattice exactly as MONAI's `Spacing`
//! computes it; the voxels are then sampled once, from the input, at the new lattice's points.
//! Every step is a grid, so the inverse is the same sampler pointed the other way.

use crate::error::{Error, Result};
use crate::model_file::MonaiPreprocessing;
use crate::volume::{Affine, Volume, inverse, matmul};
use tch::{Device, Kind, Tensor};

/// A voxel lattice in RAS world space: `dims` voxels, voxel index → mm by `affine`.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    pub affine: Affine,
    pub dims: [i64; 3],
}

/// nibabel's `io_orientation`: for each voxel axis, the world axis it runs closest to and the sign.
/// The 3×3 part is first made shear-free by polar decomposition (SVD), and axes are assigned
/// strongest first so ties resolve as nibabel resolves them.
pub fn io_orientation(m: &Affine) -> Result<[(usize, f64); 3]> {
    let mut rs = [[0.0f64; 3]; 3];
    for c in 0..3 {
        let zoom = (0..3).map(|r| m[r][c] * m[r][c]).sum::<f64>().sqrt();
        let zoom = if zoom == 0.0 { 1.0 } else { zoom };
        for r in 0..3 {
            rs[r][c] = m[r][c] / zoom;
        }
    }
    let t = Tensor::from_slice(&rs.concat()).reshape([3, 3]);
    let (u, _s, v) = t.svd(true, true);
    let polar = u.matmul(&v.tr());
    let mut r = [[0.0f64; 3]; 3];
    for (i, row) in r.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = polar.double_value(&[i as i64, j as i64]);
        }
    }
    // Strongest input axis first (largest max |R|² in its column), stable on ties.
    let mut order: Vec<usize> = (0..3).collect();
    let strength = |c: usize| (0..3).map(|i| r[i][c] * r[i][c]).fold(0.0f64, f64::max);
    order.sort_by(|&a, &b| strength(b).total_cmp(&strength(a)));
    let mut out = [(usize::MAX, 0.0); 3];
    for c in order {
        let (row, value) = (0..3)
            .map(|i| (i, r[i][c]))
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap_or((0, 0.0));
        if value == 0.0 {
            return Err(Error::invalid(format!(
                "voxel axis {c} has no direction in world space: {m:?}"
            )));
        }
        out[c] = (row, value.signum());
        for v in &mut r[row] {
            *v = 0.0;
        }
    }
    Ok(out)
}

/// How a lattice is reordered into RAS: new axis `k` is old axis `axes[k]`, reversed if `flip[k]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reorientation {
    pub axes: [usize; 3],
    pub flip: [bool; 3],
}

/// MONAI `Orientation(axcodes="RAS")` on a lattice: the same voxels, permuted and flipped so that
/// index axes run (closest to) +R, +A, +S.
pub fn reorient_to_ras(grid: &Grid) -> Result<(Grid, Reorientation)> {
    let ornt = io_orientation(&grid.affine)?;
    let mut axes = [0usize; 3];
    let mut flip = [false; 3];
    for (input_axis, &(world_axis, sign)) in ornt.iter().enumerate() {
        axes[world_axis] = input_axis;
        flip[world_axis] = sign < 0.0;
    }
    // Voxel (0,0,0) of the new lattice sits at the far end of every flipped old axis.
    let mut start = [0.0f64; 3];
    let mut affine = [[0.0; 4]; 4];
    for k in 0..3 {
        let i = axes[k];
        let s = if flip[k] { -1.0 } else { 1.0 };
        if flip[k] {
            start[i] = (grid.dims[i] - 1) as f64;
        }
        for r in 0..3 {
            affine[r][k] = s * grid.affine[r][i];
        }
    }
    for r in 0..3 {
        affine[r][3] =
            grid.affine[r][3] + (0..3).map(|i| grid.affine[r][i] * start[i]).sum::<f64>();
    }
    affine[3][3] = 1.0;
    let dims = [grid.dims[axes[0]], grid.dims[axes[1]], grid.dims[axes[2]]];
    Ok((Grid { affine, dims }, Reorientation { axes, flip }))
}

/// MONAI `Spacing(pixdim, diagonal=False)`: the lattice with spacing `pixdim` along the same
/// directions (shear removed), its size and origin by MONAI's `compute_shape_offset` (corner
/// aligned when one input corner is minimal on every output axis, centre aligned otherwise).
pub fn respace(grid: &Grid, pixdim: [f64; 3]) -> Result<Grid> {
    if pixdim.iter().any(|p| !p.is_finite() || *p <= 0.0) {
        return Err(Error::invalid(format!(
            "target spacing {pixdim:?} must be positive"
        )));
    }
    let a = &grid.affine;
    // zoom_affine: rzs = rotation · zs with zs = chol(rzsᵀ rzs)ᵀ upper triangular.
    let mut g = [[0.0f64; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            g[i][j] = (0..3).map(|k| a[k][i] * a[k][j]).sum();
        }
    }
    let mut l = [[0.0f64; 3]; 3]; // lower Cholesky factor of g; zs = lᵀ
    for i in 0..3 {
        for j in 0..=i {
            let s: f64 = g[i][j] - (0..j).map(|k| l[i][k] * l[j][k]).sum::<f64>();
            l[i][j] = if i == j {
                s.max(0.0).sqrt()
            } else {
                s / l[j][j]
            };
        }
    }
    let mut zs: Affine = [[0.0; 4]; 4];
    for i in 0..3 {
        for j in 0..3 {
            zs[i][j] = l[j][i];
        }
    }
    zs[3][3] = 1.0;
    let mut rzs = *a;
    for r in 0..3 {
        rzs[r][3] = 0.0;
    }
    let rotation = matmul(&rzs, &inverse(&zs)?);
    let mut new = [[0.0; 4]; 4];
    for r in 0..3 {
        for c in 0..3 {
            new[r][c] = rotation[r][c] * zs[c][c].signum() * pixdim[c];
        }
    }
    new[3][3] = 1.0;

    // compute_shape_offset (scale_extent=False): corners (0, n-1) of the input in output indices.
    let to_out = matmul(&inverse(&new)?, a);
    let corners: Vec<[f64; 3]> = (0..8)
        .map(|b| {
            std::array::from_fn(|d| {
                if b >> d & 1 == 1 {
                    (grid.dims[d] - 1) as f64
                } else {
                    0.0
                }
            })
        })
        .collect();
    let apply = |m: &Affine, p: &[f64; 3]| -> [f64; 3] {
        std::array::from_fn(|r| (0..3).map(|k| m[r][k] * p[k]).sum::<f64>() + m[r][3])
    };
    let out: Vec<[f64; 3]> = corners.iter().map(|p| apply(&to_out, p)).collect();
    let dims: [i64; 3] = std::array::from_fn(|d| {
        let (lo, hi) = out
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
                (lo.min(p[d]), hi.max(p[d]))
            });
        (hi - lo + 1.0).round_ties_even() as i64 // numpy rounds half to even
    });
    crate::pipeline::check_resampled(dims, pixdim)?;
    let close = |x: f64| x.abs() <= 1e-8; // np.allclose(min_corner, 0, rtol) with its default atol
    let offset = match (0..8).find(|&i| {
        (0..3).all(|d| {
            close(
                out.iter()
                    .map(|p| p[d] - out[i][d])
                    .fold(f64::INFINITY, f64::min),
            )
        })
    }) {
        Some(i) => apply(a, &corners[i]),
        None => std::array::from_fn(|r| {
            (0..3)
                .map(|k| a[r][k] * grid.dims[k] as f64 / 2.0)
                .sum::<f64>()
                + a[r][3]
                - (0..3)
                    .map(|k| new[r][k] * dims[k] as f64 / 2.0)
                    .sum::<f64>()
        }),
    };
    for r in 0..3 {
        new[r][3] = offset[r];
    }
    if dims.iter().any(|&d| d < 1) {
        return Err(Error::invalid(format!(
            "resampling to {pixdim:?} mm leaves no voxels"
        )));
    }
    Ok(Grid { affine: new, dims })
}

/// Interpolation of [`sample`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interp {
    Linear,
    Nearest,
}

/// Samples `data` (`[C, X, Y, Z]`, float, lattice `src`) at the voxel centres of `dst` restricted to
/// z-slab `z0..z1`, giving `[C, X', Y', z1 - z0]`. Points outside `src` take the nearest border value
/// (`border`) or 0 (`zeros`), as `grid_sample` pads.
pub fn sample(
    data: &Tensor,
    src: &Affine,
    dst: &Grid,
    z: std::ops::Range<i64>,
    mode: Interp,
    border: bool,
) -> Result<Tensor> {
    let m = matmul(&inverse(src)?, &dst.affine); // dst index → src index
    let size = data.size();
    let device = data.device();
    let opts = (Kind::Float, device);
    let [nx, ny, _] = dst.dims;
    let nz = z.end - z.start;
    let i = Tensor::f_arange(nx, opts)?.view([nx, 1, 1]);
    let j = Tensor::f_arange(ny, opts)?.view([1, ny, 1]);
    let k = Tensor::f_arange_start(z.start, z.end, opts)?.view([1, 1, nz]);
    // grid_sample wants (x, y, z) = (last, middle, first) input axes, normalised to [-1, 1].
    let coord = |r: usize| -> Tensor {
        let n = size[1 + r] as f64;
        let idx = &i * m[r][0] + &j * m[r][1] + &k * m[r][2] + m[r][3];
        if n > 1.0 {
            idx * (2.0 / (n - 1.0)) - 1.0
        } else {
            idx * 0.0
        }
    };
    let grid = Tensor::stack(&[coord(2), coord(1), coord(0)], -1).unsqueeze(0);
    let input = data.unsqueeze(0);
    let mode = match mode {
        Interp::Linear => 0,
        Interp::Nearest => 1,
    };
    let out = input.f_grid_sampler(
        &grid.to_kind(input.kind()),
        mode,
        if border { 1 } else { 0 },
        true,
    )?;
    Ok(out.squeeze_dim(0))
}

/// MONAI `ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0, b_max=1, clip=True)`.
pub fn window(data: &Tensor, lo: f64, hi: f64) -> Tensor {
    ((data - lo) / (hi - lo)).clamp(0.0, 1.0)
}

/// MONAI `CropForeground` (select_fn x > 0, margin 0): the bounding box `(start, end)` of voxels
/// above zero in any channel of `[C, X, Y, Z]`, or None when there are none.
pub fn foreground_box(data: &Tensor) -> Option<([i64; 3], [i64; 3])> {
    let mask = data.gt(0.0).any_dim(0, false);
    let bounds = |dim: i64| -> Option<(i64, i64)> {
        let other: Vec<i64> = (0..3).filter(|&d| d != dim).collect();
        let line = mask.any_dim(other[1], false).any_dim(other[0], false);
        let idx = line.nonzero();
        if idx.size()[0] == 0 {
            return None;
        }
        Some((idx.min().int64_value(&[]), idx.max().int64_value(&[]) + 1))
    };
    let (x, y, z) = (bounds(0)?, bounds(1)?, bounds(2)?);
    Some(([x.0, y.0, z.0], [x.1, y.1, z.1]))
}

/// The sub-lattice `start..end` of `grid`.
pub fn crop_grid(grid: &Grid, start: [i64; 3], end: [i64; 3]) -> Grid {
    let mut affine = grid.affine;
    for r in 0..3 {
        affine[r][3] += (0..3)
            .map(|k| grid.affine[r][k] * start[k] as f64)
            .sum::<f64>();
    }
    Grid {
        affine,
        dims: std::array::from_fn(|d| end[d] - start[d]),
    }
}

/// The box `start..end` of `[C, X, Y, Z]`, contiguous.
pub fn crop_box(t: &Tensor, start: [i64; 3], end: [i64; 3]) -> Tensor {
    let mut v = t.shallow_clone();
    for d in 0..3 {
        v = v.narrow(1 + d as i64, start[d], end[d] - start[d]);
    }
    v.contiguous()
}

/// The network's view of a volume: the preprocessed image and where it lies.
pub struct Prepared {
    /// `[1, X, Y, Z]` float, windowed to [0, 1], cropped to the foreground.
    pub image: Tensor,
    /// The lattice of `image`.
    pub grid: Grid,
    /// The model-spacing lattice before the crop, and the crop box on it (labels follow the image).
    pub target: Grid,
    pub crop: ([i64; 3], [i64; 3]),
}

/// Samples `data` onto `dst` slab by slab (z), concatenating the slabs: bounds the sampling grid's memory.
pub fn sample_all(
    data: &Tensor,
    src: &Affine,
    dst: &Grid,
    mode: Interp,
    border: bool,
    slab: i64,
) -> Result<Tensor> {
    let parts = (0..dst.dims[2])
        .step_by(slab as usize)
        .map(|z0| {
            sample(
                data,
                src,
                dst,
                z0..(z0 + slab).min(dst.dims[2]),
                mode,
                border,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::f_cat(&parts, 3)?)
}

/// RAS, target spacing (trilinear, border padding), HU window, foreground crop — MONAI's chain,
/// shared by `segment` and training.
pub fn prepare(
    pre: &MonaiPreprocessing,
    volume: &Volume,
    device: Device,
    slab: i64,
) -> Result<Prepared> {
    let src = Grid {
        affine: volume.affine,
        dims: volume.dims(),
    };
    let (ras, _) = reorient_to_ras(&src)?;
    let target = respace(&ras, pre.spacing)?;
    let image = volume
        .data
        .f_to_device(device)?
        .f_to_kind(Kind::Float)?
        .unsqueeze(0);
    let resampled = sample_all(&image, &volume.affine, &target, Interp::Linear, true, slab)?;
    let windowed = window(&resampled, pre.intensity_window[0], pre.intensity_window[1]);
    let (start, end) = match foreground_box(&windowed) {
        Some(b) if pre.crop_foreground => b,
        _ => ([0; 3], target.dims),
    };
    Ok(Prepared {
        image: crop_box(&windowed, start, end),
        grid: crop_grid(&target, start, end),
        target,
        crop: (start, end),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(affine: Affine, dims: [i64; 3]) -> Grid {
        Grid { affine, dims }
    }

    #[test]
    fn lps_lattice_reorients_to_ras_exactly() {
        let lps = [
            [-2.0, 0.0, 0.0, 10.0],
            [0.0, -3.0, 0.0, 20.0],
            [0.0, 0.0, 4.0, 30.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let (ras, how) = reorient_to_ras(&grid(lps, [5, 6, 7])).unwrap();
        assert_eq!(how.axes, [0, 1, 2]);
        assert_eq!(how.flip, [true, true, false]);
        assert_eq!(ras.dims, [5, 6, 7]);
        // new voxel 0 = old voxel (4, 5, 0)
        assert_eq!(ras.affine[0], [2.0, 0.0, 0.0, 10.0 - 8.0]);
        assert_eq!(ras.affine[1], [0.0, 3.0, 0.0, 20.0 - 15.0]);
    }

    #[test]
    fn a_spacing_far_finer_than_the_volume_is_refused_before_allocating() {
        let m = [
            [4.0, 0.0, 0.0, 0.0],
            [0.0, 4.0, 0.0, 0.0],
            [0.0, 0.0, 4.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let err = respace(&grid(m, [20, 18, 12]), [0.01; 3]).unwrap_err();
        assert!(
            err.message
                .contains("spacing [0.01, 0.01, 0.01] mm gives a grid of [7601"),
            "{}",
            err.message
        );
        assert!(respace(&grid(m, [20, 18, 12]), [0.5; 3]).is_ok());
    }

    #[test]
    fn permuted_axes_are_put_back_in_order() {
        // voxel axes run S, R, A
        let m = [
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let (ras, how) = reorient_to_ras(&grid(m, [4, 5, 6])).unwrap();
        assert_eq!(how.axes, [1, 2, 0]);
        assert_eq!(ras.dims, [5, 6, 4]);
        assert_eq!(ras.affine[0][0], 1.0);
    }

    #[test]
    fn respacing_keeps_the_corner_and_counts_like_monai() {
        let m = [
            [3.0, 0.0, 0.0, -5.0],
            [0.0, 3.0, 0.0, 7.0],
            [0.0, 0.0, 3.0, 1.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let g = respace(&grid(m, [122, 101, 112]), [1.5, 1.5, 2.0]).unwrap();
        assert_eq!(g.dims, [243, 201, 168]); // round((n - 1) · 3 / s + 1), 167.5 → 168
        assert_eq!(g.affine[0], [1.5, 0.0, 0.0, -5.0]);
        assert_eq!(g.affine[2], [0.0, 0.0, 2.0, 1.0]);
    }

    #[test]
    fn sampling_on_the_same_lattice_is_the_identity() {
        let data = Tensor::randn([2, 4, 5, 6], (Kind::Float, Device::Cpu));
        let m = [
            [1.5, 0.0, 0.0, 1.0],
            [0.0, 2.0, 0.0, 2.0],
            [0.0, 0.0, 2.5, 3.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let out = sample(&data, &m, &grid(m, [4, 5, 6]), 0..6, Interp::Linear, true).unwrap();
        assert!(out.allclose(&data, 1e-5, 1e-5, false));
        let slab = sample(&data, &m, &grid(m, [4, 5, 6]), 2..4, Interp::Nearest, true).unwrap();
        assert!(slab.equal(&data.narrow(3, 2, 2)));
    }

    #[test]
    fn foreground_box_is_the_bounding_box_of_positive_voxels() {
        let t = Tensor::zeros([1, 8, 8, 8], (Kind::Float, Device::Cpu));
        let _ = t.narrow(1, 2, 3).narrow(2, 1, 1).narrow(3, 4, 4).fill_(0.5);
        assert_eq!(foreground_box(&t), Some(([2, 1, 4], [5, 2, 8])));
        assert_eq!(foreground_box(&t.zeros_like()), None);
    }
}
