//! Every input a fuzz target ever crashed on (tests/fuzz/regressions/TARGET/), replayed through the
//! same entry point: each must now give a value or an error, never a panic.

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fuzz/regressions")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn nifti_crashes_stay_fixed() {
    let files = inputs("nifti");
    assert!(!files.is_empty(), "the vox_offset overflow input is kept");
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let r = lwi::io::nifti::from_bytes(Path::new("fuzz.nii"), bytes);
        assert!(r.is_err(), "{} decodes to a volume", f.display());
    }
}

#[test]
fn nrrd_crashes_stay_fixed() {
    for f in inputs("nrrd") {
        let bytes = std::fs::read(&f).unwrap();
        let _ = lwi::io::nrrd::from_bytes(Path::new("/nonexistent/fuzz.nrrd"), bytes);
    }
}

#[test]
fn dicom_crashes_stay_fixed() {
    let dir = tempfile::tempdir().unwrap();
    for f in inputs("dicom") {
        let path = dir.path().join("input.dcm");
        std::fs::copy(&f, &path).unwrap();
        let _ = lwi::io::dicom::list(&path);
        let _ = lwi::io::dicom::read(&path, None);
    }
}

#[test]
fn option_crashes_stay_fixed() {
    for f in inputs("options") {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
        let _ = lwi::train::TrainConfig::from_json(&text);
        let _ = lwi::pipeline::SegmentOptions::from_json(&text);
    }
}

#[test]
fn pickle_crashes_stay_fixed() {
    let files = inputs("pickle");
    assert!(!files.is_empty(), "the list that holds itself is kept");
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let r = lwi::model_file::nnunet_plans::from_bytes(Path::new("fuzz.pkl"), &bytes);
        assert!(r.is_err(), "{} reads as plans", f.display());
        let _ = lwi::model_file::pickle::read(&bytes, 0, &lwi::model_file::import::CHECKPOINT);
    }
}

#[test]
fn model_metadata_crashes_stay_fixed() {
    for f in inputs("model_metadata") {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
        if let Ok(meta) = serde_json::from_str::<lwi::model_file::ModelMetadata>(&text)
            && meta.validate().is_ok()
        {
            let _ = meta.arch.values();
        }
    }
}
