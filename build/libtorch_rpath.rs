// Shared by the build scripts of every package whose binaries link libtorch (included with `include!`).
// torch-sys tells direct dependents where libtorch's `lib/` is (DEP_TCH_LIBTORCH_LIB); embedding it as an
// rpath lets `iro` and the test binaries start without LD_LIBRARY_PATH.
//
// A GPU install must also force-link libtorch_cuda.so: the linker's --as-needed drops it (nothing references
// it by symbol) and CUDA then silently reports unavailable. The slim CPU install must not, or the binary
// fails at start looking for CUDA libraries it does not have. scripts/setup.sh leaves `.deps/cuda-link`
// behind for a GPU install; IRO_LINK_CUDA=1/0 overrides.
fn emit_libtorch_link_args() {
    println!("cargo:rerun-if-env-changed=IRO_LINK_CUDA");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=torch-sys did not report libtorch's lib dir; binaries will need LD_LIBRARY_PATH");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // LIBTORCH is `.deps/libtorch` (set by .cargo/config.toml); the marker lies beside it.
    let libtorch = std::env::var("LIBTORCH").unwrap_or_default();
    let marker = std::path::Path::new(&libtorch).with_file_name("cuda-link");
    println!("cargo:rerun-if-changed={}", marker.display());
    let link_cuda = match std::env::var("IRO_LINK_CUDA").as_deref() {
        Ok("1") => true,
        Ok(_) => false,
        Err(_) => marker.exists(),
    };
    let cuda = std::path::Path::new(&lib).join("libtorch_cuda.so");
    if link_cuda && cuda.exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg={}", cuda.display());
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
