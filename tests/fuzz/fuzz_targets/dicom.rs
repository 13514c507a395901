//! Any bytes as a DICOM file, read as `lwi info` and `lwi convert` read one (the structural walk,
//! dicom-rs, the header checks, pixel decoding): a volume or an error, never a panic, abort, stack
//! overflow or runaway allocation. The reader takes paths, so each input is written to a file first.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("lwi-fuzz-dicom-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("input.dcm");
    if std::fs::write(&path, data).is_ok() {
        let _ = lwi::io::dicom::list(&path);
        let _ = lwi::io::dicom::read(&path, None);
    }
});
