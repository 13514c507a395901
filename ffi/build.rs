// liblwi.so's link line.
// - libtorch through `-ltorch` kept with `--no-as-needed` (no symbol of the wrapper is referenced, and
//   without it CUDA silently disappears): a CUDA libtorch.so needs libtorch_cuda, a CPU-only one does
//   not, so CUDA is there exactly when the libtorch loaded has it, and liblwi.so itself never needs
//   libtorch_cuda at link time (it loads against PyTorch's CPU-only builds too).
// - RUNPATH `$ORIGIN/../../torch/lib` (the installed layout: `<site-packages>/lwi/lib/liblwi.so` beside
//   `<site-packages>/torch/lib`), then the libtorch it was built against, for use in place. Installs
//   keep the first alone (host-example/cpp/CMakeLists.txt rewrites it in place, so it must come first).
// - A SONAME, so a host linked against it by path records `liblwi.so`, not the path.
// - `-z defs`: a C++ ABI mismatch is a link error, not a dlopen failure on a user's machine.
fn main() {
    let lib =
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../../torch/lib:{lib}");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,liblwi.so");
    println!("cargo:rustc-cdylib-link-arg=-L{lib}");
    println!("cargo:rustc-cdylib-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-cdylib-link-arg=-ltorch");
    println!("cargo:rustc-cdylib-link-arg=-Wl,--as-needed");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,defs");
}
