//! Compiles the config named by `SD_CONFIG` into the `train` binary.
//!
//! SD_CONFIG (default: the classification quickstart) is resolved and validated by the config
//! crate; any mistake fails the build with `file:line:col` diagnostics and nothing else noisy.
//! The generated trainer goes to `$OUT_DIR/pipeline.rs` (rewritten only when it changes, so an
//! unchanged config rebuilds nothing). `target/<profile>/train-<stem>` is made a symbolic link to
//! `train` (it dangles until the link step writes `train`); links left by earlier builds of other
//! configs are removed, so a `train-<stem>` always runs the config it is named after. Two presets
//! with the same stem share the name: the last build wins (`train-<stem> --print-config` shows
//! which file it was compiled from).

use std::path::{Path, PathBuf};

use signal_diffusion_config::{self as config, settings::Env, Target};

const DEFAULT_CONFIG: &str = "config/classification/quickstart.toml";

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    println!("cargo::rerun-if-env-changed=SD_CONFIG");
    println!("cargo::rerun-if-env-changed=SIGNAL_DIFFUSION_CONFIG");
    // Where pretrained models are found (config/src/pretrained.rs).
    for var in [
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "HOME",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed=build.rs");

    let chosen = std::env::var("SD_CONFIG").ok().filter(|s| !s.is_empty());
    let config_path = PathBuf::from(chosen.as_deref().unwrap_or(DEFAULT_CONFIG));
    let target = Target {
        cuda: std::env::var_os("CARGO_FEATURE_CUDA").is_some(),
    };
    let env = Env::from_process(root.clone());

    match config::resolve(&config_path, &env, target) {
        Ok(resolved) => {
            for p in resolved.sources.paths() {
                println!("cargo::rerun-if-changed={}", p.display());
            }
            for w in &resolved.warnings {
                for line in w.lines() {
                    println!("cargo::warning={line}");
                }
            }
            let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
            let cuda = match (target.cuda, &resolved.plan) {
                (true, Some(plan)) => Some(compile_kernels(
                    &root,
                    &out,
                    &config::cuda::KernelSizes::of(plan),
                )),
                _ => None,
            };
            if target.cuda {
                link_cuda_runtime();
            }
            let code = config::codegen::generate(&resolved, cuda.as_ref());
            write_if_changed(&out.join("pipeline.rs"), &code);
            if let Some(profile_dir) = out.ancestors().nth(3) {
                link_named_trainer(profile_dir, &resolved.stem);
            }
        }
        Err(err) => {
            // Re-run when the files that failed change (the chain may be partly read).
            for p in err.sources.paths() {
                println!("cargo::rerun-if-changed={}", p.display());
            }
            if let Some(dir) = config_path.parent() {
                println!("cargo::rerun-if-changed={}", root.join(dir).display());
            }
            for line in config::render(&err).lines() {
                println!("cargo::error={line}");
            }
        }
    }
}

/// With `--features cuda`: the kernel sources, after the header of the model's shapes, compiled
/// to PTX by nvcc for each architecture in `config::cuda::PTX_ARCHS`. Without nvcc (or with
/// SD_FORCE_NVRTC=1) nothing is compiled here and the trainer compiles them with NVRTC when it
/// starts; a kernel that nvcc rejects fails the build.
fn compile_kernels(
    root: &Path,
    out: &Path,
    sizes: &config::cuda::KernelSizes,
) -> config::cuda::CudaBuild {
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "SD_FORCE_NVRTC"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let kernels = root.join("runtime/kernels");
    println!("cargo::rerun-if-changed={}", kernels.display());
    let tu = config::cuda::translation_unit(&kernels, sizes).expect("runtime/kernels is readable");
    let source = out.join("kernels.cu");
    write_if_changed(&source, &tu);
    let ptx = compile_ptx(&source);
    config::cuda::CudaBuild {
        source: config::cuda::KernelText::File(source),
        ptx,
    }
}

fn compile_ptx(source: &Path) -> Vec<(u32, PathBuf)> {
    if std::env::var("SD_FORCE_NVRTC").is_ok_and(|v| v == "1") {
        println!("cargo::warning=SD_FORCE_NVRTC=1: the CUDA kernels will be compiled by NVRTC at start-up");
        return vec![];
    }
    let Some(nvcc) = config::cuda::find_nvcc() else {
        println!("cargo::warning=nvcc not found (NVCC, CUDA_HOME/bin, PATH): the CUDA kernels will be compiled by NVRTC at start-up");
        return vec![];
    };
    let mut ptx = vec![];
    for arch in config::cuda::PTX_ARCHS {
        let path = source.with_file_name(format!("kernels_compute_{arch}.ptx"));
        let result = config::cuda::nvcc_ptx(&nvcc, arch, source, &path);
        match result {
            Ok(o) if o.status.success() => ptx.push((arch, path)),
            Ok(o) => {
                println!(
                    "cargo::error=nvcc failed on the CUDA kernels (compute_{arch}, source {}):",
                    source.display()
                );
                for line in String::from_utf8_lossy(&o.stderr).lines() {
                    println!("cargo::error={line}");
                }
                return vec![];
            }
            Err(e) => {
                println!("cargo::error=cannot run {}: {e}", nvcc.display());
                return vec![];
            }
        }
    }
    ptx
}

fn write_if_changed(path: &Path, content: &str) {
    if std::fs::read_to_string(path).ok().as_deref() != Some(content) {
        std::fs::write(path, content).expect("OUT_DIR is writable");
    }
}

/// `train-<stem>` -> `train`, replacing links that name other configs.
fn link_named_trainer(profile_dir: &Path, stem: &str) {
    let exe = std::env::consts::EXE_SUFFIX;
    let Ok(entries) = std::fs::read_dir(profile_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_link = e.file_type().map(|t| t.is_symlink()).unwrap_or(false);
        if is_link && name.starts_with("train-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let link = profile_dir.join(format!("train-{stem}{exe}"));
    #[cfg(unix)]
    {
        if let Err(e) = std::os::unix::fs::symlink(format!("train{exe}"), &link) {
            println!("cargo::warning=could not link {}: {e}", link.display());
        }
    }
    #[cfg(not(unix))]
    println!("cargo::warning=train-{stem} is only linked on unix; run `train` directly");
}

/// A `--features cuda` binary opens the CUDA libraries when it first needs them (cudarc's
/// dynamic loading), so it starts where there is no GPU or driver. The exception is the CUDA
/// runtime, which Candle's statically built kernels link (runtime/build.rs says where to find it
/// at link time): at run time it is found beside the binary (benches/gpu_build.sh copies it
/// there) or on LD_LIBRARY_PATH.
fn link_cuda_runtime() {
    println!("cargo::rustc-link-arg-bins=-Wl,-rpath,$ORIGIN");
}
