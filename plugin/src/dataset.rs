//! Training data: an MSD / nnU-Net `dataset.json` or a MONAI-style datalist, and the checks of
//! each case's label map. Each pipeline prepares the cases its own way
//! (`pipeline::{monai, nnunet}::train_case`).

use crate::error::{Error, Result};
use crate::volume::Volume;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Kind;

/// One entry of a list: an image, with a label map when there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub image: PathBuf,
    pub label: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct DatasetFile {
    pub training: Vec<Entry>,
    pub validation: Vec<Entry>,
    /// Label value → name, from "labels" (MSD: {"0": "background", …}).
    pub labels: BTreeMap<u32, String>,
}

impl DatasetFile {
    /// Reads `training` and `validation` lists (entries `{"image", "label"}`, `{"image"}` or a bare
    /// path) and `labels`; relative paths resolve against the JSON's folder.
    pub fn read(path: &Path) -> Result<DatasetFile> {
        let text = crate::io::read_text(path)?;
        let doc = crate::options::document(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |s: &str| -> PathBuf {
            let p = Path::new(s);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let list = |key: &str| -> Result<Vec<Entry>> {
            let Some(items) = doc.get(key) else {
                return Ok(Vec::new());
            };
            let items = items
                .as_array()
                .ok_or_else(|| Error::format(path, format!("'{key}' is not a list")))?;
            items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    serde_json::Value::String(s) => Ok(Entry {
                        image: resolve(s),
                        label: None,
                    }),
                    serde_json::Value::Object(o) => {
                        let image = o.get("image").and_then(|v| v.as_str()).ok_or_else(|| {
                            Error::format(path, format!("{key}[{i}] has no \"image\" path"))
                        })?;
                        Ok(Entry {
                            image: resolve(image),
                            label: o.get("label").and_then(|v| v.as_str()).map(resolve),
                        })
                    }
                    _ => Err(Error::format(
                        path,
                        format!("{key}[{i}] is neither a path nor an object"),
                    )),
                })
                .collect()
        };
        let mut labels = BTreeMap::new();
        if let Some(map) = doc.get("labels").and_then(|v| v.as_object()) {
            for (k, v) in map {
                // MSD writes {"0": "background"}; nnU-Net v2 writes {"background": 0}.
                let (id, name) = match (k.parse::<u32>(), v) {
                    (Ok(id), serde_json::Value::String(name)) => (id, name.clone()),
                    (Err(_), serde_json::Value::Number(n)) => {
                        (n.as_u64().unwrap_or(u64::MAX) as u32, k.clone())
                    }
                    _ => {
                        return Err(Error::format(
                            path,
                            format!("label entry {k:?}: {v} is not id → name"),
                        ));
                    }
                };
                labels.insert(id, name);
            }
        }
        let ds = DatasetFile {
            training: list("training")?,
            validation: list("validation")?,
            labels,
        };
        if ds.training.is_empty() {
            return Err(Error::format(path, "the \"training\" list is empty"));
        }
        Ok(ds)
    }

    /// A content fingerprint of the training list (file sizes and names), for provenance.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for e in &self.training {
            for p in std::iter::once(&e.image).chain(e.label.iter()) {
                h.update(
                    p.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                );
                h.update(
                    std::fs::metadata(p)
                        .map(|m| m.len())
                        .unwrap_or(0)
                        .to_le_bytes(),
                );
            }
        }
        format!("{:x}", h.finalize())[..16].to_string()
    }
}

/// A label map must lie on its image's grid (dims equal, voxel-to-world matrices equal within
/// nnU-Net's tolerance: `numpy.allclose`'s 1e-5 relative, plus 1e-3 mm) and, when `classes` is
/// given, hold only the integer values 0..classes.
pub fn check_label(
    image: &Volume,
    label: &Volume,
    path: &Path,
    classes: Option<u32>,
) -> Result<()> {
    if label.dims() != image.dims() {
        return Err(Error::invalid(format!(
            "{}: label dims {:?} differ from the image's {:?}",
            path.display(),
            label.dims(),
            image.dims()
        )));
    }
    let (a, b) = (&label.affine, &image.affine);
    for r in 0..3 {
        for c in 0..4 {
            if (a[r][c] - b[r][c]).abs() > 1e-3 + 1e-5 * b[r][c].abs() {
                return Err(Error::invalid(format!(
                    "{}: the label map lies on another grid than its image (voxel-to-RAS matrix \
                     entry [{r}][{c}] is {} for the label, {} for the image): they must match",
                    path.display(),
                    a[r][c],
                    b[r][c]
                )));
            }
        }
    }
    let Some(classes) = classes else {
        return Ok(());
    };
    let values = label.data.f_to_kind(Kind::Double)?;
    let (lo, hi) = (
        values.f_min()?.double_value(&[]),
        values.f_max()?.double_value(&[]),
    );
    let fractional = values
        .f_sub(&values.f_round()?)?
        .f_abs()?
        .f_max()?
        .double_value(&[]);
    for v in [lo, hi] {
        if v < 0.0 || v >= f64::from(classes) {
            return Err(Error::invalid(format!(
                "{}: label value {v} is not one of the dataset's labels 0..{} (dataset.json \"labels\")",
                path.display(),
                classes - 1
            )));
        }
    }
    if fractional > 0.0 {
        return Err(Error::invalid(format!(
            "{}: label values must be whole numbers; one is {fractional} off",
            path.display()
        )));
    }
    Ok(())
}
