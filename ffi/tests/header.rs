//! include/lwi.h is generated from this crate by cbindgen and checked in. This test regenerates it
//! and fails on any difference; `LWI_UPDATE_HEADER=1` (make header) writes the new one instead.

#[test]
fn checked_in_header_is_current() {
    let crate_dir = env!("CARGO_MANIFEST_DIR");
    let config =
        cbindgen::Config::from_file(format!("{crate_dir}/cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let path = format!("{crate_dir}/../include/lwi.h");
    if std::env::var_os("LWI_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &generated).expect("write include/lwi.h");
        return;
    }
    let checked_in = std::fs::read(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "include/lwi.h is stale: run `make header` and commit it. Generated:\n{}",
        String::from_utf8_lossy(&generated)
    );
}
