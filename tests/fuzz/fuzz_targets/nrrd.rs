//! Any bytes as a `.nrrd` file: a volume or an error, never a panic, abort or runaway allocation.
//! Detached data files named by the header resolve under a directory that does not exist.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = lwi::io::nrrd::from_bytes(
        std::path::Path::new("/nonexistent/fuzz.nrrd"),
        data.to_vec(),
    );
});
