//! DICOM in: CT/MR series from a folder (searched recursively), a DICOMDIR's folder, or one file.
//!
//! Files are grouped into series by SeriesInstanceUID and, within one, by orientation and frame
//! size. Slices (classic single-frame files or the frames of an Enhanced multi-frame object, each
//! with its per-frame position, orientation and rescale) are sorted by their position along the
//! slice normal — never by InstanceNumber — and the spacing comes from those positions
//! (SliceThickness is not spacing). The voxels are the modality values (stored value × Rescale
//! Slope + Intercept: Hounsfield units for CT); MONOCHROME1 only changes how a viewer shows them,
//! so the values are not inverted. A series that is not a regular grid (missing slices, uneven
//! spacing, gantry tilt) is refused with what is wrong and where.
//!
//! DICOM patient space is LPS; the volume's affine is RAS like every lwi volume.

use super::dicom_walk::{self, Layout, PixelData};
use crate::error::{Error, Result, try_vec};
use crate::volume::{Affine, DType, MAX_VOXELS, Volume, flip_lps_ras};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject};
use dicom_pixeldata::PixelDecoder;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const EXPLICIT_VR_BIG_ENDIAN: &str = "1.2.840.10008.1.2.2";

/// Positions may stray this far (mm) from a regular grid before a series is refused.
const GRID_TOLERANCE_MM: f64 = 0.01;
/// … or this fraction of the slice spacing, whichever is larger (scanners round positions).
const GRID_TOLERANCE_REL: f64 = 0.01;

/// What a DICOM SEG needs to point back at the images it was made from.
#[derive(Debug, Clone, Default)]
pub struct Source {
    /// Patient and study attributes copied into derived objects: (tag, value).
    pub patient_study: Vec<(dicom_core::Tag, String)>,
    pub study_uid: String,
    pub series_uid: String,
    pub frame_of_reference_uid: String,
    pub modality: String,
    /// One per slice of the volume, in the volume's z order: (SOP Class UID, SOP Instance UID,
    /// frame number (1-based) for multi-frame sources).
    pub slices: Vec<(String, String, Option<u32>)>,
}

/// A volume read from DICOM with the references back to its source images.
#[derive(Debug)]
pub struct Series {
    pub volume: Volume,
    pub source: Source,
}

/// One series (or one orientation/size group of a series) found under a path.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SeriesSummary {
    pub series_uid: String,
    pub modality: String,
    pub description: String,
    pub rows: u32,
    pub columns: u32,
    pub slices: usize,
    pub files: usize,
    /// The slice step fitted to the positions (mm), when the images form a regular grid.
    pub slice_spacing_mm: Option<f64>,
    /// The largest distance of a slice from its place on that grid (mm): scanners round positions.
    pub max_slice_deviation_mm: Option<f64>,
    /// Why the images do not form a volume lwi reads (gap, tilt, duplicates), when they do not.
    pub problem: Option<String>,
}

/// One 2-D image: a single-frame file or one frame of a multi-frame file.
#[derive(Debug, Clone)]
struct Slice {
    file: PathBuf,
    /// 0-based frame within the file.
    frame: u32,
    multi_frame: bool,
    position: [f64; 3],
    /// Row direction (along a row: increasing column index), column direction (increasing row).
    orientation: [f64; 6],
    pixel_spacing: [f64; 2],
    slope: f64,
    intercept: f64,
    sop_class: String,
    sop_instance: String,
}

/// Everything of one file that grouping needs.
#[derive(Debug, Clone)]
struct Header {
    series_uid: String,
    modality: String,
    description: String,
    rows: u32,
    columns: u32,
    source: Source,
    slices: Vec<Slice>,
    /// SpacingBetweenSlices or SliceThickness: only used for a series of one slice.
    thickness: Option<f64>,
}

/// Does this path name DICOM input (a folder, a DICOMDIR, a `.dcm` file, or a file with the
/// DICOM preamble)?
pub fn is_dicom(path: &Path) -> bool {
    if path.is_dir() {
        return true;
    }
    let name = path
        .file_name()
        .map(|n| n.as_encoded_bytes().to_ascii_lowercase())
        .unwrap_or_default();
    if name == b"dicomdir" || name.ends_with(b".dcm") || name.ends_with(b".dicom") {
        return true;
    }
    let mut head = [0u8; 132];
    super::files::open_regular(path)
        .is_ok_and(|(mut f, _)| std::io::Read::read_exact(&mut f, &mut head).is_ok())
        && &head[128..] == b"DICM"
}

/// Reads the series `series_uid` (or, by default, the largest CT/MR series) under `path`.
pub fn read(path: &Path, series_uid: Option<&str>) -> Result<Series> {
    let (files, passed_over) = files_under(path)?;
    let (groups, mut skipped) = scan(files);
    skipped.extend(passed_over);
    let group = choose(path, &groups, series_uid, &skipped)?;
    assemble(path, group)
}

/// As [`read`], over the given files (messages name the first as the series' place).
pub fn read_files(files: &[PathBuf], series_uid: Option<&str>) -> Result<Series> {
    let first = files
        .first()
        .ok_or_else(|| Error::invalid("no DICOM files given"))?;
    for f in files {
        super::check_regular(f)?;
    }
    let (groups, skipped) = scan(files.to_vec());
    let group = choose(first, &groups, series_uid, &skipped)?;
    assemble(first, group)
}

/// Files passed over while scanning, with the reason for each.
pub type Skipped = Vec<(PathBuf, String)>;

/// The series under `path`, largest first, and the files skipped.
pub fn list(path: &Path) -> Result<(Vec<SeriesSummary>, Skipped)> {
    let (files, passed_over) = files_under(path)?;
    let (groups, mut skipped) = scan(files);
    skipped.extend(passed_over);
    Ok((groups.iter().map(|g| summary(g)).collect(), skipped))
}

fn summary(g: &[Header]) -> SeriesSummary {
    let h = &g[0];
    let mut slices: Vec<Slice> = g.iter().flat_map(|h| h.slices.clone()).collect();
    let o = slices[0].orientation;
    let n = cross(
        &unit(&o[..3]).unwrap_or_default(),
        &unit(&o[3..]).unwrap_or_default(),
    );
    slices.sort_by(|a, b| dot(&a.position, &n).total_cmp(&dot(&b.position, &n)));
    let grid = grid_spacing(Path::new(&h.series_uid), &slices, &n);
    let fitted = grid.as_ref().ok().copied().flatten();
    SeriesSummary {
        series_uid: h.series_uid.clone(),
        modality: h.modality.clone(),
        description: h.description.clone(),
        rows: h.rows,
        columns: h.columns,
        slices: slice_count(g),
        files: g.len(),
        slice_spacing_mm: fitted.map(|g| g.spacing),
        max_slice_deviation_mm: fitted.map(|g| g.max_deviation),
        problem: grid.err().map(|e| e.message),
    }
}

/// The regular files under `path`: a folder recursively, a DICOMDIR's folder, or the one file.
/// Links are followed, each folder is entered once (a link back up cannot loop), and anything
/// that is not a regular file (a FIFO, a socket, a device) is passed over with the reason.
fn files_under(path: &Path) -> Result<(Vec<PathBuf>, Skipped)> {
    use std::os::unix::fs::MetadataExt;
    let is_dicomdir = path
        .file_name()
        .is_some_and(|n| n.eq_ignore_ascii_case("DICOMDIR"));
    let root = match (path.is_dir(), is_dicomdir) {
        (true, _) => path.to_path_buf(),
        (false, true) => path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        (false, false) => {
            super::check_regular(path)?;
            return Ok((vec![path.to_path_buf()], Vec::new()));
        }
    };
    let (mut files, mut skipped) = (Vec::new(), Vec::new());
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        let meta = std::fs::metadata(&dir).map_err(|e| Error::io(&dir, e))?;
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        for entry in entries {
            let p = entry.map_err(|e| Error::io(&dir, e))?.path();
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => stack.push(p),
                Ok(m) if m.is_file() => {
                    if !p
                        .file_name()
                        .is_some_and(|n| n.eq_ignore_ascii_case("DICOMDIR"))
                    {
                        files.push(p);
                    }
                }
                Ok(_) => skipped.push((p, "not a regular file".to_string())),
                Err(e) => skipped.push((p, e.to_string())),
            }
        }
    }
    files.sort();
    Ok((files, skipped))
}

type Groups = Vec<Vec<Header>>;

/// Images (slices or frames) in a group.
fn slice_count(g: &[Header]) -> usize {
    g.iter().map(|h| h.slices.len()).sum()
}

/// Reads every file's header and groups the images: by series, orientation and frame size.
fn scan(files: Vec<PathBuf>) -> (Groups, Skipped) {
    let mut groups: BTreeMap<String, Vec<Header>> = BTreeMap::new();
    let mut skipped = Vec::new();
    for file in files {
        let header = dicom_walk::open(&file, Some(tags::PIXEL_DATA))
            .and_then(|(obj, layout)| header(&file, &obj, &layout));
        match header {
            Ok(h) => {
                let o = h.slices[0].orientation;
                let key = format!(
                    "{}|{:?}|{}x{}",
                    h.series_uid,
                    o.map(|v| (v * 1e4).round() as i64),
                    h.rows,
                    h.columns
                );
                groups.entry(key).or_default().push(h);
            }
            Err(why) => skipped.push((file, why)),
        }
    }
    let mut groups: Groups = groups.into_values().collect();
    groups.sort_by_key(|g| std::cmp::Reverse(slice_count(g)));
    (groups, skipped)
}

fn choose<'a>(
    path: &Path,
    groups: &'a Groups,
    series_uid: Option<&str>,
    skipped: &[(PathBuf, String)],
) -> Result<&'a Vec<Header>> {
    let listing = || {
        groups
            .iter()
            .map(|g| {
                let s = summary(g);
                format!(
                    "  {} {} {}x{} ×{} \"{}\"",
                    s.series_uid, s.modality, s.columns, s.rows, s.slices, s.description
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    if groups.is_empty() {
        let why = skipped
            .iter()
            .take(5)
            .map(|(f, why)| format!("  {}: {why}", f.display()))
            .collect::<Vec<_>>()
            .join("\n");
        return Err(Error::format(
            path,
            format!(
                "no readable DICOM image found ({} files skipped)\n{why}",
                skipped.len()
            ),
        ));
    }
    let candidates: Vec<&Vec<Header>> = match series_uid {
        Some(uid) => groups.iter().filter(|g| g[0].series_uid == uid).collect(),
        None => groups
            .iter()
            .filter(|g| matches!(g[0].modality.as_str(), "CT" | "MR"))
            .collect(),
    };
    match candidates.as_slice() {
        [] if series_uid.is_some() => Err(Error::invalid(format!(
            "{}: no series {} here; found:\n{}",
            path.display(),
            series_uid.unwrap_or_default(),
            listing()
        ))),
        [] if groups.len() == 1 => Ok(&groups[0]),
        [] => Err(Error::invalid(format!(
            "{}: no CT or MR series and several others: choose one with its series UID:\n{}",
            path.display(),
            listing()
        ))),
        [one] => Ok(one),
        [first, second, ..] if slice_count(first) == slice_count(second) => {
            Err(Error::invalid(format!(
                "{}: several series of {} slices{}: choose one with its series UID:\n{}",
                path.display(),
                slice_count(first),
                if series_uid.is_some() {
                    " (one series UID, several orientations or sizes)"
                } else {
                    ""
                },
                listing()
            )))
        }
        [first, ..] => Ok(first),
    }
}

fn text(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<String> {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| {
            s.trim_matches(|c: char| c == '\0' || c.is_whitespace())
                .to_string()
        })
        .filter(|s| !s.is_empty())
}

fn numbers(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<Vec<f64>> {
    obj.get(tag).and_then(|e| e.to_multi_float64().ok())
}

fn number(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<f64> {
    numbers(obj, tag).and_then(|v| v.first().copied())
}

/// The first item of a sequence.
fn item(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<&InMemDicomObject> {
    obj.get(tag).and_then(|e| e.items()).and_then(|i| i.first())
}

/// An attribute of an Enhanced object's frame: from its per-frame functional group, else from the
/// shared one, else from the top level (classic objects have it there).
fn frame_attr<T>(
    obj: &InMemDicomObject,
    per_frame: Option<&InMemDicomObject>,
    group: dicom_core::Tag,
    get: impl Fn(&InMemDicomObject) -> Option<T>,
) -> Option<T> {
    let shared = item(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE);
    per_frame
        .and_then(|f| item(f, group))
        .and_then(&get)
        .or_else(|| shared.and_then(|s| item(s, group)).and_then(&get))
        .or_else(|| get(obj))
}

/// Checks what the attributes claim of the pixel data against what the file holds, before any
/// allocation sized by them: a frame count or frame size beyond the Pixel Data's bytes (or
/// fragments) or beyond [`MAX_VOXELS`] is refused.
fn check_pixel_data(
    obj: &DefaultDicomObject,
    layout: &Layout,
    (rows, columns, frames): (u32, u32, u32),
) -> std::result::Result<(), String> {
    let voxels = rows as u64 * columns as u64 * frames as u64;
    if voxels > MAX_VOXELS {
        return Err(format!(
            "{rows} rows × {columns} columns × {frames} frames need more voxels than the {MAX_VOXELS} (2^30) a volume may hold"
        ));
    }
    let bits = number(obj, tags::BITS_ALLOCATED).unwrap_or(0.0) as u64;
    match layout.pixel_data {
        None => Err("not an image (no Pixel Data)".into()),
        Some(PixelData::Native(bytes)) if (voxels * bits).div_ceil(8) > bytes => Err(format!(
            "Pixel Data holds {bytes} bytes; {rows} rows × {columns} columns × {frames} frames of {bits} bits need {}",
            (voxels * bits).div_ceil(8)
        )),
        Some(PixelData::Encapsulated(fragments)) if frames as u64 > fragments => Err(format!(
            "{frames} frames in {fragments} encapsulated pixel data fragments (each frame has at least one)"
        )),
        Some(_) => Ok(()),
    }
}

fn header(
    file: &Path,
    obj: &DefaultDicomObject,
    layout: &Layout,
) -> std::result::Result<Header, String> {
    let rows = number(obj, tags::ROWS).ok_or("not an image (no Rows)")? as u32;
    let columns = number(obj, tags::COLUMNS).ok_or("not an image (no Columns)")? as u32;
    // The header read stops before Pixel Data; the attributes describing it tell an image.
    if obj.get(tags::BITS_ALLOCATED).is_none() {
        return Err("not an image (no Bits Allocated)".into());
    }
    let samples = number(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1.0);
    if samples != 1.0 {
        return Err(format!(
            "colour image ({} samples per pixel, {}): lwi reads grey-level CT/MR",
            samples,
            text(obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default()
        ));
    }
    let frames = text(obj, tags::NUMBER_OF_FRAMES)
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(1);
    check_pixel_data(obj, layout, (rows, columns, frames))?;
    let per_frame: Vec<&InMemDicomObject> = obj
        .get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|e| e.items())
        .map(|items| items.iter().collect())
        .unwrap_or_default();
    if !per_frame.is_empty() && per_frame.len() != frames as usize {
        return Err(format!(
            "{} per-frame functional groups for {frames} frames",
            per_frame.len()
        ));
    }
    let modality = text(obj, tags::MODALITY).unwrap_or_default();
    // Some writers leave the SOP UIDs to the file meta group only.
    let meta_uid =
        |uid: &str| Some(uid.trim_end_matches('\0').to_string()).filter(|u| !u.is_empty());
    let sop_class = text(obj, tags::SOP_CLASS_UID)
        .or_else(|| meta_uid(obj.meta().media_storage_sop_class_uid()))
        .ok_or("no SOP Class UID")?;
    let sop_instance = text(obj, tags::SOP_INSTANCE_UID)
        .or_else(|| meta_uid(obj.meta().media_storage_sop_instance_uid()))
        .ok_or("no SOP Instance UID")?;
    let mut slices = Vec::new();
    slices
        .try_reserve_exact(frames as usize)
        .map_err(|_| format!("cannot allocate {frames} frames"))?;
    for f in 0..frames {
        let pf = per_frame.get(f as usize).copied();
        let position = frame_attr(obj, pf, tags::PLANE_POSITION_SEQUENCE, |o| {
            numbers(o, tags::IMAGE_POSITION_PATIENT)
        });
        let orientation = frame_attr(obj, pf, tags::PLANE_ORIENTATION_SEQUENCE, |o| {
            numbers(o, tags::IMAGE_ORIENTATION_PATIENT)
        });
        let (Some(position), Some(orientation)) = (position, orientation) else {
            return Err(format!(
                "no Image Position/Orientation (Patient) (modality {modality}): not a cross-sectional image"
            ));
        };
        let pixel_spacing = frame_attr(obj, pf, tags::PIXEL_MEASURES_SEQUENCE, |o| {
            numbers(o, tags::PIXEL_SPACING)
        })
        .ok_or("no Pixel Spacing")?;
        let rescale = |o: &InMemDicomObject| {
            number(o, tags::RESCALE_SLOPE)
                .map(|s| (s, number(o, tags::RESCALE_INTERCEPT).unwrap_or(0.0)))
        };
        let (slope, intercept) =
            frame_attr(obj, pf, tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE, rescale)
                .unwrap_or((1.0, 0.0));
        let (position, orientation, pixel_spacing) =
            match (
                <[f64; 3]>::try_from(position.as_slice()),
                <[f64; 6]>::try_from(orientation.as_slice()),
                <[f64; 2]>::try_from(pixel_spacing.as_slice()),
            ) {
                (Ok(p), Ok(o), Ok(s)) => (p, o, s),
                _ => return Err(
                    "Image Position/Orientation or Pixel Spacing has the wrong number of values"
                        .into(),
                ),
            };
        let values = position.iter().chain(&orientation).chain(&pixel_spacing);
        if values.into_iter().any(|v| !v.is_finite())
            || pixel_spacing.iter().any(|&s| s <= 0.0)
            || !(slope.is_finite() && intercept.is_finite() && slope != 0.0)
        {
            return Err(
                "non-finite or non-positive geometry or rescale (position, orientation, spacing, slope)".into(),
            );
        }
        let (r, c) = (unit(&orientation[..3]), unit(&orientation[3..]));
        if r.is_none()
            || c.is_none()
            || dot(&r.unwrap_or_default(), &c.unwrap_or_default()).abs() > 1e-3
        {
            return Err(format!(
                "Image Orientation (Patient) {orientation:?} is not two orthogonal directions"
            ));
        }
        slices.push(Slice {
            file: file.to_path_buf(),
            frame: f,
            multi_frame: frames > 1,
            position,
            orientation,
            pixel_spacing,
            slope,
            intercept,
            sop_class: sop_class.clone(),
            sop_instance: sop_instance.clone(),
        });
    }
    let patient_study = [
        tags::PATIENT_NAME,
        tags::PATIENT_ID,
        tags::PATIENT_BIRTH_DATE,
        tags::PATIENT_SEX,
        tags::STUDY_DATE,
        tags::STUDY_TIME,
        tags::STUDY_ID,
        tags::ACCESSION_NUMBER,
        tags::REFERRING_PHYSICIAN_NAME,
    ]
    .into_iter()
    .filter_map(|t| text(obj, t).map(|v| (t, v)))
    .collect();
    // Anonymisers may blank the study and series UIDs: such files group as one unnamed series.
    let series_uid = text(obj, tags::SERIES_INSTANCE_UID).unwrap_or_default();
    Ok(Header {
        source: Source {
            patient_study,
            study_uid: text(obj, tags::STUDY_INSTANCE_UID).unwrap_or_default(),
            series_uid: series_uid.clone(),
            frame_of_reference_uid: text(obj, tags::FRAME_OF_REFERENCE_UID).unwrap_or_default(),
            modality: modality.clone(),
            slices: Vec::new(),
        },
        series_uid,
        modality,
        description: text(obj, tags::SERIES_DESCRIPTION).unwrap_or_default(),
        rows,
        columns,
        slices,
        thickness: number(obj, tags::SPACING_BETWEEN_SLICES)
            .or_else(|| number(obj, tags::SLICE_THICKNESS))
            .filter(|t| t.is_finite() && *t > 0.0),
    })
}

fn unit(v: &[f64]) -> Option<[f64; 3]> {
    let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
    (n > 1e-6).then(|| [v[0] / n, v[1] / n, v[2] / n])
}

fn dot(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: &[f64; 3], b: &[f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

/// Sorts the group's slices along the normal, checks they form a regular grid, decodes them.
fn assemble(path: &Path, group: &[Header]) -> Result<Series> {
    let first = &group[0];
    let mut slices: Vec<Slice> = group.iter().flat_map(|h| h.slices.clone()).collect();
    let o = slices[0].orientation;
    let (r, c) = (
        unit(&o[..3]).unwrap_or_default(),
        unit(&o[3..]).unwrap_or_default(),
    );
    let n = cross(&r, &c);
    let spacing_xy = slices[0].pixel_spacing;
    for s in &slices {
        if s.pixel_spacing
            .iter()
            .zip(&spacing_xy)
            .any(|(a, b)| (a - b).abs() > 1e-4)
        {
            return Err(Error::unsupported(format!(
                "{}: mixed pixel spacings in one series ({:?} in {} vs {:?})",
                path.display(),
                s.pixel_spacing,
                s.file.display(),
                spacing_xy
            )));
        }
    }
    slices.sort_by(|a, b| dot(&a.position, &n).total_cmp(&dot(&b.position, &n)));
    let grid = grid_spacing(path, &slices, &n)?;
    let dz = grid.map(|g| g.spacing).or(first.thickness).unwrap_or(1.0);

    // LPS affine: columns are the voxel axes (x along a row, y down the columns, z along n).
    let p0 = slices[0].position;
    let (sx, sy) = (spacing_xy[1], spacing_xy[0]);
    let mut lps: Affine = [[0.0; 4], [0.0; 4], [0.0; 4], [0.0, 0.0, 0.0, 1.0]];
    for i in 0..3 {
        lps[i] = [r[i] * sx, c[i] * sy, n[i] * dz, p0[i]];
    }
    let affine = flip_lps_ras(&lps);

    let (rows, columns) = (first.rows as usize, first.columns as usize);
    let plane = rows * columns;
    crate::volume::voxel_count(&[columns as i64, rows as i64, slices.len() as i64], path)?;
    let integral = slices
        .iter()
        .all(|s| s.slope.fract() == 0.0 && s.intercept.fract() == 0.0);
    let mut voxels = Voxels::new(plane * slices.len(), integral)?;
    let mut values = try_vec(plane, 0f64, "a slice")?;
    // Decode file by file (a multi-frame file once), placing each frame at its sorted index.
    let mut by_file: BTreeMap<&Path, Vec<(usize, &Slice)>> = BTreeMap::new();
    for (z, s) in slices.iter().enumerate() {
        by_file.entry(&s.file).or_default().push((z, s));
    }
    for (file, frames) in by_file {
        let (obj, _) = dicom_walk::open(file, None).map_err(|e| Error::format(file, e))?;
        let decoded = obj
            .decode_pixel_data()
            .map_err(|e| Error::format(file, format!("pixel data: {e}")))?;
        if decoded.rows() as usize != rows || decoded.columns() as usize != columns {
            return Err(Error::format(
                file,
                "Rows/Columns differ from the pixel data",
            ));
        }
        let bits = Bits {
            allocated: decoded.bits_allocated(),
            stored: decoded.bits_stored(),
            high: decoded.high_bit(),
            signed: decoded.pixel_representation() == dicom_pixeldata::PixelRepresentation::Signed,
        };
        // Explicit VR Big Endian 32-bit pixels in an OW element come back as 16-bit words, each
        // swapped to little-endian but still in big-endian order: swap the words back.
        let word_swapped = obj.meta().transfer_syntax() == EXPLICIT_VR_BIG_ENDIAN
            && bits.allocated == 32
            && obj
                .get(tags::PIXEL_DATA)
                .is_some_and(|e| e.vr() == dicom_core::VR::OW);
        for (z, s) in frames {
            let raw = decoded
                .frame_data(s.frame)
                .map_err(|e| Error::format(file, format!("frame {}: {e}", s.frame + 1)))?;
            let fixed: Vec<u8>;
            let raw = if word_swapped {
                fixed = raw
                    .chunks_exact(4)
                    .flat_map(|b| [b[2], b[3], b[0], b[1]])
                    .collect();
                &fixed[..]
            } else {
                raw
            };
            bits.modality_values(file, raw, s.slope, s.intercept, &mut values)?;
            voxels.put(z * plane, &values);
        }
    }
    let (dtype, bytes) = voxels.into_bytes()?;
    let data =
        dtype.tensor_from_le_bytes(&bytes, [columns as i64, rows as i64, slices.len() as i64])?;
    let volume = Volume::new(data, affine, dtype).map_err(|e| Error::format(path, e.message))?;
    let mut source = first.source.clone();
    source.slices = slices
        .iter()
        .map(|s| {
            (
                s.sop_class.clone(),
                s.sop_instance.clone(),
                s.multi_frame.then_some(s.frame + 1),
            )
        })
        .collect();
    Ok(Series { volume, source })
}

/// How far slice positions may scatter around the fitted regular grid: this many mm, or this
/// fraction of the slice spacing if larger. Scanners store rounded positions (seen: 0.1 mm on an
/// oblique GE MR series, steps 6.96 to 7.07 mm); a missing slice moves positions by half a slice
/// or more, and a step may differ from the fitted one by at most twice the scatter.
const SCATTER_TOLERANCE_MM: f64 = 0.1;
const SCATTER_TOLERANCE_REL: f64 = 0.05;

/// A regular grid fitted to the sorted slice positions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SliceGrid {
    /// The least-squares slice step, mm.
    pub spacing: f64,
    /// The largest distance of a slice from its place on the fitted grid, mm.
    pub max_deviation: f64,
}

/// The slice grid fitted to the sorted positions (least squares, as ITK reads such series), or
/// `None` for one slice. Refuses duplicates, gaps (a step far from the fitted one), positions that
/// scatter more than scanners round them, and positions that move within the slice plane (gantry
/// tilt), naming the slices.
fn grid_spacing(path: &Path, slices: &[Slice], n: &[f64; 3]) -> Result<Option<SliceGrid>> {
    if slices.len() < 2 {
        return Ok(None);
    }
    let d: Vec<f64> = slices.iter().map(|s| dot(&s.position, n)).collect();
    let steps: Vec<f64> = d.windows(2).map(|w| w[1] - w[0]).collect();
    // Least-squares line d_k = a + s·k.
    let m = d.len() as f64;
    let k_mean = (m - 1.0) / 2.0;
    let d_mean = d.iter().sum::<f64>() / m;
    let (mut num, mut den) = (0.0, 0.0);
    for (k, v) in d.iter().enumerate() {
        num += (k as f64 - k_mean) * (v - d_mean);
        den += (k as f64 - k_mean).powi(2);
    }
    let spacing = num / den;
    let origin = d_mean - spacing * k_mean;
    let tol = GRID_TOLERANCE_MM.max(GRID_TOLERANCE_REL * spacing);
    if let Some(i) = steps.iter().position(|&s| s < tol) {
        return Err(Error::unsupported(format!(
            "{}: two images at the same position {:.3} mm along the slice normal ({} and {}): a repeated acquisition or mixed series; choose the files",
            path.display(),
            d[i],
            slices[i].file.display(),
            slices[i + 1].file.display()
        )));
    }
    let scatter = SCATTER_TOLERANCE_MM.max(SCATTER_TOLERANCE_REL * spacing);
    let deviation = |k: usize| (d[k] - origin - spacing * k as f64).abs();
    let uneven = steps
        .iter()
        .position(|&s| (s - spacing).abs() > 2.0 * scatter)
        .or_else(|| (0..d.len()).find(|&k| deviation(k) > scatter));
    if let Some(i) = uneven.map(|i| i.min(steps.len() - 1)) {
        return Err(Error::unsupported(format!(
            "{}: not a regular grid: slice {} → {} steps {:.4} mm where the series' fitted step is {:.4} mm (missing slice or uneven spacing; {} then {})",
            path.display(),
            i,
            i + 1,
            steps[i],
            spacing,
            slices[i].file.display(),
            slices[i + 1].file.display()
        )));
    }
    let max_deviation = (0..d.len()).map(deviation).fold(0.0, f64::max);
    let p0 = slices[0].position;
    let in_plane = tol.max(scatter);
    for (k, s) in slices.iter().enumerate() {
        // The offset within the slice plane: rounding bounds it, a tilt makes it grow with k.
        let along = dot(&s.position, n) - dot(&p0, n);
        let off = (0..3)
            .map(|i| (s.position[i] - p0[i] - n[i] * along).powi(2))
            .sum::<f64>()
            .sqrt();
        if off > in_plane.max(1e-3 * spacing * k as f64) {
            return Err(Error::unsupported(format!(
                "{}: slice positions leave the slice normal by {off:.3} mm at slice {k} ({}): gantry tilt or sheared series, which lwi does not resample",
                path.display(),
                s.file.display()
            )));
        }
    }
    Ok(Some(SliceGrid {
        spacing,
        max_deviation,
    }))
}

/// How stored values are packed.
struct Bits {
    allocated: u16,
    stored: u16,
    high: u16,
    signed: bool,
}

impl Bits {
    /// Unpacks one frame (little-endian as decoded) into modality values.
    fn modality_values(
        &self,
        file: &Path,
        raw: &[u8],
        slope: f64,
        intercept: f64,
        out: &mut [f64],
    ) -> Result<()> {
        let size = match self.allocated {
            8 => 1,
            16 => 2,
            32 => 4,
            other => {
                return Err(Error::unsupported(format!(
                    "{}: {other} bits allocated (8, 16 or 32 are read)",
                    file.display()
                )));
            }
        };
        if raw.len() < out.len() * size || self.stored == 0 || self.stored > self.allocated {
            return Err(Error::format(
                file,
                format!(
                    "frame has {} bytes for {} pixels of {} bits ({} stored)",
                    raw.len(),
                    out.len(),
                    self.allocated,
                    self.stored
                ),
            ));
        }
        // The stored bits end at HighBit; anything above them (overlays, padding) is dropped.
        let shift = (self.high + 1).saturating_sub(self.stored) as u32;
        let mask: u64 = if self.stored >= 64 {
            u64::MAX
        } else {
            (1u64 << self.stored) - 1
        };
        for (i, v) in out.iter_mut().enumerate() {
            let b = &raw[i * size..(i + 1) * size];
            let word = match size {
                1 => b[0] as u64,
                2 => u16::from_le_bytes([b[0], b[1]]) as u64,
                _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64,
            };
            let bits = (word >> shift) & mask;
            let stored = if self.signed && bits >> (self.stored - 1) & 1 == 1 {
                bits as i64 - (1i64 << self.stored)
            } else {
                bits as i64
            };
            *v = stored as f64 * slope + intercept;
        }
        Ok(())
    }
}

/// The volume's modality values, four bytes a voxel: integers while every rescale is integral (and
/// the values fit), float32 otherwise.
enum Voxels {
    Int(Vec<i32>),
    Float(Vec<f32>),
}

impl Voxels {
    fn new(n: usize, integral: bool) -> Result<Voxels> {
        Ok(if integral {
            Voxels::Int(try_vec(n, 0, "the volume")?)
        } else {
            Voxels::Float(try_vec(n, 0.0, "the volume")?)
        })
    }

    /// Stores one plane at voxel offset `at`; integers beyond int32 turn the store to float32.
    fn put(&mut self, at: usize, plane: &[f64]) {
        if let Voxels::Int(v) = self {
            let fits = plane
                .iter()
                .all(|&x| (i32::MIN as f64..=i32::MAX as f64).contains(&x));
            if fits {
                for (d, &x) in v[at..at + plane.len()].iter_mut().zip(plane) {
                    *d = x as i32;
                }
                return;
            }
            // Same size: the conversion reuses the buffer rather than allocating a second one.
            let ints = std::mem::take(v);
            *self = Voxels::Float(ints.into_iter().map(|x| x as f32).collect());
        }
        if let Voxels::Float(v) = self {
            for (d, &x) in v[at..at + plane.len()].iter_mut().zip(plane) {
                *d = x as f32;
            }
        }
    }

    /// The narrowest exact type (int16, int32, else float32) and the little-endian voxels.
    fn into_bytes(self) -> Result<(DType, Vec<u8>)> {
        Ok(match self {
            Voxels::Int(v) => {
                let small = v
                    .iter()
                    .all(|&x| (i16::MIN as i32..=i16::MAX as i32).contains(&x));
                if small {
                    (DType::I16, pack(&v, |x| (x as i16).to_le_bytes())?)
                } else {
                    (DType::I32, pack(&v, i32::to_le_bytes)?)
                }
            }
            Voxels::Float(v) => (DType::F32, pack(&v, f32::to_le_bytes)?),
        })
    }
}

/// Values as packed little-endian bytes, in a buffer allocated fallibly.
fn pack<T: Copy, const N: usize>(values: &[T], bytes: impl Fn(T) -> [u8; N]) -> Result<Vec<u8>> {
    let mut out = try_vec(values.len() * N, 0u8, "the volume's bytes")?;
    for (o, &x) in out.chunks_exact_mut(N).zip(values) {
        o.copy_from_slice(&bytes(x));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice_at(z: f64, x: f64) -> Slice {
        Slice {
            file: PathBuf::from(format!("s{z}.dcm")),
            frame: 0,
            multi_frame: false,
            position: [x, 0.0, z],
            orientation: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            pixel_spacing: [0.5, 0.5],
            slope: 1.0,
            intercept: 0.0,
            sop_class: String::new(),
            sop_instance: String::new(),
        }
    }

    #[test]
    fn spacing_comes_from_positions_and_irregular_grids_are_refused() {
        let n = [0.0, 0.0, 1.0];
        let p = Path::new("series");
        let even: Vec<Slice> = (0..5).map(|k| slice_at(2.5 * k as f64, 0.0)).collect();
        assert_eq!(grid_spacing(p, &even, &n).unwrap().unwrap().spacing, 2.5);
        // Positions rounded to 0.1 mm on an oblique series (steps 6.96 to 7.07 mm) are a grid.
        let rounded: Vec<Slice> = (0..12)
            .map(|k| slice_at((7.0137 * k as f64 * 10.0).round() / 10.0, 0.0))
            .collect();
        let g = grid_spacing(p, &rounded, &n).unwrap().unwrap();
        assert!(
            (g.spacing - 7.0137).abs() < 0.02 && g.max_deviation > 0.0 && g.max_deviation < 0.1
        );
        let mut gap = even.clone();
        gap.remove(2);
        assert!(
            grid_spacing(p, &gap, &n)
                .unwrap_err()
                .message
                .contains("not a regular grid")
        );
        let mut dup = even.clone();
        dup.insert(1, slice_at(0.0, 0.0));
        assert!(
            grid_spacing(p, &dup, &n)
                .unwrap_err()
                .message
                .contains("same position")
        );
        let tilted: Vec<Slice> = (0..5)
            .map(|k| slice_at(2.5 * k as f64, 0.4 * k as f64))
            .collect();
        assert!(
            grid_spacing(p, &tilted, &n)
                .unwrap_err()
                .message
                .contains("gantry tilt")
        );
        assert_eq!(grid_spacing(p, &even[..1], &n).unwrap(), None);
        let mut uneven = even.clone();
        uneven[3].position[2] += 0.6;
        assert!(grid_spacing(p, &uneven, &n).is_err());
    }

    #[test]
    fn stored_bits_are_masked_and_sign_extended() {
        // 12 bits stored in 16, high bit 11, signed: 0x0FFF is -1; bits above 11 are dropped.
        let bits = Bits {
            allocated: 16,
            stored: 12,
            high: 11,
            signed: true,
        };
        let raw: Vec<u8> = [0x0FFFu16, 0xF7FF, 0x0800, 0x0005]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut out = [0.0; 4];
        bits.modality_values(Path::new("f"), &raw, 2.0, -1024.0, &mut out)
            .unwrap();
        assert_eq!(
            out,
            [
                -1026.0,
                2047.0 * 2.0 - 1024.0,
                -2048.0 * 2.0 - 1024.0,
                -1014.0
            ]
        );
        let unsigned = Bits {
            allocated: 8,
            stored: 8,
            high: 7,
            signed: false,
        };
        let mut one = [0.0];
        unsigned
            .modality_values(Path::new("f"), &[200], 1.0, 0.0, &mut one)
            .unwrap();
        assert_eq!(one, [200.0]);
    }

    #[test]
    fn values_take_the_narrowest_exact_type() {
        let typed = |integral: bool, plane: &[f64]| {
            let mut v = Voxels::new(plane.len(), integral).unwrap();
            v.put(0, plane);
            v.into_bytes().unwrap().0
        };
        assert_eq!(typed(true, &[-1024.0, 3071.0]), DType::I16);
        assert_eq!(typed(true, &[-1024.0, 70000.0]), DType::I32);
        assert_eq!(typed(true, &[4e9]), DType::F32);
        assert_eq!(typed(false, &[0.5]), DType::F32);
    }
}
