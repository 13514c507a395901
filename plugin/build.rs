// Unit-test executables link libtorch: give them an rpath to the libtorch they were built against
// (tch's own rpath does not propagate to dependents). Also records that libtorch's version.
fn main() {
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else { return };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let header = std::path::Path::new(&lib).join("../include/torch/headeronly/version.h");
    println!("cargo:rerun-if-changed={}", header.display());
    let text = std::fs::read_to_string(&header).unwrap_or_default();
    let part = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("#define TORCH_VERSION_{name} ")))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    println!("cargo:rustc-env=LWI_LIBTORCH_VERSION={}.{}.{}", part("MAJOR"), part("MINOR"), part("PATCH"));
}
