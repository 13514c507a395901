//! `Volume`: voxel data plus the 4×4 matrix that maps voxel indices to world millimetres in RAS+.
//!
//! The voxel tensor has shape `[X, Y, Z]` and is indexed `data[i, j, k]`, exactly as nibabel indexes
//! `img.dataobj`. World coordinates are always RAS+ (+x Right, +y Anterior, +z Superior) inside the
//! engine; LPS+ (DICOM, ITK, NRRD as Slicer writes it) enters and leaves through [`flip_lps_ras`].

use crate::error::{Error, Result};
use tch::{Kind, Tensor};

/// The most voxels a volume read from a file may hold: 2³⁰ (1024³, or 512 × 512 × 4096 slices).
/// Readers check a header's claim against it (and against the bytes that exist) before reading
/// or allocating anything.
pub const MAX_VOXELS: u64 = 1 << 30;

/// The voxel count of `dims` read from `path`, or a format error naming the file and the sizes when
/// it exceeds [`MAX_VOXELS`] (or a size is not positive).
pub fn voxel_count(dims: &[i64], path: &std::path::Path) -> Result<u64> {
    let count = dims.iter().try_fold(1u64, |n, &d| {
        u64::try_from(d)
            .ok()
            .filter(|&d| d >= 1)
            .and_then(|d| n.checked_mul(d))
    });
    match count {
        Some(n) if n <= MAX_VOXELS => Ok(n),
        _ => Err(Error::format(
            path,
            format!(
                "sizes {dims:?} need more voxels than the {MAX_VOXELS} (2^30) a volume may hold"
            ),
        )),
    }
}

/// A 4×4 homogeneous matrix, row-major: `world = M · [i, j, k, 1]ᵀ`.
pub type Affine = [[f64; 4]; 4];

/// Converts a voxel→LPS matrix into a voxel→RAS one, and back: the two frames differ by the sign of
/// their first two axes, so the conversion is its own inverse.
pub fn flip_lps_ras(m: &Affine) -> Affine {
    let mut out = *m;
    for row in out.iter_mut().take(2) {
        for v in row.iter_mut() {
            *v = -*v;
        }
    }
    out
}

/// Voxel storage types of the formats lwi reads. libtorch has no unsigned types wider than 8 bits,
/// so those are held in the next wider signed kind and narrowed again when written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
}

impl DType {
    pub const ALL: [DType; 10] = [
        DType::U8,
        DType::I8,
        DType::U16,
        DType::I16,
        DType::U32,
        DType::I32,
        DType::U64,
        DType::I64,
        DType::F32,
        DType::F64,
    ];

    /// Bytes per voxel on disk.
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::U16 | DType::I16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 => 8,
        }
    }

    /// The tensor kind that holds every value of this type exactly.
    pub fn kind(self) -> Kind {
        match self {
            DType::U8 => Kind::Uint8,
            DType::I8 => Kind::Int8,
            DType::I16 => Kind::Int16,
            DType::U16 | DType::I32 => Kind::Int,
            DType::U32 | DType::I64 | DType::U64 => Kind::Int64,
            DType::F32 => Kind::Float,
            DType::F64 => Kind::Double,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::U16 => "uint16",
            DType::I16 => "int16",
            DType::U32 => "uint32",
            DType::I32 => "int32",
            DType::U64 => "uint64",
            DType::I64 => "int64",
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64)
    }

    /// Bytes of `dims` voxels of this type, or an error naming the dims when they are not all
    /// positive or their byte count does not fit in memory's address range.
    pub fn byte_size(self, dims: [i64; 3]) -> Result<usize> {
        let bytes = dims
            .iter()
            .try_fold(self.size() as i64, |n, &d| {
                (d >= 1).then(|| n.checked_mul(d)).flatten()
            })
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n <= isize::MAX as usize);
        bytes.ok_or_else(|| {
            Error::invalid(format!(
                "dims {dims:?} of {}: each must be positive and the voxels must fit in memory",
                self.name()
            ))
        })
    }

    /// Decodes packed little-endian voxels (x fastest, as NIfTI and NRRD store them) into a tensor
    /// of shape `dims = [X, Y, Z]`.
    pub fn tensor_from_le_bytes(self, bytes: &[u8], dims: [i64; 3]) -> Result<Tensor> {
        let need = self.byte_size(dims)?;
        if bytes.len() != need {
            return Err(Error::internal(format!(
                "voxel buffer has {} bytes, {dims:?} {} voxels need {need}",
                bytes.len(),
                self.name(),
            )));
        }
        let widened: Vec<u8>;
        let raw = match self {
            DType::U16 => {
                widened = recode(bytes, 2, |b| {
                    i32::from(u16::from_le_bytes([b[0], b[1]])).to_le_bytes()
                })?;
                &widened[..]
            }
            DType::U32 => {
                widened = recode(bytes, 4, |b| {
                    i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes()
                })?;
                &widened[..]
            }
            DType::U64 => {
                if bytes.chunks_exact(8).any(|b| b[7] & 0x80 != 0) {
                    return Err(Error::unsupported(
                        "uint64 voxel values above 2^63-1 are not supported",
                    ));
                }
                bytes
            }
            _ => bytes,
        };
        let [x, y, z] = dims;
        let t = Tensor::f_from_data_size(raw, &[z, y, x], self.kind())?;
        Ok(t.permute([2, 1, 0]))
    }

    /// Encodes a `[X, Y, Z]` tensor as packed little-endian voxels of this type, x fastest.
    /// Values are converted with libtorch's cast (saturation is the caller's business).
    pub fn le_bytes_from_tensor(self, data: &Tensor) -> Result<Vec<u8>> {
        let t = data
            .f_permute([2, 1, 0])?
            .f_to_kind(self.kind())?
            .f_contiguous()?;
        let n = t.numel();
        let mut held = vec![0u8; n * self.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut held, n)?;
        match self {
            DType::U16 => recode(&held, 4, |b| {
                (i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u16).to_le_bytes()
            }),
            DType::U32 => recode(&held, 8, |b| {
                (i64::from_le_bytes(b.try_into().expect("8-byte chunk")) as u32).to_le_bytes()
            }),
            _ => Ok(held),
        }
    }
}

/// Re-encodes packed voxels `step` bytes at a time, into a buffer allocated fallibly (its size
/// comes from a file's header).
fn recode<const N: usize>(
    bytes: &[u8],
    step: usize,
    f: impl Fn(&[u8]) -> [u8; N],
) -> Result<Vec<u8>> {
    let mut out = crate::error::try_vec(bytes.len() / step * N, 0u8, "the voxels")?;
    for (o, b) in out.chunks_exact_mut(N).zip(bytes.chunks_exact(step)) {
        o.copy_from_slice(&f(b));
    }
    Ok(out)
}

/// A scalar 3-D volume on a regular grid with its place in the world.
#[derive(Debug)]
pub struct Volume {
    /// Voxel values, shape `[X, Y, Z]`, of kind `dtype.kind()`.
    pub data: Tensor,
    /// Voxel index → RAS+ millimetres.
    pub affine: Affine,
    /// The storage type the voxels came in (and are written back as).
    pub dtype: DType,
}

impl Volume {
    /// Builds a volume, checking that shape, kind and geometry agree and that the geometry is usable.
    pub fn new(data: Tensor, affine: Affine, dtype: DType) -> Result<Self> {
        if data.dim() != 3 {
            return Err(Error::invalid(format!(
                "a volume has 3 dimensions, got shape {:?}",
                data.size()
            )));
        }
        if data.kind() != dtype.kind() {
            return Err(Error::internal(format!(
                "voxel tensor of kind {:?} does not hold {}",
                data.kind(),
                dtype.name()
            )));
        }
        check_affine(&affine)?;
        Ok(Volume {
            data,
            affine,
            dtype,
        })
    }

    /// `[X, Y, Z]`.
    pub fn dims(&self) -> [i64; 3] {
        let s = self.data.size();
        [s[0], s[1], s[2]]
    }

    /// Millimetres between neighbouring voxel centres along each voxel axis.
    pub fn spacing(&self) -> [f64; 3] {
        spacing(&self.affine)
    }

    /// Unit vectors of the voxel axes in RAS+ (the columns of the affine's 3×3 part, normalised).
    pub fn direction(&self) -> [[f64; 3]; 3] {
        let s = self.spacing();
        let mut d = [[0.0; 3]; 3];
        for (r, row) in d.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = self.affine[r][c] / s[c];
            }
        }
        d
    }

    /// RAS+ position of voxel (0, 0, 0).
    pub fn origin(&self) -> [f64; 3] {
        [self.affine[0][3], self.affine[1][3], self.affine[2][3]]
    }

    /// The three-letter code of the axes' directions, as nibabel's `aff2axcodes` ("RAS", "LPS", …).
    pub fn orientation_code(&self) -> String {
        let d = self.direction();
        (0..3)
            .map(|c| {
                let r = (0..3)
                    .max_by(|&a, &b| d[a][c].abs().total_cmp(&d[b][c].abs()))
                    .unwrap_or(c);
                let positive = d[r][c] >= 0.0;
                match (r, positive) {
                    (0, true) => 'R',
                    (0, false) => 'L',
                    (1, true) => 'A',
                    (1, false) => 'P',
                    (_, true) => 'S',
                    (_, false) => 'I',
                }
            })
            .collect()
    }
}

/// Column norms of the 3×3 part.
pub fn spacing(m: &Affine) -> [f64; 3] {
    let mut s = [0.0; 3];
    for (c, v) in s.iter_mut().enumerate() {
        *v = (0..3).map(|r| m[r][c] * m[r][c]).sum::<f64>().sqrt();
    }
    s
}

/// Refuses geometry that would poison everything downstream: non-finite entries, zero spacing,
/// a singular matrix, or a bottom row other than `0 0 0 1`.
pub fn check_affine(m: &Affine) -> Result<()> {
    if m.iter().flatten().any(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "voxel-to-world matrix has non-finite entries: {m:?}"
        )));
    }
    if m[3] != [0.0, 0.0, 0.0, 1.0] {
        return Err(Error::invalid(format!(
            "voxel-to-world matrix bottom row must be 0 0 0 1, got {:?}",
            m[3]
        )));
    }
    let s = spacing(m);
    if s.iter().any(|&v| v <= 0.0) {
        return Err(Error::invalid(format!(
            "voxel spacing must be positive, got {s:?}"
        )));
    }
    let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
    if det.abs() <= 1e-12 * s[0] * s[1] * s[2] {
        return Err(Error::invalid(format!(
            "voxel-to-world matrix is singular: {m:?}"
        )));
    }
    Ok(())
}

/// The product of two affines.
pub fn matmul(a: &Affine, b: &Affine) -> Affine {
    let mut out = [[0.0; 4]; 4];
    for (i, row) in out.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = (0..4).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    out
}

/// Inverse of an affine (3×3 part by cofactors, then the translation).
pub fn inverse(m: &Affine) -> Result<Affine> {
    check_affine(m)?;
    let a = |i: usize, j: usize| m[i][j];
    let det = a(0, 0) * (a(1, 1) * a(2, 2) - a(1, 2) * a(2, 1))
        - a(0, 1) * (a(1, 0) * a(2, 2) - a(1, 2) * a(2, 0))
        + a(0, 2) * (a(1, 0) * a(2, 1) - a(1, 1) * a(2, 0));
    let mut r = [[0.0; 4]; 4];
    for i in 0..3 {
        for j in 0..3 {
            let (i1, i2) = ((j + 1) % 3, (j + 2) % 3);
            let (j1, j2) = ((i + 1) % 3, (i + 2) % 3);
            r[i][j] = (a(i1, j1) * a(i2, j2) - a(i1, j2) * a(i2, j1)) / det;
        }
    }
    for i in 0..3 {
        r[i][3] = -(0..3).map(|k| r[i][k] * m[k][3]).sum::<f64>();
    }
    r[3][3] = 1.0;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag(x: f64, y: f64, z: f64) -> Affine {
        [
            [x, 0., 0., 1.],
            [0., y, 0., 2.],
            [0., 0., z, 3.],
            [0., 0., 0., 1.],
        ]
    }

    #[test]
    fn lps_ras_flip_is_an_involution_and_flips_x_y_only() {
        let m = diag(1.5, 2.0, 3.0);
        let lps = flip_lps_ras(&m);
        assert_eq!(lps[0], [-1.5, 0., 0., -1.]);
        assert_eq!(lps[1], [0., -2.0, 0., -2.]);
        assert_eq!(lps[2], m[2]);
        assert_eq!(flip_lps_ras(&lps), m);
    }

    #[test]
    fn every_dtype_round_trips_through_a_tensor() {
        for dt in DType::ALL {
            let n = 2 * 3 * 4;
            let bytes: Vec<u8> = (0..n * dt.size()).map(|i| (i * 7 % 127) as u8).collect();
            let t = dt.tensor_from_le_bytes(&bytes, [2, 3, 4]).unwrap();
            assert_eq!(t.size(), vec![2, 3, 4]);
            assert_eq!(dt.le_bytes_from_tensor(&t).unwrap(), bytes, "{}", dt.name());
        }
    }

    #[test]
    fn x_is_the_fastest_axis_on_disk() {
        let bytes: Vec<u8> = (0..24).collect();
        let t = DType::U8.tensor_from_le_bytes(&bytes, [2, 3, 4]).unwrap();
        // index (i, j, k) lives at i + 2j + 6k
        assert_eq!(t.int64_value(&[1, 2, 3]), 1 + 4 + 18);
    }

    #[test]
    fn unsigned_16_bit_values_survive_widening() {
        let bytes = 65535u16.to_le_bytes();
        let t = DType::U16.tensor_from_le_bytes(&bytes, [1, 1, 1]).unwrap();
        assert_eq!(t.int64_value(&[0, 0, 0]), 65535);
    }

    #[test]
    fn geometry_views_and_orientation_codes() {
        let v = Volume::new(
            Tensor::zeros([2, 2, 2], (Kind::Float, tch::Device::Cpu)),
            diag(-2.0, -3.0, 4.0),
            DType::F32,
        )
        .unwrap();
        assert_eq!(v.spacing(), [2.0, 3.0, 4.0]);
        assert_eq!(v.orientation_code(), "LPS");
        assert_eq!(v.origin(), [1., 2., 3.]);
        assert_eq!(v.direction()[0][0], -1.0);
    }

    #[test]
    fn bad_geometry_is_refused() {
        let mut m = diag(1.0, 1.0, 1.0);
        m[0][0] = f64::NAN;
        assert!(check_affine(&m).is_err());
        assert!(check_affine(&diag(0.0, 1.0, 1.0)).is_err());
        let mut singular = diag(1.0, 1.0, 1.0);
        singular[0] = singular[1];
        assert!(check_affine(&singular).is_err());
    }

    #[test]
    fn inverse_undoes_an_oblique_affine() {
        let m = [
            [0.8, -0.6, 0.1, 3.0],
            [0.6, 0.8, 0.0, -2.0],
            [0.0, 0.2, 2.5, 9.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let id = matmul(&m, &inverse(&m).unwrap());
        for i in 0..4 {
            for j in 0..4 {
                assert!((id[i][j] - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
    }
}
