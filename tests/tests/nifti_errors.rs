//! Corrupt and hostile NIfTI files: a status and a message naming the file, never a crash, and
//! never an allocation larger than the file could hold.

use lwi_tests::{FORMAT, IO, Lwi, UNSUPPORTED};
use std::path::{Path, PathBuf};

/// A valid little volume written by lwi itself (a phantom), as raw NIfTI bytes.
fn valid_nii(dir: &Path) -> Vec<u8> {
    let out = lwi_tests::lwi_cli(&[
        "phantom",
        "--out",
        dir.join("ph").to_str().unwrap(),
        "--cases",
        "1",
        "--size",
        "16,16,12",
    ]);
    assert!(out.status.success());
    let nii = dir.join("plain.nii");
    Lwi::load()
        .convert(&dir.join("ph/imagesTr/phantom_000.nii.gz"), &nii)
        .unwrap();
    std::fs::read(nii).unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn expect_failure(path: &Path, status: i32, words: &str) {
    let err = Lwi::load().read_dims(path).expect_err("must be refused");
    assert_eq!(err.status, status, "{}", err.message);
    assert!(
        err.message.contains(words),
        "'{}' should say '{words}'",
        err.message
    );
    assert!(
        err.message
            .contains(path.file_name().unwrap().to_str().unwrap()),
        "names the file: {}",
        err.message
    );
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn truncated_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let nii = valid_nii(dir.path());
    let p = write(dir.path(), "cut.nii", &nii[..nii.len() - 100]);
    expect_failure(&p, FORMAT, "truncated");
    let gz = gzip(&nii);
    let p = write(dir.path(), "cut.nii.gz", &gz[..gz.len() / 2]);
    expect_failure(&p, FORMAT, "truncated");
    let p = write(dir.path(), "header-only.nii", &nii[..200]);
    expect_failure(&p, FORMAT, "truncated");
}

#[test]
fn content_decides_gzip_not_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let nii = valid_nii(dir.path());
    let p = write(dir.path(), "really-gzip.nii", &gzip(&nii));
    assert_eq!(Lwi::load().read_dims(&p).unwrap(), [16, 16, 12]);
    let p = write(dir.path(), "not-gzip.nii.gz", &nii);
    assert_eq!(Lwi::load().read_dims(&p).unwrap(), [16, 16, 12]);
}

#[test]
fn absurd_dimensions_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let mut nii = valid_nii(dir.path());
    for i in 1..=3 {
        nii[40 + 2 * i..42 + 2 * i].copy_from_slice(&30000i16.to_le_bytes());
    }
    // beyond the ceiling of voxels a volume may hold, whatever the file holds
    let p = write(dir.path(), "huge.nii", &nii);
    expect_failure(&p, FORMAT, "2^30");
    let p = write(dir.path(), "huge.nii.gz", &gzip(&nii));
    expect_failure(&p, FORMAT, "2^30");
    // within the ceiling, but more than the file holds
    for i in 1..=3 {
        nii[40 + 2 * i..42 + 2 * i].copy_from_slice(&1000i16.to_le_bytes());
    }
    let p = write(dir.path(), "big.nii", &nii);
    expect_failure(&p, FORMAT, "truncated");
    let p = write(dir.path(), "big.nii.gz", &gzip(&nii));
    expect_failure(&p, FORMAT, "could hold at most");
    nii[42..44].copy_from_slice(&(-5i16).to_le_bytes());
    let p = write(dir.path(), "negative.nii", &nii);
    expect_failure(&p, FORMAT, "dim[1] is -5");
}

#[test]
fn non_finite_geometry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut nii = valid_nii(dir.path());
    nii[280..284].copy_from_slice(&f32::NAN.to_le_bytes()); // srow_x[0], sform_code is 2
    let p = write(dir.path(), "nan.nii", &nii);
    expect_failure(&p, FORMAT, "non-finite");
}

#[test]
fn other_datatypes_and_magic_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut nii = valid_nii(dir.path());
    nii[70..72].copy_from_slice(&32i16.to_le_bytes()); // complex64
    let p = write(dir.path(), "complex.nii", &nii);
    expect_failure(&p, UNSUPPORTED, "Complex64");
    nii[70..72].copy_from_slice(&4i16.to_le_bytes());
    nii[344..348].copy_from_slice(b"ni1\0");
    let p = write(dir.path(), "pair.nii", &nii);
    expect_failure(&p, UNSUPPORTED, "header-only");
    let p = write(dir.path(), "empty.nii", b"");
    expect_failure(&p, FORMAT, "not a NIfTI");
    expect_failure(&dir.path().join("absent.nii"), IO, "No such file");
}

#[test]
fn a_failed_conversion_leaves_no_file_behind() {
    let dir = tempfile::tempdir().unwrap();
    let nii = valid_nii(dir.path());
    let src = write(dir.path(), "cut.nii", &nii[..nii.len() - 1]);
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    assert!(
        Lwi::load()
            .convert(&src, &out_dir.join("x.nii.gz"))
            .is_err()
    );
    assert_eq!(
        std::fs::read_dir(&out_dir).unwrap().count(),
        0,
        "no output and no temporary file"
    );
    // An existing output is replaced whole or not at all.
    let good = write(dir.path(), "good.nii", &nii);
    let target = out_dir.join("y.nrrd");
    Lwi::load().convert(&good, &target).unwrap();
    let before = std::fs::read(&target).unwrap();
    assert!(Lwi::load().convert(&src, &target).is_err());
    assert_eq!(std::fs::read(&target).unwrap(), before);
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 1);
}
