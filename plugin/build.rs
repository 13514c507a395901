// Unit-test executables link libtorch: give them an rpath to the libtorch they were built against
// (tch's own rpath does not propagate to dependents). Records libtorch's version, and compiles the
// small C++ shim over libtorch APIs that tch does not expose (csrc/).
fn main() {
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // Tests and examples of this crate must see CUDA on a GPU machine: keep libtorch_cuda linked
    // although no symbol of it is referenced (`--as-needed` would drop it).
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-L{lib},-ltorch_cuda,--as-needed");
    }
    let include = std::path::Path::new(&lib).join("../include");
    let header = include.join("torch/headeronly/version.h");
    println!("cargo:rerun-if-changed={}", header.display());
    let text = std::fs::read_to_string(&header).unwrap_or_default();
    let part = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("#define TORCH_VERSION_{name} ")))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    println!(
        "cargo:rustc-env=LWI_LIBTORCH_VERSION={}.{}.{}",
        part("MAJOR"),
        part("MINOR"),
        part("PATCH")
    );

    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    println!("cargo:rerun-if-changed=csrc/fused_norm.cpp");
    cc::Build::new()
        .cpp(true)
        .file("csrc/autocast.cpp")
        .file("csrc/fused_norm.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .warnings(false)
        .compile("lwi_torch_shim");
    dist_shim(&lib, &include);
    println!("cargo:rustc-link-lib=torch_cpu");
    println!("cargo:rustc-link-lib=c10");
    println!("cargo:rustc-link-lib=dl");
    println!("cargo:rustc-link-search=native={lib}");
}

/// csrc/dist.cpp, over libtorch's c10d: Gloo always (its headers come from the system's
/// libgloo-dev, which the wheel lacks), NCCL too when libtorch has CUDA and the CUDA headers that
/// ProcessGroupNCCL.hpp includes are installed beside it (scripts/setup-libtorch).
fn dist_shim(lib: &str, include: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc/dist.cpp");
    let mut b = cc::Build::new();
    b.cpp(true)
        .file("csrc/dist.cpp")
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .define("USE_C10D_GLOO", None)
        .warnings(false);
    let nvidia = std::path::Path::new(lib).join("../../nvidia");
    let cuda_include = nvidia.join("cu13/include");
    let nccl = std::path::Path::new(lib).join("libtorch_cuda.so").exists()
        && cuda_include.join("crt/host_config.h").exists()
        && cuda_include.join("nv/target").exists()
        && nvidia.join("nccl/include/nccl.h").exists();
    if nccl {
        b.include(&cuda_include)
            .include(nvidia.join("nccl/include"))
            .define("USE_C10D_NCCL", None)
            .define("LWI_WITH_NCCL", None);
    }
    println!(
        "cargo:rustc-env=LWI_DIST_NCCL={}",
        if nccl { "1" } else { "0" }
    );
    b.compile("lwi_dist_shim");
    if nccl {
        weaken_cuda_references();
    }
}

/// liblwi.so must load against a libtorch without CUDA (PyTorch's CPU builds), so it may not need
/// libtorch_cuda at link time. The NCCL code's few references into libtorch_cuda/libc10_cuda
/// (`c10::cuda::set_device`, `ProcessGroupNCCL`'s constructors) become weak: resolved when a CUDA
/// libtorch is loaded with liblwi (its libtorch.so needs libtorch_cuda), null otherwise — and then
/// never called (`lwi_dist_nccl_usable`).
fn weaken_cuda_references() {
    let out = std::env::var("OUT_DIR").expect("OUT_DIR");
    let archive = std::path::Path::new(&out).join("liblwi_dist_shim.a");
    let run = |cmd: &mut std::process::Command| {
        let o = cmd
            .output()
            .unwrap_or_else(|e| panic!("running {cmd:?}: {e} (binutils is needed)"));
        assert!(
            o.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let undefined = run(std::process::Command::new("nm")
        .args(["--undefined-only", "--format=just-symbols"])
        .arg(&archive));
    let cuda: Vec<&str> = undefined
        .lines()
        .filter(|s| s.starts_with("_ZN3c104cuda") || s.contains("ProcessGroupNCCL"))
        .collect();
    let mut objcopy = std::process::Command::new("objcopy");
    for s in &cuda {
        objcopy.arg(format!("--weaken-symbol={s}"));
    }
    run(objcopy.arg(&archive));
}
