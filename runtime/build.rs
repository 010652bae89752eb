//! Under `--features cuda`: where the linker finds the CUDA runtime. Candle's statically built
//! kernels (candle-kernels' libmoe) link `libcudart` without saying where it is, and with the
//! other CUDA libraries loaded at run time (cudarc's dynamic loading) no other crate says so
//! either. The search path propagates to every binary that links this crate; the top-level
//! build.rs adds the rpath that finds the library beside the binary at run time.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rerun-if-env-changed=CUDA_PATH");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let Some(root) = signal_diffusion_config::cuda::find_nvcc()
        .and_then(|nvcc| Some(nvcc.parent()?.parent()?.to_path_buf()))
    else {
        println!("cargo::warning=nvcc not found (NVCC, CUDA_HOME/bin, PATH): the CUDA runtime (libcudart) may not link");
        return;
    };
    for dir in ["lib", "lib64", "targets/x86_64-linux/lib"] {
        if root.join(dir).join("libcudart.so").exists() {
            println!(
                "cargo::rustc-link-search=native={}",
                root.join(dir).display()
            );
        }
    }
}
