//! The `lwi` command as scripts use it: exit codes, plugin loading, phantoms.

use lwi_tests::lwi_cli;
use std::path::Path;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn info_reports_versions_and_devices() {
    let out = lwi_cli(&["info"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info prints JSON");
    assert_eq!(v["libtorch_version"], "2.11.0");
    assert_eq!(v["abi_version"], 1);
    assert!(
        v["devices"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x == "cpu"))
    );
    assert!(v["cuda_available"].is_boolean());
    // One entry per CUDA device, each with its compute capability and bf16 support.
    let gpus = v["gpus"].as_array().expect("gpus is a list");
    assert_eq!(gpus.len() + 1, v["devices"].as_array().unwrap().len());
    assert!(
        gpus.iter()
            .all(|g| g["compute_capability"].is_number() && g["bf16"].is_boolean())
    );
    // The processor's bf16 instructions, as the kernel lists them.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    for flag in ["avx512_bf16", "amx_bf16"] {
        let listed = cpuinfo.split_whitespace().any(|w| w == flag);
        assert_eq!(v["cpu"][flag], listed, "{flag}: {}", v["cpu"]);
    }
}

#[test]
fn a_library_that_is_not_lwi_is_refused_with_exit_code_3() {
    let libm = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("libm");
    let out = lwi_cli(&["--plugin", libm, "info"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("not an lwi plugin"),
        "{}",
        text(&out.stderr)
    );
    let out = lwi_cli(&["--plugin", "/nonexistent/liblwi.so", "info"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("cannot load"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn engine_errors_exit_1_and_usage_errors_exit_2() {
    let out = lwi_cli(&["convert", "/nonexistent/a.nii.gz", "/tmp/b.nii.gz"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("/nonexistent/a.nii.gz"),
        "{}",
        text(&out.stderr)
    );
    let out = lwi_cli(&["convert", "only-one-argument.nii"]);
    assert_eq!(out.status.code(), Some(2));
}

fn phantom(dir: &Path, seed: &str) {
    let out = lwi_cli(&[
        "phantom",
        "--out",
        dir.to_str().unwrap(),
        "--cases",
        "2",
        "--seed",
        seed,
        "--size",
        "40,36,24",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["imagesTr", "labelsTr"] {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        out.extend(
            names
                .into_iter()
                .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap())),
        );
    }
    out
}

#[test]
fn phantom_same_seed_same_bytes_and_a_valid_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    phantom(&a, "11");
    phantom(&b, "11");
    phantom(&c, "12");
    let (fa, fb, fc) = (files(&a), files(&b), files(&c));
    assert_eq!(fa.len(), 4);
    for ((_, x), (_, y)) in fa.iter().zip(&fb) {
        assert!(x == y, "same seed must write the same bytes");
    }
    assert!(
        fa.iter().zip(&fc).all(|((_, x), (_, y))| x != y),
        "another seed, other cases"
    );

    let ds: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("dataset.json")).unwrap()).unwrap();
    let labels = ds["labels"].as_object().unwrap();
    for (id, name) in [
        ("1", "spleen"),
        ("2", "right kidney"),
        ("3", "left kidney"),
        ("4", "gallbladder"),
        ("6", "liver"),
        ("7", "stomach"),
        ("8", "aorta"),
        ("11", "pancreas"),
    ] {
        assert_eq!(labels[id], name);
    }
    let lwi = lwi_tests::Lwi::load();
    for case in ds["training"].as_array().unwrap() {
        let image = a.join(case["image"].as_str().unwrap());
        let label = a.join(case["label"].as_str().unwrap());
        assert_eq!(lwi.read_dims(&image).unwrap(), [40, 36, 24]);
        assert_eq!(lwi.read_dims(&label).unwrap(), [40, 36, 24]);
    }
}
