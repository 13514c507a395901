// liblwi.so: an rpath to the libtorch it was built against; libtorch_cuda linked even though no
// symbol of it is referenced (else CUDA silently disappears); `-z defs` so a C++ ABI mismatch is a
// link error, not a dlopen failure on a user's machine.
fn main() {
    let lib =
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-cdylib-link-arg=-L{lib}");
    println!("cargo:rustc-cdylib-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-cdylib-link-arg=-ltorch");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-cdylib-link-arg=-ltorch_cuda");
    }
    println!("cargo:rustc-cdylib-link-arg=-Wl,--as-needed");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,defs");
}
