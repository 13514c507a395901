//! Any text as a model file's `"lwi"` metadata document: parsed and checked against every ceiling
//! and against the tensors it implies (as `lwi_model_load` does before building anything), or
//! refused; never a panic, an abort or an allocation sized by the input.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(meta) = serde_json::from_str::<lwi::model_file::ModelMetadata>(text) else {
        return;
    };
    if meta.validate().is_ok() {
        let _ = meta.arch.values();
        let _ = meta
            .arch
            .check_shapes(meta.order_classes, &Default::default());
    }
});
