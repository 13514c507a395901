//! Any bytes as a `.nii` / `.nii.gz` file: a volume or an error, never a panic, abort or runaway allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = lwi::io::nifti::from_bytes(std::path::Path::new("fuzz.nii"), data.to_vec());
});
