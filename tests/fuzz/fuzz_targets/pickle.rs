//! Any bytes as an nnU-Net plans pickle and as a PyTorch checkpoint's `data.pkl`: values or an
//! error, never a panic, abort, stack overflow or runaway allocation, and no global outside the
//! allow-list of the file's kind accepted.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = lwi::model_file::nnunet_plans::from_bytes(std::path::Path::new("fuzz.pkl"), data);
    let _ = lwi::model_file::pickle::read(data, 0, &lwi::model_file::import::CHECKPOINT);
});
