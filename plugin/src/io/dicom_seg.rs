//! DICOM out: a label map as a DICOM Segmentation (binary, one frame per segment and slice that
//! holds it) referencing the series it was made from: same study, frame of reference and patient,
//! and per frame the source image it derives from. Segments carry the model's label names and,
//! for organs known here, SNOMED CT codes.

use super::dicom::Source;
use crate::error::{Error, Result};
use crate::volume::{Volume, flip_lps_ras};
use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR, dicom_value};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use std::collections::BTreeMap;
use std::path::Path;

const SEGMENTATION_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.66.4";
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
/// lwi's implementation class UID: a UUID-derived UID (PS3.5 §B.2), fixed for the project.
const IMPLEMENTATION_CLASS_UID: &str = "2.25.163954733928418417206478203436217125641";

fn el(tag: Tag, vr: VR, value: impl Into<PrimitiveValue>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, value.into())
}

fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

fn obj(elements: Vec<DataElement<InMemDicomObject>>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elements)
}

fn code(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    obj(vec![
        el(tags::CODE_VALUE, VR::SH, value),
        el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme),
        el(tags::CODE_MEANING, VR::LO, meaning),
    ])
}

/// Is `path` a DICOM SEG output name (`.dcm`)?
pub fn is_seg_path(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("dcm"))
}

/// A new UID under the UUID root 2.25 (PS3.5 §B.2).
pub fn new_uid() -> String {
    format!("2.25.{}", rand::random::<u128>())
}

fn ds(values: &[f64]) -> PrimitiveValue {
    PrimitiveValue::Strs(values.iter().map(|v| format_ds(*v)).collect())
}

/// A decimal string of at most 16 characters (PS3.5 DS) keeping as many digits as fit.
fn format_ds(v: f64) -> String {
    for precision in (0..=10).rev() {
        let s = format!("{v:.precision$}");
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        };
        if s.len() <= 16 {
            return if s == "-0" { "0".into() } else { s };
        }
    }
    format!("{v:.6e}")
}

/// UTC date and time now as DICOM DA and TM.
fn now() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        format!("{y:04}{m:02}{d:02}"),
        format!("{:02}{:02}{:02}", rem / 3600, rem / 60 % 60, rem % 60),
    )
}

/// The label values, x fastest then y then z (frame order); SEG segments number at most 255 here.
fn label_values(labels: &Volume) -> Result<Vec<u8>> {
    let wide = crate::volume::DType::U16.le_bytes_from_tensor(&labels.data)?;
    wide.chunks_exact(2)
        .map(|b| u8::try_from(u16::from_le_bytes([b[0], b[1]])))
        .collect::<std::result::Result<Vec<u8>, _>>()
        .map_err(|_| Error::unsupported("DICOM SEG output takes label values up to 255"))
}

/// One item of the Segment Sequence: label name, its value, SNOMED CT codes where known.
fn segment_item(number: usize, value: u8, names: &BTreeMap<u32, String>) -> InMemDicomObject {
    let name = names
        .get(&(value as u32))
        .cloned()
        .unwrap_or_else(|| format!("label {value}"));
    let sct = |c: crate::io::anatomy::Code| code(c.value, "SCT", c.meaning);
    let (category, kind) = match crate::io::anatomy::organ(&name) {
        Some(organ) => {
            let mut kind = sct(organ.kind);
            if let Some(m) = organ.modifier {
                kind.put(seq(
                    tags::SEGMENTED_PROPERTY_TYPE_MODIFIER_CODE_SEQUENCE,
                    vec![sct(m)],
                ));
            }
            (sct(crate::io::anatomy::ANATOMICAL_STRUCTURE), kind)
        }
        None => (
            code("85756007", "SCT", "Tissue"),
            code("85756007", "SCT", "Tissue"),
        ),
    };
    obj(vec![
        el(tags::SEGMENT_NUMBER, VR::US, number as u16),
        el(tags::SEGMENT_LABEL, VR::LO, name.as_str()),
        el(
            tags::SEGMENT_DESCRIPTION,
            VR::ST,
            format!("label value {value}").as_str(),
        ),
        el(tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC"),
        el(tags::SEGMENT_ALGORITHM_NAME, VR::LO, "lwi UNETR"),
        seq(
            tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
            vec![category],
        ),
        seq(tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE, vec![kind]),
    ])
}

/// The per-frame functional groups of segment `segment`'s frame on slice `z`: where it lies and
/// the source image (and frame) it derives from.
fn frame_item(
    segment: usize,
    z: usize,
    position: &[f64; 3],
    (sop_class, sop_instance, frame): &(String, String, Option<u32>),
) -> InMemDicomObject {
    let mut reference = vec![
        el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, sop_class.as_str()),
        el(
            tags::REFERENCED_SOP_INSTANCE_UID,
            VR::UI,
            sop_instance.as_str(),
        ),
        // The label map is on the source grid: each frame covers its source image exactly.
        el(tags::SPATIAL_LOCATIONS_PRESERVED, VR::CS, "YES"),
    ];
    if let Some(f) = frame {
        reference.push(el(
            tags::REFERENCED_FRAME_NUMBER,
            VR::IS,
            f.to_string().as_str(),
        ));
    }
    reference.push(seq(
        tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
        vec![code(
            "121322",
            "DCM",
            "Source image for image processing operation",
        )],
    ));
    obj(vec![
        seq(
            tags::DERIVATION_IMAGE_SEQUENCE,
            vec![obj(vec![
                seq(tags::SOURCE_IMAGE_SEQUENCE, vec![obj(reference)]),
                seq(
                    tags::DERIVATION_CODE_SEQUENCE,
                    vec![code("113076", "DCM", "Segmentation")],
                ),
            ])],
        ),
        seq(
            tags::FRAME_CONTENT_SEQUENCE,
            vec![obj(vec![el(
                tags::DIMENSION_INDEX_VALUES,
                VR::UL,
                dicom_value!(U32, [segment as u32, (z + 1) as u32]),
            )])],
        ),
        seq(
            tags::PLANE_POSITION_SEQUENCE,
            vec![obj(vec![el(
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                ds(position),
            )])],
        ),
        seq(
            tags::SEGMENT_IDENTIFICATION_SEQUENCE,
            vec![obj(vec![el(
                tags::REFERENCED_SEGMENT_NUMBER,
                VR::US,
                segment as u16,
            )])],
        ),
    ])
}

/// Writes `labels` (on the grid of the series `source` describes) as a DICOM SEG at `path`,
/// through a temporary name. `names` maps label values to segment labels.
pub fn write(
    labels: &Volume,
    source: &Source,
    names: &BTreeMap<u32, String>,
    path: &Path,
) -> Result<()> {
    let [nx, ny, nz] = labels.dims();
    if source.slices.len() != nz as usize {
        return Err(Error::internal(format!(
            "label map has {nz} slices, its source series {}",
            source.slices.len()
        )));
    }
    let values = label_values(labels)?;
    let plane = (nx * ny) as usize;
    let present: Vec<u8> = {
        let mut seen = [false; 256];
        values.iter().for_each(|&v| seen[v as usize] = true);
        (1..=255u8).filter(|&v| seen[v as usize]).collect()
    };

    let lps = flip_lps_ras(&labels.affine);
    let spacing = labels.spacing();
    let col = |c: usize| {
        [
            lps[0][c] / spacing[c],
            lps[1][c] / spacing[c],
            lps[2][c] / spacing[c],
        ]
    };
    let (row_dir, col_dir) = (col(0), col(1));
    let position = |z: usize| -> [f64; 3] { [0, 1, 2].map(|r| lps[r][3] + lps[r][2] * z as f64) };

    let series_uid = new_uid();
    let instance_uid = new_uid();
    let (date, time) = now();
    let study_uid = if source.study_uid.is_empty() {
        new_uid()
    } else {
        source.study_uid.clone()
    };
    let frame_of_reference = if source.frame_of_reference_uid.is_empty() {
        new_uid()
    } else {
        source.frame_of_reference_uid.clone()
    };

    let segments: Vec<InMemDicomObject> = present
        .iter()
        .enumerate()
        .map(|(i, &v)| segment_item(i + 1, v, names))
        .collect();

    // Frames: for each segment, each slice that holds it; bits packed LSB first, frame after frame.
    let mut frames = Vec::new();
    let mut bits: Vec<u8> = Vec::new();
    let mut nbits = 0usize;
    for (i, &v) in present.iter().enumerate() {
        for z in 0..nz as usize {
            let slice = &values[z * plane..(z + 1) * plane];
            if !slice.contains(&v) {
                continue;
            }
            for &label in slice {
                if nbits % 8 == 0 {
                    bits.push(0);
                }
                if label == v {
                    *bits.last_mut().expect("pushed above") |= 1 << (nbits % 8);
                }
                nbits += 1;
            }
            frames.push(frame_item(i + 1, z, &position(z), &source.slices[z]));
        }
    }
    if bits.len() % 2 == 1 {
        bits.push(0);
    }
    let n_frames = frames.len();

    let dimension_uid = new_uid();
    let dimension = |pointer: Tag, group: Tag, label: &str| {
        obj(vec![
            el(
                tags::DIMENSION_ORGANIZATION_UID,
                VR::UI,
                dimension_uid.as_str(),
            ),
            el(
                tags::DIMENSION_INDEX_POINTER,
                VR::AT,
                PrimitiveValue::Tags((&[pointer][..]).into()),
            ),
            el(
                tags::FUNCTIONAL_GROUP_POINTER,
                VR::AT,
                PrimitiveValue::Tags((&[group][..]).into()),
            ),
            el(tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, label),
        ])
    };
    let mut referenced: Vec<(String, String)> = source
        .slices
        .iter()
        .map(|(c, i, _)| (c.clone(), i.clone()))
        .collect();
    referenced.dedup();

    let mut elements = vec![
        el(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"),
        el(
            tags::IMAGE_TYPE,
            VR::CS,
            dicom_value!(Strs, ["DERIVED", "PRIMARY"]),
        ),
        el(tags::SOP_CLASS_UID, VR::UI, SEGMENTATION_STORAGE),
        el(tags::SOP_INSTANCE_UID, VR::UI, instance_uid.as_str()),
        el(tags::SERIES_DATE, VR::DA, date.as_str()),
        el(tags::SERIES_TIME, VR::TM, time.as_str()),
        el(tags::CONTENT_DATE, VR::DA, date.as_str()),
        el(tags::CONTENT_TIME, VR::TM, time.as_str()),
        el(tags::MODALITY, VR::CS, "SEG"),
        el(tags::MANUFACTURER, VR::LO, "lwi"),
        el(tags::SERIES_DESCRIPTION, VR::LO, "lwi segmentation"),
        el(tags::MANUFACTURER_MODEL_NAME, VR::LO, "lwi"),
        el(tags::DEVICE_SERIAL_NUMBER, VR::LO, "0"),
        el(tags::SOFTWARE_VERSIONS, VR::LO, env!("CARGO_PKG_VERSION")),
        el(tags::STUDY_INSTANCE_UID, VR::UI, study_uid.as_str()),
        el(tags::SERIES_INSTANCE_UID, VR::UI, series_uid.as_str()),
        el(tags::SERIES_NUMBER, VR::IS, "9901"),
        el(tags::INSTANCE_NUMBER, VR::IS, "1"),
        el(
            tags::FRAME_OF_REFERENCE_UID,
            VR::UI,
            frame_of_reference.as_str(),
        ),
        el(tags::POSITION_REFERENCE_INDICATOR, VR::LO, ""),
        el(tags::SAMPLES_PER_PIXEL, VR::US, 1u16),
        el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        el(
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            n_frames.to_string().as_str(),
        ),
        el(tags::ROWS, VR::US, ny as u16),
        el(tags::COLUMNS, VR::US, nx as u16),
        el(tags::BITS_ALLOCATED, VR::US, 1u16),
        el(tags::BITS_STORED, VR::US, 1u16),
        el(tags::HIGH_BIT, VR::US, 0u16),
        el(tags::PIXEL_REPRESENTATION, VR::US, 0u16),
        el(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"),
        el(tags::CONTENT_LABEL, VR::CS, "LWI"),
        el(
            tags::CONTENT_DESCRIPTION,
            VR::LO,
            "lwi automatic segmentation",
        ),
        el(tags::CONTENT_CREATOR_NAME, VR::PN, ""),
        el(tags::SEGMENTATION_TYPE, VR::CS, "BINARY"),
        seq(tags::SEGMENT_SEQUENCE, segments),
        seq(
            tags::DIMENSION_ORGANIZATION_SEQUENCE,
            vec![obj(vec![el(
                tags::DIMENSION_ORGANIZATION_UID,
                VR::UI,
                dimension_uid.as_str(),
            )])],
        ),
        seq(
            tags::DIMENSION_INDEX_SEQUENCE,
            vec![
                dimension(
                    tags::REFERENCED_SEGMENT_NUMBER,
                    tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                    "ReferencedSegmentNumber",
                ),
                dimension(
                    tags::IMAGE_POSITION_PATIENT,
                    tags::PLANE_POSITION_SEQUENCE,
                    "ImagePositionPatient",
                ),
            ],
        ),
        seq(
            tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE,
            vec![obj(vec![
                seq(
                    tags::PLANE_ORIENTATION_SEQUENCE,
                    vec![obj(vec![el(
                        tags::IMAGE_ORIENTATION_PATIENT,
                        VR::DS,
                        ds(&[row_dir, col_dir].concat()),
                    )])],
                ),
                seq(
                    tags::PIXEL_MEASURES_SEQUENCE,
                    vec![obj(vec![
                        el(tags::PIXEL_SPACING, VR::DS, ds(&[spacing[1], spacing[0]])),
                        el(tags::SLICE_THICKNESS, VR::DS, ds(&[spacing[2]])),
                        el(tags::SPACING_BETWEEN_SLICES, VR::DS, ds(&[spacing[2]])),
                    ])],
                ),
            ])],
        ),
        seq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, frames),
        seq(
            tags::REFERENCED_SERIES_SEQUENCE,
            vec![obj(vec![
                el(
                    tags::SERIES_INSTANCE_UID,
                    VR::UI,
                    source.series_uid.as_str(),
                ),
                seq(
                    tags::REFERENCED_INSTANCE_SEQUENCE,
                    referenced
                        .iter()
                        .map(|(c, i)| {
                            obj(vec![
                                el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, c.as_str()),
                                el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, i.as_str()),
                            ])
                        })
                        .collect(),
                ),
            ])],
        ),
        el(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(bits.into())),
    ];
    // Patient and study attributes of the source; type 2 ones present even when empty.
    for (tag, vr) in [
        (tags::PATIENT_NAME, VR::PN),
        (tags::PATIENT_ID, VR::LO),
        (tags::PATIENT_BIRTH_DATE, VR::DA),
        (tags::PATIENT_SEX, VR::CS),
        (tags::STUDY_DATE, VR::DA),
        (tags::STUDY_TIME, VR::TM),
        (tags::STUDY_ID, VR::SH),
        (tags::ACCESSION_NUMBER, VR::SH),
        (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
    ] {
        let value = source
            .patient_study
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        elements.push(el(tag, vr, value));
    }
    let file = obj(elements)
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(EXPLICIT_VR_LE)
                .media_storage_sop_class_uid(SEGMENTATION_STORAGE)
                .media_storage_sop_instance_uid(instance_uid.as_str())
                .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
                .implementation_version_name(format!("LWI_{}", env!("CARGO_PKG_VERSION"))),
        )
        .map_err(|e| Error::internal(format!("DICOM SEG meta: {e}")))?;
    let mut bytes = Vec::new();
    file.write_all(&mut bytes)
        .map_err(|e| Error::internal(format!("DICOM SEG encoding: {e}")))?;
    super::write_atomically(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_strings_fit_sixteen_characters() {
        assert_eq!(format_ds(0.9765625), "0.9765625");
        assert_eq!(format_ds(-249.51171875), "-249.51171875");
        assert_eq!(format_ds(-0.0), "0");
        assert!(format_ds(1.0 / 3.0).len() <= 16);
        assert!(format_ds(-123456.123456789).len() <= 16);
    }

    #[test]
    fn label_values_above_255_are_refused_not_clipped() {
        let eye = [
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let volume = |v: i32| {
            let data = tch::Tensor::from_slice(&[0i32, 7, v, 1]).view([2, 2, 1]);
            Volume::new(data, eye, crate::volume::DType::U16).unwrap()
        };
        assert_eq!(label_values(&volume(255)).unwrap(), vec![0, 255, 7, 1]);
        let err = label_values(&volume(300)).unwrap_err();
        assert!(err.message.contains("up to 255"), "{}", err.message);
    }

    #[test]
    fn uids_are_short_and_numeric() {
        let u = new_uid();
        assert!(
            u.len() <= 64 && u.starts_with("2.25.") && u[5..].chars().all(|c| c.is_ascii_digit())
        );
    }
}
