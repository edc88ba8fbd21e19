//! The `headroom` binary links the trainer, whose build script found libtorch: it sets
//! the run-time path to that libtorch and keeps libtorch_cuda (nothing names it, and
//! without it CUDA looks unavailable on a GPU machine). Link arguments do not pass from
//! a library to the binaries that link it, hence this script; the values come through
//! the trainer's `links = "headroom_torch"` metadata.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_HEADROOM_TORCH_LIB_DIR");
    println!("cargo:rerun-if-env-changed=DEP_HEADROOM_TORCH_CUDA");
    let Ok(lib) = std::env::var("DEP_HEADROOM_TORCH_LIB_DIR") else {
        panic!("the trainer's build script did not say where libtorch is");
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::env::var("DEP_HEADROOM_TORCH_CUDA").as_deref() == Ok("1") {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
