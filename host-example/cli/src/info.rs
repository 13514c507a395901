//! `lwi info`: the engine's versions and devices, or what a model file, a volume or a DICOM
//! folder holds.

use crate::Failure;
use crate::files::is_dicom_path;
use crate::plugin::{Plugin, abi};
use std::path::Path;

pub fn show(plugin: &Plugin, path: Option<&Path>) -> Result<(), Failure> {
    match path {
        None => {
            let json: serde_json::Value =
                serde_json::from_str(&plugin.version_json()?).unwrap_or_default();
            let mut out = json;
            out["plugin"] = plugin.path.display().to_string().into();
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        }
        Some(p) if p.extension().is_some_and(|e| e == "safetensors") => {
            let info: serde_json::Value =
                serde_json::from_str(&plugin.model_info(p)?).unwrap_or_default();
            println!(
                "{}",
                serde_json::to_string_pretty(&info).unwrap_or_default()
            );
        }
        Some(p) if is_dicom_path(p) => dicom_series(plugin, p)?,
        Some(p) => volume(plugin, p)?,
    }
    Ok(())
}

/// The series of a DICOM folder, largest first, with what makes one unreadable.
fn dicom_series(plugin: &Plugin, p: &Path) -> Result<(), Failure> {
    let doc: serde_json::Value = serde_json::from_str(&plugin.dicom_series(p)?).unwrap_or_default();
    for s in doc["series"].as_array().into_iter().flatten() {
        println!(
            "{}  {}  {}x{}  {} slices  ({} files)  {}",
            s["series_uid"]
                .as_str()
                .filter(|u| !u.is_empty())
                .unwrap_or("(no series UID)"),
            s["modality"].as_str().unwrap_or("?"),
            s["columns"],
            s["rows"],
            s["slices"],
            s["files"],
            s["description"]
        );
        if let Some(dev) = s["max_slice_deviation_mm"].as_f64().filter(|&d| d > 0.01) {
            println!(
                "  warning: slice positions scatter up to {dev:.3} mm around the fitted {:.4} mm grid (rounded positions)",
                s["slice_spacing_mm"].as_f64().unwrap_or_default()
            );
        }
        if let Some(why) = s["problem"].as_str() {
            println!("  not readable as a volume: {why}");
        }
    }
    for f in doc["skipped"].as_array().into_iter().flatten() {
        println!(
            "skipped {}: {}",
            f["file"].as_str().unwrap_or("?"),
            f["reason"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

/// A volume's dims, voxel type, spacing and RAS affine.
fn volume(plugin: &Plugin, p: &Path) -> Result<(), Failure> {
    let (dims, dtype, a) = plugin.volume_info(p)?;
    let spacing: Vec<f64> = (0..3)
        .map(|c| (0..3).map(|r| a[4 * r + c].powi(2)).sum::<f64>().sqrt())
        .collect();
    let info = serde_json::json!({
        "path": p.display().to_string(),
        "dims": dims,
        "dtype": abi::DTYPE_NAMES.get(dtype as usize).copied().unwrap_or("?"),
        "spacing_mm": spacing,
        "affine_ras": [&a[0..4], &a[4..8], &a[8..12], &a[12..16]],
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&info).unwrap_or_default()
    );
    Ok(())
}

/// `lwi slicer-path`: the folder of the 3D Slicer CLI modules installed beside this command
/// (`lwi/lib/Slicer-X.Y/cli-modules` of the wheel, next to `lwi/bin/lwi`).
pub fn slicer_path() -> Result<(), Failure> {
    let lib = crate::plugin::exe_dir().join("../lib");
    let found = std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("cli-modules"))
        .filter(|p| p.is_dir() && p.parent().is_some_and(is_slicer_dir))
        .max();
    match found.map(|p| p.canonicalize().unwrap_or(p)) {
        Some(p) => {
            println!("{}", p.display());
            Ok(())
        }
        None => Err(Failure::Io(format!(
            "no Slicer CLI modules beside this lwi (looked for {}/Slicer-X.Y/cli-modules): they are \
             installed with the wheel (`make wheel`, then `pip install`)",
            lib.display()
        ))),
    }
}

fn is_slicer_dir(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("Slicer-"))
}
