//! NIfTI-1 and NIfTI-2 single-file volumes (`.nii`, `.nii.gz`).
//!
//! Semantics follow nibabel 5 exactly, since that is what users compare against:
//! - the affine is the sform when `sform_code != 0`, else the qform when `qform_code != 0`, else
//!   nibabel's "base affine" (pixdims with x flipped, centred on the volume);
//! - before that, the header is fixed as nibabel's loader fixes it: negative pixdims made positive,
//!   zero pixdims set to 1, a `qfac` (pixdim\[0\]) other than ±1 set to 1;
//! - `scl_slope` 0 or non-finite means unscaled; otherwise voxels are `raw · slope + inter`
//!   (float32 out, float64 for float64 files); a finite slope with a non-finite intercept is an error.
//!
//! NIfTI-1 headers are parsed by the `nifti` crate. That crate knows neither NIfTI-2 nor writing
//! from raw buffers, so the NIfTI-2 header reader and the NIfTI-1 header writer are written here.

use super::{inflate, read_gzip_prefix, swap_bytes, write_atomically};
use crate::error::{Error, Result};
use crate::volume::{Affine, DType, Volume};
use nifti::NiftiType;
use std::path::Path;

const NIFTI1_HEADER: usize = 348;
const NIFTI2_HEADER: usize = 540;
/// Deflate cannot compress better than about 1032:1; a header promising more lies.
const MAX_GZIP_RATIO: u64 = 1032;

/// The header fields lwi uses, common to NIfTI-1 and NIfTI-2.
#[derive(Debug, Clone)]
struct Header {
    version: u8,
    magic: [u8; 4],
    dims: Vec<i64>,
    datatype: i16,
    pixdim: [f64; 8],
    vox_offset: f64,
    scl_slope: f64,
    scl_inter: f64,
    qform_code: i32,
    sform_code: i32,
    /// quatern_b, quatern_c, quatern_d, qoffset_x, qoffset_y, qoffset_z
    quatern: [f64; 6],
    srow: [[f64; 4]; 3],
    big_endian: bool,
}

/// Reads a `.nii` / `.nii.gz` file into a [`Volume`].
pub fn read(path: &Path) -> Result<Volume> {
    from_bytes(path, super::read_regular(path)?)
}

/// Decodes the bytes of a `.nii` / `.nii.gz` file; `path` only names it in messages.
pub fn from_bytes(path: &Path, file: Vec<u8>) -> Result<Volume> {
    let gzip = file.starts_with(&[0x1f, 0x8b]);
    let head = if gzip {
        read_gzip_prefix(path, &file, NIFTI2_HEADER)?
    } else {
        file[..file.len().min(NIFTI2_HEADER)].to_vec()
    };
    let hdr = parse_header(path, &head)?;
    let (dtype, dims) = voxel_layout(path, &hdr)?;

    // vox_offset is a float in NIfTI-1: refuse what cannot be a byte offset into this file.
    if !(hdr.vox_offset.is_finite() && hdr.vox_offset >= 0.0 && hdr.vox_offset < 1e15) {
        return Err(Error::format(
            path,
            format!("vox_offset {} is not a byte offset", hdr.vox_offset),
        ));
    }
    let offset = hdr.vox_offset as u64;
    let nbytes = dims
        .iter()
        .try_fold(dtype.size() as u64, |n, &d| n.checked_mul(d as u64));
    let Some(needed) = nbytes.and_then(|n| n.checked_add(offset)) else {
        return Err(Error::format(
            path,
            format!(
                "header promises {dims:?} voxels from offset {offset}: more bytes than can exist"
            ),
        ));
    };
    // Refuse before allocating: the file must be able to hold what the header promises.
    let could_hold = if gzip {
        file.len() as u64 * MAX_GZIP_RATIO
    } else {
        file.len() as u64
    };
    if needed > could_hold {
        let what = if gzip {
            "gzip data could hold at most"
        } else {
            "file is truncated: it has"
        };
        return Err(Error::format(
            path,
            format!(
                "header promises {dims:?} {} voxels ({needed} bytes from offset {offset}) but the {what} {could_hold}",
                dtype.name()
            ),
        ));
    }
    let bytes = if gzip {
        inflate(path, &file, needed)?
    } else {
        file
    };
    if (bytes.len() as u64) < needed {
        return Err(Error::format(
            path,
            format!(
                "file is truncated: voxel data needs {needed} bytes, the file has {}",
                bytes.len()
            ),
        ));
    }
    let mut raw = std::borrow::Cow::Borrowed(&bytes[offset as usize..needed as usize]);
    if hdr.big_endian {
        swap_bytes(raw.to_mut(), dtype.size());
    }
    let data = dtype.tensor_from_le_bytes(&raw, dims)?;
    let affine = best_affine(path, &hdr)?;
    let (data, dtype) = apply_scaling(path, &hdr, data, dtype)?;
    Volume::new(data, affine, dtype).map_err(|e| Error::format(path, e.message))
}

fn parse_header(path: &Path, head: &[u8]) -> Result<Header> {
    if head.len() < 4 {
        return Err(Error::format(
            path,
            "not a NIfTI file: shorter than a header",
        ));
    }
    let le = i32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let be = i32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let hdr = match (le, be) {
        (348, _) | (_, 348) => parse_nifti1(path, head)?,
        (540, _) | (_, 540) => parse_nifti2(path, head, be == 540)?,
        _ => {
            return Err(Error::format(
                path,
                format!("not a NIfTI file: sizeof_hdr is {le}, expected 348 or 540"),
            ));
        }
    };
    match &hdr.magic[..3] {
        b"n+1" | b"n+2" => Ok(hdr),
        b"ni1" | b"ni2" => Err(Error::unsupported(format!(
            "{}: header-only NIfTI (magic {:?}): its voxels live in a separate .img file; lwi reads single-file .nii",
            path.display(),
            String::from_utf8_lossy(&hdr.magic[..3])
        ))),
        m => Err(Error::format(
            path,
            format!("not a NIfTI file: magic {:?}", String::from_utf8_lossy(m)),
        )),
    }
}

fn parse_nifti1(path: &Path, head: &[u8]) -> Result<Header> {
    if head.len() < NIFTI1_HEADER {
        return Err(Error::format(
            path,
            format!("file is truncated inside the {NIFTI1_HEADER}-byte NIfTI-1 header"),
        ));
    }
    let h = nifti::NiftiHeader::from_reader(&head[..NIFTI1_HEADER])
        .map_err(|e| Error::format(path, format!("bad NIfTI-1 header: {e}")))?;
    // dim[] is signed in the standard; the crate reads it unsigned.
    let ndim = h.dim[0] as i16 as i64;
    let dims = dims_from(path, ndim, |i| h.dim[i] as i16 as i64)?;
    let f = |v: f32| v as f64;
    Ok(Header {
        version: 1,
        magic: h.magic,
        dims,
        datatype: h.datatype,
        pixdim: h.pixdim.map(f),
        vox_offset: h.vox_offset as f64,
        scl_slope: f(h.scl_slope),
        scl_inter: f(h.scl_inter),
        qform_code: h.qform_code.into(),
        sform_code: h.sform_code.into(),
        quatern: [
            h.quatern_b,
            h.quatern_c,
            h.quatern_d,
            h.quatern_x,
            h.quatern_y,
            h.quatern_z,
        ]
        .map(f),
        srow: [h.srow_x.map(f), h.srow_y.map(f), h.srow_z.map(f)],
        big_endian: h.endianness == nifti::Endianness::Big,
    })
}

/// The NIfTI-2 header (540 bytes; field offsets from nifti2.h).
fn parse_nifti2(path: &Path, head: &[u8], big_endian: bool) -> Result<Header> {
    if head.len() < NIFTI2_HEADER {
        return Err(Error::format(
            path,
            format!("file is truncated inside the {NIFTI2_HEADER}-byte NIfTI-2 header"),
        ));
    }
    let bytes = |at: usize, n: usize| -> Vec<u8> {
        let mut b = head[at..at + n].to_vec();
        if !big_endian {
            b.reverse();
        }
        b
    };
    let i16_at = |at| i16::from_be_bytes(bytes(at, 2).try_into().expect("2 bytes"));
    let i32_at = |at| i32::from_be_bytes(bytes(at, 4).try_into().expect("4 bytes"));
    let i64_at = |at| i64::from_be_bytes(bytes(at, 8).try_into().expect("8 bytes"));
    let f64_at = |at| f64::from_be_bytes(bytes(at, 8).try_into().expect("8 bytes"));
    let dims = dims_from(path, i64_at(16), |i| i64_at(16 + 8 * i))?;
    Ok(Header {
        version: 2,
        magic: head[4..8].try_into().expect("4 bytes"),
        dims,
        datatype: i16_at(12),
        pixdim: std::array::from_fn(|i| f64_at(104 + 8 * i)),
        vox_offset: i64_at(168) as f64,
        scl_slope: f64_at(176),
        scl_inter: f64_at(184),
        qform_code: i32_at(344),
        sform_code: i32_at(348),
        quatern: std::array::from_fn(|i| f64_at(352 + 8 * i)),
        srow: std::array::from_fn(|r| std::array::from_fn(|c| f64_at(400 + 32 * r + 8 * c))),
        big_endian,
    })
}

fn dims_from(path: &Path, ndim: i64, dim: impl Fn(usize) -> i64) -> Result<Vec<i64>> {
    if !(1..=7).contains(&ndim) {
        return Err(Error::format(
            path,
            format!("dim[0] is {ndim}; a NIfTI file has 1 to 7 dimensions"),
        ));
    }
    let dims: Vec<i64> = (1..=ndim as usize).map(dim).collect();
    if let Some(i) = dims.iter().position(|&d| d < 1) {
        return Err(Error::format(
            path,
            format!(
                "dim[{}] is {}; every dimension must be at least 1",
                i + 1,
                dims[i]
            ),
        ));
    }
    Ok(dims)
}

/// The voxel type and the 3-D shape, or why this file is not a scalar 3-D volume.
fn voxel_layout(path: &Path, hdr: &Header) -> Result<(DType, [i64; 3])> {
    let kind = num_traits_free_type(hdr.datatype);
    let dtype = match kind {
        Some(NiftiType::Uint8) => DType::U8,
        Some(NiftiType::Int8) => DType::I8,
        Some(NiftiType::Uint16) => DType::U16,
        Some(NiftiType::Int16) => DType::I16,
        Some(NiftiType::Uint32) => DType::U32,
        Some(NiftiType::Int32) => DType::I32,
        Some(NiftiType::Uint64) => DType::U64,
        Some(NiftiType::Int64) => DType::I64,
        Some(NiftiType::Float32) => DType::F32,
        Some(NiftiType::Float64) => DType::F64,
        Some(other) => {
            return Err(Error::unsupported(format!(
                "{}: NIfTI datatype {} ({other:?}) is not a scalar intensity type; lwi reads integer and float32/64 volumes",
                path.display(),
                hdr.datatype
            )));
        }
        None => {
            return Err(Error::format(
                path,
                format!("unknown NIfTI datatype code {}", hdr.datatype),
            ));
        }
    };
    let extra: Vec<i64> = hdr.dims.iter().skip(3).copied().collect();
    if extra.iter().any(|&d| d > 1) {
        return Err(Error::unsupported(format!(
            "{}: {}-D image of shape {:?}; lwi segments 3-D scalar volumes (a 4th dimension of size 1 is fine)",
            path.display(),
            hdr.dims.len(),
            hdr.dims
        )));
    }
    let d = |i: usize| hdr.dims.get(i).copied().unwrap_or(1);
    let dims = [d(0), d(1), d(2)];
    // Volumes are indexed with i64 and held in memory: refuse what cannot be (overflow-safe product).
    let n = dims.iter().try_fold(1i64, |acc, &v| acc.checked_mul(v));
    if n.and_then(|n| n.checked_mul(dtype.size() as i64)).is_none() {
        return Err(Error::format(path, format!("absurd dimensions {dims:?}")));
    }
    if dims.iter().all(|&d| d >= 1) {
        crate::volume::voxel_count(&dims, path)?;
    }
    Ok((dtype, dims))
}

/// `NiftiType` from a code, without pulling in `num-traits` for `FromPrimitive`.
fn num_traits_free_type(code: i16) -> Option<NiftiType> {
    let hdr = nifti::NiftiHeader {
        datatype: code,
        ..Default::default()
    };
    hdr.data_type().ok()
}

/// nibabel's `get_best_affine` after nibabel's header fixes.
fn best_affine(path: &Path, hdr: &Header) -> Result<Affine> {
    let mut pixdim = hdr.pixdim;
    for p in &mut pixdim[1..4] {
        *p = if *p == 0.0 { 1.0 } else { p.abs() };
    }
    if pixdim[0] != 1.0 && pixdim[0] != -1.0 {
        pixdim[0] = 1.0;
    }
    if hdr.sform_code != 0 {
        let s = hdr.srow;
        return Ok([s[0], s[1], s[2], [0.0, 0.0, 0.0, 1.0]]);
    }
    if hdr.qform_code != 0 {
        return qform_affine(path, hdr, &pixdim);
    }
    // nibabel's shape_zoom_affine with x_flip.
    let mut aff = [[0.0; 4]; 4];
    aff[3][3] = 1.0;
    for i in 0..3 {
        let n = hdr.dims.get(i).copied().unwrap_or(1) as f64;
        let zoom = if i < hdr.dims.len() {
            pixdim[i + 1]
        } else {
            1.0
        } * if i == 0 { -1.0 } else { 1.0 };
        aff[i][i] = zoom;
        aff[i][3] = -(n - 1.0) / 2.0 * zoom;
    }
    Ok(aff)
}

fn qform_affine(path: &Path, hdr: &Header, pixdim: &[f64; 8]) -> Result<Affine> {
    let [b, c, d, x, y, z] = hdr.quatern;
    // nibabel's fillpositive, with the threshold of the header's float width.
    let threshold = if hdr.version == 1 {
        3.0 * f32::EPSILON as f64
    } else {
        3.0 * f64::EPSILON
    };
    let w2 = 1.0 - (b * b + c * c + d * d);
    let w = if w2.abs() < threshold {
        0.0
    } else if w2 < 0.0 {
        return Err(Error::format(
            path,
            format!("qform quaternion (b, c, d) = ({b}, {c}, {d}) is not a unit quaternion"),
        ));
    } else {
        w2.sqrt()
    };
    let r = quat_to_matrix(w, b, c, d);
    let zooms = [pixdim[1], pixdim[2], pixdim[3] * pixdim[0]];
    let mut aff = [[0.0; 4]; 4];
    for i in 0..3 {
        for j in 0..3 {
            aff[i][j] = r[i][j] * zooms[j];
        }
    }
    aff[0][3] = x;
    aff[1][3] = y;
    aff[2][3] = z;
    aff[3][3] = 1.0;
    Ok(aff)
}

fn quat_to_matrix(w: f64, x: f64, y: f64, z: f64) -> [[f64; 3]; 3] {
    let n = w * w + x * x + y * y + z * z;
    if n < f64::EPSILON {
        return [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    }
    let s = 2.0 / n;
    let (xs, ys, zs) = (x * s, y * s, z * s);
    let (wx, wy, wz) = (w * xs, w * ys, w * zs);
    let (xx, xy, xz) = (x * xs, x * ys, x * zs);
    let (yy, yz, zz) = (y * ys, y * zs, z * zs);
    [
        [1.0 - (yy + zz), xy - wz, xz + wy],
        [xy + wz, 1.0 - (xx + zz), yz - wx],
        [xz - wy, yz + wx, 1.0 - (xx + yy)],
    ]
}

/// Unit quaternion (w ≥ 0) of a rotation matrix (Shepperd's method).
fn matrix_to_quat(m: &[[f64; 3]; 3]) -> [f64; 4] {
    let trace = m[0][0] + m[1][1] + m[2][2];
    let q = if trace > 0.0 {
        let s = (trace + 1.0).sqrt() * 2.0;
        [
            0.25 * s,
            (m[2][1] - m[1][2]) / s,
            (m[0][2] - m[2][0]) / s,
            (m[1][0] - m[0][1]) / s,
        ]
    } else if m[0][0] > m[1][1] && m[0][0] > m[2][2] {
        let s = (1.0 + m[0][0] - m[1][1] - m[2][2]).sqrt() * 2.0;
        [
            (m[2][1] - m[1][2]) / s,
            0.25 * s,
            (m[0][1] + m[1][0]) / s,
            (m[0][2] + m[2][0]) / s,
        ]
    } else if m[1][1] > m[2][2] {
        let s = (1.0 + m[1][1] - m[0][0] - m[2][2]).sqrt() * 2.0;
        [
            (m[0][2] - m[2][0]) / s,
            (m[0][1] + m[1][0]) / s,
            0.25 * s,
            (m[1][2] + m[2][1]) / s,
        ]
    } else {
        let s = (1.0 + m[2][2] - m[0][0] - m[1][1]).sqrt() * 2.0;
        [
            (m[1][0] - m[0][1]) / s,
            (m[0][2] + m[2][0]) / s,
            (m[1][2] + m[2][1]) / s,
            0.25 * s,
        ]
    };
    let norm = q.iter().map(|v| v * v).sum::<f64>().sqrt();
    let sign = if q[0] < 0.0 { -1.0 } else { 1.0 };
    q.map(|v| sign * v / norm)
}

fn apply_scaling(
    path: &Path,
    hdr: &Header,
    data: tch::Tensor,
    dtype: DType,
) -> Result<(tch::Tensor, DType)> {
    let (slope, inter) = (hdr.scl_slope, hdr.scl_inter);
    if slope == 0.0 || !slope.is_finite() {
        return Ok((data, dtype));
    }
    if !inter.is_finite() {
        return Err(Error::format(
            path,
            format!("scl_slope is {slope} but scl_inter is {inter}"),
        ));
    }
    if slope == 1.0 && inter == 0.0 {
        return Ok((data, dtype));
    }
    let out = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let scaled = data
        .f_to_kind(tch::Kind::Double)?
        .f_mul_scalar(slope)?
        .f_add_scalar(inter)?
        .f_to_kind(out.kind())?;
    Ok((scaled, out))
}

/// Writes a NIfTI-1 single file: the voxels in the volume's dtype, the affine in both the sform
/// (code 2, aligned) and the qform (code 1, scanner), units mm.
pub fn write(volume: &Volume, path: &Path, gzip: bool) -> Result<()> {
    if volume.dims().iter().any(|&d| d > i16::MAX as i64) {
        return Err(Error::unsupported(format!(
            "{}: dimensions {:?} exceed NIfTI-1's 32767 per axis; write .nrrd instead",
            path.display(),
            volume.dims()
        )));
    }
    let mut bytes = header_bytes(volume);
    bytes.extend_from_slice(&volume.dtype.le_bytes_from_tensor(&volume.data)?);
    if gzip {
        bytes = super::deflate(&bytes);
    }
    write_atomically(path, &bytes)
}

fn datatype_code(dtype: DType) -> NiftiType {
    match dtype {
        DType::U8 => NiftiType::Uint8,
        DType::I8 => NiftiType::Int8,
        DType::U16 => NiftiType::Uint16,
        DType::I16 => NiftiType::Int16,
        DType::U32 => NiftiType::Uint32,
        DType::I32 => NiftiType::Int32,
        DType::U64 => NiftiType::Uint64,
        DType::I64 => NiftiType::Int64,
        DType::F32 => NiftiType::Float32,
        DType::F64 => NiftiType::Float64,
    }
}

/// The 348-byte NIfTI-1 header (little-endian) plus the 4-byte empty extension flag.
fn header_bytes(volume: &Volume) -> Vec<u8> {
    let a = &volume.affine;
    let dims = volume.dims();
    let zooms = volume.spacing();
    // qform: rotation from the normalised columns; a negative determinant goes into qfac.
    let mut r = volume.direction();
    let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1])
        - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
    let qfac = if det > 0.0 { 1.0 } else { -1.0 };
    if qfac < 0.0 {
        for row in &mut r {
            row[2] = -row[2];
        }
    }
    let q = matrix_to_quat(&r);

    let mut h = vec![0u8; NIFTI1_HEADER + 4];
    let mut put = |at: usize, b: &[u8]| h[at..at + b.len()].copy_from_slice(b);
    put(0, &(NIFTI1_HEADER as i32).to_le_bytes());
    let mut dim = [1i16; 8];
    dim[0] = 3;
    for i in 0..3 {
        dim[i + 1] = dims[i] as i16;
    }
    for (i, d) in dim.iter().enumerate() {
        put(40 + 2 * i, &d.to_le_bytes());
    }
    let code = datatype_code(volume.dtype);
    put(70, &(code as i16).to_le_bytes());
    put(72, &((volume.dtype.size() * 8) as i16).to_le_bytes());
    let pixdim = [qfac, zooms[0], zooms[1], zooms[2], 1.0, 1.0, 1.0, 1.0];
    for (i, p) in pixdim.iter().enumerate() {
        put(76 + 4 * i, &(*p as f32).to_le_bytes());
    }
    put(108, &352f32.to_le_bytes()); // vox_offset
    put(112, &1f32.to_le_bytes()); // scl_slope: stored values are the values
    put(123, &[10]); // xyzt_units: mm (2) + s (8)
    let descrip = format!("lwi {}", env!("CARGO_PKG_VERSION"));
    put(148, descrip.as_bytes());
    put(252, &1i16.to_le_bytes()); // qform_code: scanner
    put(254, &2i16.to_le_bytes()); // sform_code: aligned
    for (i, v) in [q[1], q[2], q[3], a[0][3], a[1][3], a[2][3]]
        .iter()
        .enumerate()
    {
        put(256 + 4 * i, &(*v as f32).to_le_bytes());
    }
    for (r, row) in a.iter().take(3).enumerate() {
        for (c, v) in row.iter().enumerate() {
            put(280 + 16 * r + 4 * c, &(*v as f32).to_le_bytes());
        }
    }
    put(344, b"n+1\0");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quaternion_round_trip_for_flips_and_rotations() {
        let c = (0.3f64).cos();
        let s = (0.3f64).sin();
        for r in [
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            [[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]],
            [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]],
            [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
        ] {
            let [w, x, y, z] = matrix_to_quat(&r);
            assert!(w >= 0.0);
            let back = quat_to_matrix(w, x, y, z);
            for i in 0..3 {
                for j in 0..3 {
                    assert!((back[i][j] - r[i][j]).abs() < 1e-12, "{r:?} -> {back:?}");
                }
            }
        }
    }
}
