//! NRRD volumes (`.nrrd` with attached header, `.nhdr` with a detached data file).
//!
//! Written by hand: no maintained Rust crate reads or writes NRRD. Covered: NRRD0001–0005 headers,
//! encodings raw, gzip and ascii, `data file` (single file; LIST and formatted lists are refused),
//! `line skip`/`byte skip` (including `byte skip: -1`), `space` RAS/LAS/LPS with `space directions`
//! (including `none` for non-spatial axes) and `space origin`, or `spacings` when no space is given.
//!
//! A file without `space` has no named frame; like ITK (and so Slicer) lwi reads it as LPS.
//! lwi writes what Slicer writes: `space: left-posterior-superior`, gzip, little-endian.

use super::{inflate, swap_bytes, write_atomically};
use crate::error::{Error, Result, quote};
use crate::volume::{Affine, DType, Volume, flip_lps_ras};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Deflate cannot compress better than about 1032:1; a header promising more lies.
const MAX_GZIP_RATIO: u64 = 1032;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Space {
    Ras,
    Las,
    Lps,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Encoding {
    Raw,
    Gzip,
    Ascii,
}

/// Reads a `.nrrd` or `.nhdr` file into a [`Volume`].
pub fn read(path: &Path) -> Result<Volume> {
    from_bytes(path, super::read_regular(path)?)
}

/// Decodes the bytes of a `.nrrd` / `.nhdr` file; `path` names it in messages and locates
/// detached data files.
pub fn from_bytes(path: &Path, file: Vec<u8>) -> Result<Volume> {
    let (fields, header_len) = parse_header(path, &file)?;
    let get = |k: &str| fields.get(k).map(String::as_str);
    let need = |k: &str| {
        get(k).ok_or_else(|| {
            Error::format(path, format!("NRRD header lacks the required field '{k}'"))
        })
    };

    let dtype = parse_type(path, need("type")?)?;
    let dimension: usize = need("dimension")?.parse().map_err(|_| {
        Error::format(
            path,
            format!("bad 'dimension: {}'", need("dimension").unwrap_or_default()),
        )
    })?;
    if !(1..=16).contains(&dimension) {
        return Err(Error::format(
            path,
            format!("'dimension: {dimension}' is outside 1..16"),
        ));
    }
    let sizes = parse_numbers::<i64>(path, "sizes", need("sizes")?)?;
    if sizes.len() != dimension || sizes.iter().any(|&s| s < 1) {
        return Err(Error::format(
            path,
            format!(
                "'sizes: {:?}' does not give {dimension} sizes of at least 1",
                sizes
            ),
        ));
    }
    let encoding = match need("encoding")? {
        "raw" => Encoding::Raw,
        "gzip" | "gz" => Encoding::Gzip,
        "ascii" | "text" | "txt" => Encoding::Ascii,
        other => {
            return Err(Error::unsupported(format!(
                "{}: NRRD encoding '{other}' is not supported (raw, gzip and ascii are)",
                path.display()
            )));
        }
    };
    let big_endian = match get("endian") {
        Some("big") => true,
        Some("little") | None => false,
        Some(other) => return Err(Error::format(path, format!("bad 'endian: {other}'"))),
    };
    let (axes, affine) = geometry(path, &fields, &sizes)?;

    // The ceiling first: nothing is read or allocated for a header claiming more.
    let n = crate::volume::voxel_count(&sizes, path)?;
    let nbytes = n * dtype.size() as u64;

    // The data: after the header's blank line, or in the named data file.
    let (data_path, source, start) = match get("data file").or(get("datafile")) {
        Some(name) => {
            if name.starts_with("LIST") || name.contains('%') || name.split_whitespace().count() > 1
            {
                return Err(Error::unsupported(format!(
                    "{}: multi-file NRRD data ('data file: {name}') is not supported",
                    path.display()
                )));
            }
            let p = path.parent().unwrap_or(Path::new(".")).join(name);
            let bytes = if encoding == Encoding::Raw {
                raw_data_part(&p, &fields, nbytes)?
            } else {
                super::read_regular(&p)?
            };
            (p, bytes, 0)
        }
        None => {
            if header_len >= file.len() && n > 0 {
                return Err(Error::format(
                    path,
                    "NRRD header is not followed by data (and names no 'data file')",
                ));
            }
            (path.to_path_buf(), file, header_len)
        }
    };
    let start = skip_lines(
        &data_path,
        &source,
        start,
        get("line skip").or(get("lineskip")),
    )?;
    let source = &source[start..];
    let byte_skip: i64 = match get("byte skip").or(get("byteskip")) {
        Some(v) => v
            .parse()
            .map_err(|_| Error::format(path, format!("bad 'byte skip: {v}'")))?,
        None => 0,
    };
    if byte_skip < -1 {
        return Err(Error::format(
            path,
            format!("'byte skip: {byte_skip}': -1 or a byte count"),
        ));
    }
    // The bytes the data must hold: the skipped ones, then the voxels (-1: the voxels end the file).
    let skip = u64::try_from(byte_skip).unwrap_or(0);
    let needed = nbytes
        .checked_add(skip)
        .ok_or_else(|| Error::format(path, format!("'byte skip: {byte_skip}' is absurd")))?;

    let data: Cow<[u8]> = match encoding {
        Encoding::Ascii => Cow::Owned(ascii_values(&data_path, source, n as usize, dtype)?),
        Encoding::Raw | Encoding::Gzip => {
            let could_hold = if encoding == Encoding::Gzip {
                source.len() as u64 * MAX_GZIP_RATIO
            } else {
                source.len() as u64
            };
            if needed > could_hold {
                let has = if encoding == Encoding::Gzip {
                    "could hold at most"
                } else {
                    "is truncated: it has"
                };
                return Err(Error::format(
                    &data_path,
                    format!(
                        "NRRD sizes {sizes:?} (byte skip {skip}) need {needed} bytes of {} data; the data {has} {could_hold}",
                        dtype.name()
                    ),
                ));
            }
            let mut plain = if encoding == Encoding::Gzip {
                let mut out = inflate(&data_path, source, needed)?;
                out.drain(..(skip as usize).min(out.len()));
                Cow::Owned(out)
            } else {
                let skip = if byte_skip == -1 {
                    source.len() as u64 - nbytes
                } else {
                    skip
                };
                Cow::Borrowed(&source[(skip as usize).min(source.len())..])
            };
            if (plain.len() as u64) < nbytes {
                return Err(Error::format(
                    &data_path,
                    format!(
                        "NRRD data is truncated: {nbytes} bytes expected, {} found",
                        plain.len()
                    ),
                ));
            }
            match &mut plain {
                Cow::Owned(v) => v.truncate(nbytes as usize),
                Cow::Borrowed(s) => *s = &s[..nbytes as usize],
            }
            if big_endian {
                swap_bytes(plain.to_mut(), dtype.size());
            }
            plain
        }
    };
    // Non-spatial axes have size 1, so the spatial axes keep their order in memory.
    let dims = [axes[0].1, axes[1].1, axes[2].1];
    let tensor = dtype.tensor_from_le_bytes(&data, dims)?;
    Volume::new(tensor, affine, dtype).map_err(|e| Error::format(path, e.message))
}

/// The part of a raw detached data file the header describes, and no more: the skipped lines,
/// then the skipped bytes and the voxels (with `byte skip: -1`, the file's last voxel bytes). A data
/// file longer than that (one voxel described over gigabytes) is not read beyond it; one shorter
/// is returned whole, for the caller to call truncated.
fn raw_data_part(p: &Path, fields: &HashMap<String, String>, nbytes: u64) -> Result<Vec<u8>> {
    use std::io::BufRead;
    use std::os::unix::fs::FileExt;
    let get = |k: &str| fields.get(k).map(String::as_str);
    let number = |key: &str, alt: &str| -> Result<i64> {
        match get(key).or(get(alt)) {
            Some(v) => v
                .parse()
                .map_err(|_| Error::format(p, format!("bad '{key}: {}'", quote(v)))),
            None => Ok(0),
        }
    };
    let (line_skip, byte_skip) = (
        number("line skip", "lineskip")?,
        number("byte skip", "byteskip")?,
    );
    let (file, len) = super::files::open_regular(p)?;
    // The skipped lines: read through (a line is short text; at most 1 MiB is read for one).
    let mut reader = std::io::BufReader::new(&file);
    let mut lines = 0u64;
    for _ in 0..line_skip.max(0) {
        let n = std::io::Read::take(&mut reader, 1 << 20)
            .skip_until(b'\n')
            .map_err(|e| Error::io(p, e))?;
        if n == 0 {
            break;
        }
        lines += n as u64;
    }
    let (from, count) = if byte_skip == -1 {
        (len.saturating_sub(nbytes).max(lines), nbytes)
    } else {
        (lines, (byte_skip.max(0) as u64).saturating_add(nbytes))
    };
    let count = count.min(len - from.min(len));
    let mut out = crate::error::try_vec((lines + count) as usize, 0u8, p.display())?;
    let (head, data) = out.split_at_mut(lines as usize);
    file.read_exact_at(head, 0)
        .and_then(|_| file.read_exact_at(data, from))
        .map_err(|e| Error::io(p, e))?;
    Ok(out)
}

/// Splits the header into fields. Returns the fields and the offset of the first data byte.
fn parse_header(path: &Path, file: &[u8]) -> Result<(HashMap<String, String>, usize)> {
    if !file.starts_with(b"NRRD000") {
        return Err(Error::format(
            path,
            "not a NRRD file: it does not start with 'NRRD000'",
        ));
    }
    let mut fields = HashMap::new();
    let mut pos = 0;
    let mut first = true;
    while pos < file.len() {
        let end = file[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(file.len(), |e| pos + e);
        let line = std::str::from_utf8(&file[pos..end])
            .map_err(|_| Error::format(path, "NRRD header is not text"))?
            .trim_end_matches('\r');
        pos = (end + 1).min(file.len().max(end + 1));
        if first {
            first = false;
            continue;
        }
        if line.is_empty() {
            break;
        }
        if line.starts_with('#') || line.contains(":=") {
            continue; // comments and key/value metadata
        }
        let (key, value) = line
            .split_once(": ")
            .ok_or_else(|| Error::format(path, format!("bad NRRD header line {}", quote(line))))?;
        fields.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
        if fields.len() > 256 {
            return Err(Error::format(path, "NRRD header has too many fields"));
        }
    }
    Ok((fields, pos.min(file.len())))
}

fn parse_type(path: &Path, t: &str) -> Result<DType> {
    Ok(match t {
        "signed char" | "int8" | "int8_t" => DType::I8,
        "uchar" | "unsigned char" | "uint8" | "uint8_t" => DType::U8,
        "short" | "short int" | "signed short" | "signed short int" | "int16" | "int16_t" => {
            DType::I16
        }
        "ushort" | "unsigned short" | "unsigned short int" | "uint16" | "uint16_t" => DType::U16,
        "int" | "signed int" | "int32" | "int32_t" => DType::I32,
        "uint" | "unsigned int" | "uint32" | "uint32_t" => DType::U32,
        "longlong"
        | "long long"
        | "long long int"
        | "signed long long"
        | "signed long long int"
        | "int64"
        | "int64_t" => DType::I64,
        "ulonglong" | "unsigned long long" | "unsigned long long int" | "uint64" | "uint64_t" => {
            DType::U64
        }
        "float" => DType::F32,
        "double" => DType::F64,
        other => {
            return Err(Error::unsupported(format!(
                "{}: NRRD type '{other}' is not a scalar voxel type",
                path.display()
            )));
        }
    })
}

fn parse_numbers<T: std::str::FromStr>(path: &Path, key: &str, value: &str) -> Result<Vec<T>> {
    value
        .split_whitespace()
        .map(|v| {
            v.parse::<T>()
                .map_err(|_| Error::format(path, format!("bad number '{v}' in '{key}: {value}'")))
        })
        .collect()
}

/// Parses "(a,b,c)" into a vector.
fn parse_vector(path: &Path, key: &str, v: &str) -> Result<Vec<f64>> {
    let inner = v
        .strip_prefix('(')
        .and_then(|v| v.strip_suffix(')'))
        .ok_or_else(|| Error::format(path, format!("bad vector '{v}' in '{key}'")))?;
    inner
        .split(',')
        .map(|x| {
            x.trim()
                .parse::<f64>()
                .map_err(|_| Error::format(path, format!("bad number '{x}' in '{key}'")))
        })
        .collect()
}

/// The spatial axes (index into `sizes`, size) and the voxel→RAS affine. Non-spatial axes must have
/// size 1; with exactly two spatial axes the volume is one slice thick.
fn geometry(
    path: &Path,
    fields: &HashMap<String, String>,
    sizes: &[i64],
) -> Result<(Vec<(usize, i64)>, Affine)> {
    let space = match fields.get("space").map(|s| s.to_ascii_lowercase()) {
        None => Space::Lps,
        Some(s) => match s.as_str() {
            "right-anterior-superior" | "ras" => Space::Ras,
            "left-anterior-superior" | "las" => Space::Las,
            "left-posterior-superior" | "lps" => Space::Lps,
            other => {
                return Err(Error::unsupported(format!(
                    "{}: NRRD space '{other}' is not an anatomical frame lwi knows (RAS, LAS, LPS)",
                    path.display()
                )));
            }
        },
    };
    let mut columns: Vec<Option<Vec<f64>>> = match fields.get("space directions") {
        Some(dirs) => dirs
            .split_whitespace()
            .map(|d| {
                if d == "none" {
                    Ok(None)
                } else {
                    parse_vector(path, "space directions", d).map(Some)
                }
            })
            .collect::<Result<_>>()?,
        None => {
            let spacings = match fields.get("spacings") {
                Some(s) => s
                    .split_whitespace()
                    .map(|v| {
                        if v.eq_ignore_ascii_case("nan") {
                            Ok(f64::NAN)
                        } else {
                            v.parse::<f64>()
                        }
                    })
                    .collect::<std::result::Result<Vec<f64>, _>>()
                    .map_err(|_| Error::format(path, format!("bad 'spacings: {s}'")))?,
                None => vec![1.0; sizes.len()],
            };
            // Without directions, every axis of size > 1 (or all, for a plain 3-D file) is spatial.
            let spatial: Vec<bool> = if sizes.len() <= 3 {
                vec![true; sizes.len()]
            } else {
                sizes.iter().map(|&s| s > 1).collect()
            };
            let mut k = 0;
            spacings
                .iter()
                .zip(spatial)
                .map(|(&s, is_spatial)| {
                    is_spatial.then(|| {
                        let mut c = vec![0.0; 3];
                        if k < 3 {
                            c[k] = if s.is_nan() { 1.0 } else { s };
                        }
                        k += 1;
                        c
                    })
                })
                .collect()
        }
    };
    if columns.len() != sizes.len() {
        return Err(Error::format(
            path,
            format!(
                "'space directions' has {} entries for {} axes",
                columns.len(),
                sizes.len()
            ),
        ));
    }
    let spatial: Vec<usize> = (0..sizes.len()).filter(|&i| columns[i].is_some()).collect();
    if let Some(i) = (0..sizes.len()).find(|&i| columns[i].is_none() && sizes[i] > 1) {
        return Err(Error::unsupported(format!(
            "{}: axis {i} (size {}) is not spatial: multi-component, vector or time-series NRRD is not a scalar 3-D volume",
            path.display(),
            sizes[i]
        )));
    }
    if !(2..=3).contains(&spatial.len()) {
        return Err(Error::unsupported(format!(
            "{}: {} spatial axes; lwi reads 3-D volumes",
            path.display(),
            spatial.len()
        )));
    }
    for &i in &spatial {
        let c = columns[i].as_ref().expect("spatial");
        if c.len() != 3 || c.iter().any(|v| !v.is_finite()) {
            return Err(Error::format(
                path,
                format!("axis {i} direction {c:?} is not a finite 3-vector (non-finite spacing?)"),
            ));
        }
    }
    let origin = match fields.get("space origin") {
        Some(o) => parse_vector(path, "space origin", o)?,
        None => vec![0.0; 3],
    };
    if origin.len() != 3 || origin.iter().any(|v| !v.is_finite()) {
        return Err(Error::format(
            path,
            format!("'space origin' {origin:?} is not a finite 3-vector"),
        ));
    }
    let mut axes: Vec<(usize, i64)> = spatial.iter().map(|&i| (i, sizes[i])).collect();
    if axes.len() == 2 {
        // A single slice: the third axis is the unit normal of the first two.
        let (a, b) = (
            columns[spatial[0]].clone().expect("spatial"),
            columns[spatial[1]].clone().expect("spatial"),
        );
        let n = [
            a[1] * b[2] - a[2] * b[1],
            a[2] * b[0] - a[0] * b[2],
            a[0] * b[1] - a[1] * b[0],
        ];
        let len = n.iter().map(|v| v * v).sum::<f64>().sqrt();
        columns.push(Some(if len > 0.0 {
            n.iter().map(|v| v / len).collect()
        } else {
            vec![0.0, 0.0, 1.0]
        }));
        axes.push((columns.len() - 1, 1));
    }
    let mut m: Affine = [[0.0; 4]; 4];
    for (c, &(i, _)) in axes.iter().enumerate() {
        let col = columns[i].as_ref().expect("spatial");
        for r in 0..3 {
            m[r][c] = col[r];
        }
    }
    for r in 0..3 {
        m[r][3] = origin[r];
    }
    m[3][3] = 1.0;
    let ras = match space {
        Space::Ras => m,
        Space::Lps => flip_lps_ras(&m),
        Space::Las => {
            let mut out = m;
            out[0].iter_mut().for_each(|v| *v = -*v);
            out
        }
    };
    Ok((axes, ras))
}

/// The offset after skipping `lines` lines from `start`.
fn skip_lines(path: &Path, data: &[u8], start: usize, lines: Option<&str>) -> Result<usize> {
    let Some(v) = lines else { return Ok(start) };
    let n: usize = v
        .parse()
        .map_err(|_| Error::format(path, format!("bad 'line skip: {v}'")))?;
    let mut pos = start;
    for _ in 0..n {
        pos = data[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|p| pos + p + 1)
            .ok_or_else(|| {
                Error::format(path, format!("cannot skip {n} lines: the data has fewer"))
            })?;
    }
    Ok(pos)
}

/// Parses whitespace-separated values into packed little-endian bytes of `dtype`.
fn ascii_values(path: &Path, data: &[u8], n: usize, dtype: DType) -> Result<Vec<u8>> {
    let text = std::str::from_utf8(data)
        .map_err(|_| Error::format(path, "ascii NRRD data is not text"))?;
    let mut out = Vec::with_capacity(n.min(1 << 28) * dtype.size());
    let mut count = 0;
    for tok in text
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
        .take(n)
    {
        let bad = || {
            Error::format(
                path,
                format!("bad {} value '{tok}' in ascii NRRD data", dtype.name()),
            )
        };
        match dtype {
            DType::U8 => out.extend(tok.parse::<u8>().map_err(|_| bad())?.to_le_bytes()),
            DType::I8 => out.extend(tok.parse::<i8>().map_err(|_| bad())?.to_le_bytes()),
            DType::U16 => out.extend(tok.parse::<u16>().map_err(|_| bad())?.to_le_bytes()),
            DType::I16 => out.extend(tok.parse::<i16>().map_err(|_| bad())?.to_le_bytes()),
            DType::U32 => out.extend(tok.parse::<u32>().map_err(|_| bad())?.to_le_bytes()),
            DType::I32 => out.extend(tok.parse::<i32>().map_err(|_| bad())?.to_le_bytes()),
            DType::U64 => out.extend(tok.parse::<u64>().map_err(|_| bad())?.to_le_bytes()),
            DType::I64 => out.extend(tok.parse::<i64>().map_err(|_| bad())?.to_le_bytes()),
            DType::F32 => out.extend(tok.parse::<f32>().map_err(|_| bad())?.to_le_bytes()),
            DType::F64 => out.extend(tok.parse::<f64>().map_err(|_| bad())?.to_le_bytes()),
        }
        count += 1;
    }
    if count < n {
        return Err(Error::format(
            path,
            format!("ascii NRRD data has {count} values, {n} expected"),
        ));
    }
    Ok(out)
}

fn type_name(dtype: DType) -> &'static str {
    match dtype {
        DType::U8 => "unsigned char",
        DType::I8 => "signed char",
        DType::U16 => "unsigned short",
        DType::I16 => "short",
        DType::U32 => "unsigned int",
        DType::I32 => "int",
        DType::U64 => "unsigned long long int",
        DType::I64 => "long long int",
        DType::F32 => "float",
        DType::F64 => "double",
    }
}

/// Writes NRRD as Slicer does: LPS space, gzip, little-endian. `detached` writes `X.nhdr` naming
/// `X.raw.gz` beside it (data written first, so the header never names a missing file). `fields`
/// are written as `key:=value` lines.
pub fn write(
    volume: &Volume,
    path: &Path,
    detached: bool,
    fields: &[(String, String)],
) -> Result<()> {
    let lps = flip_lps_ras(&volume.affine);
    let dims = volume.dims();
    let vec3 = |v: [f64; 3]| format!("({},{},{})", v[0], v[1], v[2]);
    let column = |c: usize| vec3([lps[0][c], lps[1][c], lps[2][c]]);
    let mut header = format!(
        "NRRD0004\n# lwi {}\ntype: {}\ndimension: 3\nspace: left-posterior-superior\nsizes: {} {} {}\nspace directions: {} {} {}\nkinds: domain domain domain\nendian: little\nencoding: gzip\nspace origin: {}\n",
        env!("CARGO_PKG_VERSION"),
        type_name(volume.dtype),
        dims[0],
        dims[1],
        dims[2],
        column(0),
        column(1),
        column(2),
        vec3([lps[0][3], lps[1][3], lps[2][3]]),
    );
    for (key, value) in fields {
        header.push_str(&format!(
            "{}:={}\n",
            key.replace([':', '\n'], " "),
            value.replace('\n', " ")
        ));
    }
    let data = super::deflate(&volume.dtype.le_bytes_from_tensor(&volume.data)?);
    if detached {
        let data_path: PathBuf = path.with_extension("raw.gz");
        let name = data_path
            .file_name()
            .expect("a file name")
            .to_string_lossy()
            .to_string();
        write_atomically(&data_path, &data)?;
        header.push_str(&format!("data file: {name}\n"));
        write_atomically(path, header.as_bytes())
    } else {
        let mut bytes = header.into_bytes();
        bytes.push(b'\n');
        bytes.extend_from_slice(&data);
        write_atomically(path, &bytes)
    }
}
