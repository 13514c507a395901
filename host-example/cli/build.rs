// What the CLI knows of the C ABI comes from the checked-in header (itself generated from ffi/), so
// the two can never drift apart silently: the ABI version, every enum value (`LWI_STATUS_*`,
// `LWI_DTYPE_*`, `LWI_SPACE_*`) as a Rust constant, and the `LwiProgress` struct, in
// `$OUT_DIR/abi.rs`.
use std::fmt::Write;

fn main() {
    let header = concat!(env!("CARGO_MANIFEST_DIR"), "/../../include/lwi.h");
    println!("cargo:rerun-if-changed={header}");
    let text = std::fs::read_to_string(header).expect("include/lwi.h (run `make header`)");
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("#define LWI_ABI_VERSION "))
        .expect("LWI_ABI_VERSION in include/lwi.h")
        .trim();
    let mut abi = format!("pub const ABI_VERSION: u32 = {version};\n");
    let mut dtypes: Vec<(i32, String)> = Vec::new();
    for line in text.lines() {
        // `  LWI_STATUS_OK = 0,`
        let Some((name, value)) = line.trim().trim_end_matches(',').split_once(" = ") else {
            continue;
        };
        let (Some(name), Ok(value)) = (name.strip_prefix("LWI_"), value.parse::<i32>()) else {
            continue;
        };
        writeln!(abi, "pub const {name}: i32 = {value};").unwrap();
        if let Some(dtype) = name.strip_prefix("DTYPE_") {
            dtypes.push((value, dtype.to_lowercase()));
        }
    }
    dtypes.sort();
    assert!(
        dtypes.iter().enumerate().all(|(i, d)| d.0 == i as i32),
        "LWI_DTYPE_* values run 0, 1, 2, …"
    );
    // The bit width closes each type's name (uint8 … float64).
    let bytes = |name: &str| {
        name.trim_start_matches(char::is_alphabetic)
            .parse::<usize>()
            .unwrap()
            / 8
    };
    let names: Vec<String> = dtypes.iter().map(|d| format!("{:?}", d.1)).collect();
    let sizes: Vec<String> = dtypes.iter().map(|d| bytes(&d.1).to_string()).collect();
    writeln!(
        abi,
        "pub const DTYPE_NAMES: [&str; {}] = [{}];",
        names.len(),
        names.join(", ")
    )
    .unwrap();
    writeln!(
        abi,
        "pub const DTYPE_SIZES: [usize; {}] = [{}];",
        sizes.len(),
        sizes.join(", ")
    )
    .unwrap();
    abi.push_str(&progress_struct(&text));
    let out = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("abi.rs");
    std::fs::write(out, abi).expect("write abi.rs");
}

/// `typedef struct LwiProgress { … }` of the header as a `#[repr(C)]` Rust struct, field for field.
fn progress_struct(header: &str) -> String {
    let body = header
        .split_once("typedef struct LwiProgress {")
        .and_then(|(_, rest)| rest.split_once("} LwiProgress;"))
        .expect("typedef struct LwiProgress in include/lwi.h")
        .0;
    let mut out = String::from("#[repr(C)]\npub struct LwiProgress {\n");
    for field in body.lines().map(str::trim) {
        if field.is_empty() || field.starts_with("//") {
            continue;
        }
        // `uint64_t done;`, `const char *stage;`
        let (c_type, name) = field
            .trim_end_matches(';')
            .rsplit_once([' ', '*'])
            .expect("a C field declaration");
        let rust = match c_type.trim() {
            "uint32_t" => "u32",
            "int32_t" => "i32",
            "uint64_t" => "u64",
            "int64_t" => "i64",
            "double" => "f64",
            "const char" => "*const std::ffi::c_char",
            other => panic!("LwiProgress field {name}: C type {other:?} has no Rust type here"),
        };
        writeln!(out, "    pub {name}: {rust},").unwrap();
    }
    out + "}\n"
}
