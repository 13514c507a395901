//! Helpers shared by the plugin's integration tests: the MONAI reference runner and test reports.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Tensor;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn python() -> PathBuf {
    std::env::var_os("LWI_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"))
}

/// Runs tests/python/monai_unetr_reference.py with `args` after a fresh output folder.
pub fn monai_reference(args: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let script = root().join("tests/python/monai_unetr_reference.py");
    let mut cmd = Command::new(python());
    cmd.arg(script);
    match args.split_first() {
        Some((&flag, rest)) if flag.starts_with("--") => cmd.arg(flag).arg(dir.path()).args(rest),
        _ => cmd.arg(dir.path()).args(args),
    };
    let status = cmd
        .status()
        .expect("run the MONAI reference (make setup installs it)");
    assert!(status.success(), "MONAI reference failed");
    dir
}

/// The tensors a reference script (`tests/python/SCRIPT OUT.safetensors`) writes.
pub fn python_reference(script: &str) -> std::collections::HashMap<String, Tensor> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("reference.safetensors");
    let output = Command::new(python())
        .arg(root().join("tests/python").join(script))
        .arg(&out)
        .output()
        .expect("run the Python reference (make setup installs it)");
    assert!(
        output.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect()
}

/// Appends a line to target/test-reports/NAME.txt (make test prints these at the end).
pub fn report(name: &str, line: &str) {
    use std::io::Write;
    let dir = root().join("target/test-reports");
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.txt")))
        .unwrap();
    writeln!(f, "{line}").unwrap();
}

pub fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}
