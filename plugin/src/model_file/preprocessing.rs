//! The model file's preprocessing section: how volumes are prepared for the network, typed per
//! pipeline and checked per pipeline. Stored as `{"pipeline": NAME, …that pipeline's fields}`;
//! files of format 1 and 2 held one flat union of both pipelines' fields (`pipeline` absent for
//! MONAI's), which still reads.

use super::bounds;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Which pipeline prepares a model's input and puts its output back (docs/models.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pipeline {
    /// MONAI's: RAS, spacing (trilinear), HU window, foreground crop (`crate::pipeline::monai`).
    #[default]
    Monai,
    /// nnU-Net v1's: the stored voxel order, non-zero crop, spacing, CT normalisation
    /// (`crate::pipeline::nnunet`).
    NnUnet,
}

impl Pipeline {
    /// Its name in files, options and messages.
    pub fn name(self) -> &'static str {
        match self {
            Pipeline::Monai => "monai",
            Pipeline::NnUnet => "nn_unet",
        }
    }

    /// The array axis the prepared volume's cranio-caudal depth runs along (where the pretext
    /// shuffles its slabs): MONAI's RAS z, the last; nnU-Net's stored slice axis, the first.
    pub fn depth_axis(self) -> usize {
        match self {
            Pipeline::Monai => 2,
            Pipeline::NnUnet => 0,
        }
    }
}

/// How input volumes are prepared before the network sees them (method §1.1).
#[derive(Debug, Clone, PartialEq)]
pub enum Preprocessing {
    Monai(MonaiPreprocessing),
    NnUnet(NnUnetPreprocessing),
}

/// MONAI's preprocessing (`Orientationd`, `Spacingd`, `ScaleIntensityRanged`, `CropForegroundd`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonaiPreprocessing {
    /// Orientation the volume is resampled into; always "RAS".
    pub orientation: String,
    /// Target voxel spacing in mm along x, y, z.
    pub spacing: [f64; 3],
    /// HU window mapped to [0, 1] with clipping.
    pub intensity_window: [f64; 2],
    /// Sliding-window / crop size in voxels (the network's `img_size`).
    pub roi_size: [i64; 3],
    /// Crop to the bounding box of voxels above the window's lower bound.
    pub crop_foreground: bool,
}

impl Default for MonaiPreprocessing {
    fn default() -> Self {
        MonaiPreprocessing {
            orientation: "RAS".into(),
            spacing: [1.5, 1.5, 2.0],
            intensity_window: [-175.0, 250.0],
            roi_size: [96, 96, 96],
            crop_foreground: true,
        }
    }
}

/// nnU-Net v1's preprocessing: the voxels as stored, cropped to the non-zero box, resampled to
/// `spacing`, CT-normalised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NnUnetPreprocessing {
    /// Target voxel spacing in mm per stored axis (x, y, z).
    pub spacing: [f64; 3],
    /// The patch in the network's axes (z, y, x of the stored array): its `img_size`.
    pub roi_size: [i64; 3],
    /// The plans' intensity properties; absent in a model imported without them, which cannot
    /// segment until imported again with them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ct_normalization: Option<CtNormalization>,
}

/// nnU-Net's "CT" normalisation: clip to the training foreground's 0.5 and 99.5 percentiles, then
/// subtract its mean and divide by its standard deviation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtNormalization {
    pub lower: f64,
    pub upper: f64,
    pub mean: f64,
    pub sd: f64,
}

impl Default for Preprocessing {
    fn default() -> Self {
        Preprocessing::Monai(MonaiPreprocessing::default())
    }
}

impl Preprocessing {
    pub fn pipeline(&self) -> Pipeline {
        match self {
            Preprocessing::Monai(_) => Pipeline::Monai,
            Preprocessing::NnUnet(_) => Pipeline::NnUnet,
        }
    }

    /// The network's input size (the sliding window's).
    pub fn roi_size(&self) -> [i64; 3] {
        match self {
            Preprocessing::Monai(p) => p.roi_size,
            Preprocessing::NnUnet(p) => p.roi_size,
        }
    }

    /// The target spacing in mm.
    pub fn spacing(&self) -> [f64; 3] {
        match self {
            Preprocessing::Monai(p) => p.spacing,
            Preprocessing::NnUnet(p) => p.spacing,
        }
    }

    /// Every field of the pipeline within [`bounds`], naming the field and the value.
    pub fn validate(&self) -> Result<()> {
        super::check_spacing("preprocessing spacing", self.spacing())?;
        match self {
            Preprocessing::Monai(p) => {
                if p.orientation != "RAS" {
                    return Err(Error::invalid(format!(
                        "preprocessing orientation '{}' (lwi models work in RAS)",
                        p.orientation
                    )));
                }
                let [lo, hi] = p.intensity_window;
                if !(intensity(lo) && intensity(hi) && lo < hi) {
                    return Err(Error::invalid(format!(
                        "preprocessing intensity_window {:?} must be [low, high], low < high, \
                         within ±{}",
                        p.intensity_window,
                        bounds::MAX_INTENSITY
                    )));
                }
            }
            Preprocessing::NnUnet(p) => {
                if let Some(n) = &p.ct_normalization {
                    let ok = [n.lower, n.upper, n.mean, n.sd].into_iter().all(intensity)
                        && n.lower < n.upper
                        && n.sd >= bounds::MIN_SD;
                    if !ok {
                        return Err(Error::invalid(format!(
                            "preprocessing ct_normalization {n:?}: needs values within ±{}, \
                             lower < upper and sd ≥ {}",
                            bounds::MAX_INTENSITY,
                            bounds::MIN_SD
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The section as stored in a file of `format_version`: the tagged form, or (versions 1 and 2)
    /// the flat union, whose other pipeline's fields a nnU-Net model carried unread.
    pub(super) fn from_document(
        doc: serde_json::Value,
        format_version: u32,
    ) -> std::result::Result<Preprocessing, String> {
        let mut fields = match doc {
            serde_json::Value::Object(o) => o,
            other => return Err(format!("preprocessing must be an object, got {other}")),
        };
        let pipeline: Pipeline = match fields.remove("pipeline") {
            None => Pipeline::Monai,
            Some(p) => serde_json::from_value(p.clone()).map_err(|_| {
                format!("preprocessing pipeline {p} is not one lwi runs (\"monai\", \"nn_unet\")")
            })?,
        };
        let section = |fields| serde_json::Value::Object(fields);
        let parse_error =
            |e: serde_json::Error| format!("preprocessing ({}): {e}", pipeline.name());
        Ok(match pipeline {
            Pipeline::Monai => {
                Preprocessing::Monai(serde_json::from_value(section(fields)).map_err(parse_error)?)
            }
            Pipeline::NnUnet => {
                if format_version <= 2 {
                    for monai_only in ["orientation", "intensity_window", "crop_foreground"] {
                        fields.remove(monai_only);
                    }
                }
                Preprocessing::NnUnet(serde_json::from_value(section(fields)).map_err(parse_error)?)
            }
        })
    }

    /// The tagged form files are written in.
    pub fn to_document(&self) -> serde_json::Value {
        let (pipeline, mut doc) = match self {
            Preprocessing::Monai(p) => (Pipeline::Monai, serde_json::to_value(p)),
            Preprocessing::NnUnet(p) => (Pipeline::NnUnet, serde_json::to_value(p)),
        };
        if let Ok(serde_json::Value::Object(fields)) = &mut doc {
            fields.insert("pipeline".into(), pipeline.name().into());
        }
        doc.unwrap_or_default()
    }
}

fn intensity(v: f64) -> bool {
    v.is_finite() && v.abs() <= bounds::MAX_INTENSITY
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_flat_union_of_format_2_reads_as_its_pipelines_section() {
        let flat = json!({"orientation": "RAS", "spacing": [8.0, 8.0, 8.0], "intensity_window": [-175.0, 250.0],
            "roi_size": [16, 32, 32], "crop_foreground": true, "pipeline": "nn_unet",
            "ct_normalization": {"lower": 5.0, "upper": 263.0, "mean": 77.0, "sd": 53.0}});
        let Ok(Preprocessing::NnUnet(p)) = Preprocessing::from_document(flat.clone(), 2) else {
            panic!("a format 2 nnU-Net section")
        };
        assert_eq!((p.spacing, p.roi_size), ([8.0; 3], [16, 32, 32]));
        // written tagged, with that pipeline's fields only
        let doc = Preprocessing::NnUnet(p).to_document();
        assert_eq!(doc["pipeline"], "nn_unet");
        assert!(doc.get("intensity_window").is_none());
        // from format 3 on, another pipeline's field is an error
        let err = Preprocessing::from_document(flat, 3).unwrap_err();
        let monai_only = ["orientation", "intensity_window", "crop_foreground"];
        assert!(monai_only.iter().any(|f| err.contains(f)), "{err}");
    }

    #[test]
    fn monai_sections_read_with_or_without_their_tag() {
        let untagged = json!({"orientation": "RAS", "spacing": [1.5, 1.5, 2.0], "intensity_window": [-175.0, 250.0],
            "roi_size": [96, 96, 96], "crop_foreground": true});
        let p = Preprocessing::from_document(untagged, 1).unwrap();
        assert_eq!(p, Preprocessing::default());
        assert_eq!(Preprocessing::from_document(p.to_document(), 3), Ok(p));
        let foreign = json!({"pipeline": "monai", "orientation": "RAS", "spacing": [1.5, 1.5, 2.0],
            "intensity_window": [-175.0, 250.0], "roi_size": [96, 96, 96], "crop_foreground": true,
            "ct_normalization": {"lower": 0.0, "upper": 1.0, "mean": 0.0, "sd": 1.0}});
        let err = Preprocessing::from_document(foreign, 2).unwrap_err();
        assert!(err.contains("ct_normalization"), "{err}");
        let err = Preprocessing::from_document(json!({"pipeline": "nnunet_v2"}), 3).unwrap_err();
        assert!(err.contains("nnunet_v2"), "{err}");
    }
}
