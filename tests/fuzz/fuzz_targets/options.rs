//! Any text as the JSON options of the C ABI: training configuration, segmentation options,
//! phantom options. Parsed or refused, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = lwi::train::TrainConfig::from_json(text);
        let _ = lwi::pipeline::SegmentOptions::from_json(text);
        let _ = serde_json::from_str::<lwi::phantom::PhantomOptions>(text);
    }
});
