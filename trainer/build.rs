//! Compiles the C++ shims against the libtorch that tch uses (the torch package of the
//! python on PATH, as with LIBTORCH_USE_PYTORCH=1), and links them. Link arguments reach
//! only this package's own test binaries, so the libtorch folder is also handed to the
//! crates that link this one (`links = "headroom_torch"`: `DEP_HEADROOM_TORCH_LIB_DIR` and
//! `DEP_HEADROOM_TORCH_CUDA`), whose build scripts call `link_args` likewise: the binary
//! finds that libtorch at run time and keeps libtorch_cuda even though nothing names it.

use std::path::PathBuf;
use std::process::Command;

fn torch_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return PathBuf::from(dir);
    }
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".to_owned());
    let out = Command::new(&python)
        .args(["-c", "import os, torch; print(os.path.dirname(torch.__file__))"])
        .output()
        .unwrap_or_else(|e| {
            panic!("running {python} to find torch failed: {e}; run scripts/setup.sh and source scripts/env.sh")
        });
    assert!(
        out.status.success(),
        "{python} cannot import torch: run scripts/setup.sh and source scripts/env.sh\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn main() {
    println!("cargo:rerun-if-changed=csrc/memory.cpp");
    println!("cargo:rerun-if-changed=csrc/autograd.cpp");
    println!("cargo:rerun-if-changed=csrc/optim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=PATH");
    let torch = torch_dir();
    let include = torch.join("include");
    let lib = torch.join("lib");
    let site = torch.parent().map(PathBuf::from).unwrap_or_default();
    let cuda_include = site.join("nvidia/cu13/include");
    let crt_include = site.join("triton/backends/nvidia/include");
    let has_cuda = lib.join("libc10_cuda.so").exists() && cuda_include.join("cuda_runtime_api.h").exists();

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/memory.cpp")
        .file("csrc/autograd.cpp")
        .file("csrc/optim.cpp")
        .std("c++17")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false);
    if has_cuda {
        build.define("HEADROOM_CUDA", None).include(&cuda_include).include(&crt_include);
    }
    build.compile("headroom_memory");

    println!("cargo:rustc-link-search=native={}", lib.display());
    if has_cuda {
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    // For the dependents' build scripts (see the header).
    println!("cargo:lib_dir={}", lib.display());
    println!("cargo:cuda={}", u8::from(has_cuda));
    link_args(&lib, has_cuda);
}

/// The run-time path to libtorch and, with CUDA, libtorch_cuda kept: without
/// --no-as-needed the linker drops it (nothing references it by name) and CUDA then
/// looks unavailable on a GPU machine. The agent's build script has the same lines.
fn link_args(lib: &std::path::Path, has_cuda: bool) {
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if has_cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
