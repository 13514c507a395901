// The ABI version the CLI speaks is the one in the checked-in header (itself generated from ffi/),
// so the two can never drift apart silently.
fn main() {
    let header = concat!(env!("CARGO_MANIFEST_DIR"), "/../../include/lwi.h");
    println!("cargo:rerun-if-changed={header}");
    let text = std::fs::read_to_string(header).expect("include/lwi.h (run `make header`)");
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("#define LWI_ABI_VERSION "))
        .expect("LWI_ABI_VERSION in include/lwi.h")
        .trim();
    println!("cargo:rustc-env=LWI_ABI_VERSION={version}");
}
