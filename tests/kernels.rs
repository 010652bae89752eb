//! The CUDA kernels compile to PTX for every shipped preset's shapes, with no GPU needed: nvcc
//! (found as build.rs finds it) on the same translation unit the trainer embeds, for each
//! architecture the build targets. This test links nothing of CUDA, so it runs on a machine
//! without a GPU driver: `cargo test --features cuda --test kernels`.
#![cfg(feature = "cuda")]

use std::path::PathBuf;

use signal_diffusion_config::{self as config, settings::Env, Kind, Target};

fn nvcc() -> PathBuf {
    config::cuda::find_nvcc().expect(
        "a `--features cuda` build needs nvcc: run .ci/cuda-toolkit.sh and set CUDA_HOME (README)",
    )
}

#[test]
fn kernels_compile_for_every_classification_preset() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let env = Env::from_process(root.clone());
    let dir = tempfile::tempdir().unwrap();
    let mut compiled = 0;
    for entry in std::fs::read_dir(root.join("config/classification"))
        .unwrap()
        .flatten()
    {
        let path = entry.path();
        let r = config::resolve(&path, &env, Target { cuda: true })
            .unwrap_or_else(|e| panic!("{}", config::render(&e)));
        assert!(matches!(r.kind, Kind::Classification(_)));
        let sizes = config::cuda::norm_sizes(r.plan.as_ref().unwrap());
        let src = dir.path().join(format!("{}.cu", r.stem));
        let tu = config::cuda::translation_unit(&root.join("runtime/kernels"), &sizes).unwrap();
        std::fs::write(&src, tu).unwrap();
        for arch in config::cuda::PTX_ARCHS {
            let ptx = dir.path().join(format!("{}_{arch}.ptx", r.stem));
            let out = config::cuda::nvcc_ptx(&nvcc(), arch, &src, &ptx).unwrap();
            assert!(
                out.status.success(),
                "{} compute_{arch}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let text = std::fs::read_to_string(&ptx).unwrap();
            // One specialised forward and backward per GroupNorm size, plus the generic ones.
            for n in &sizes {
                assert!(
                    text.contains(&format!(".entry group_norm_fwd_{n}(")),
                    "{}",
                    r.stem
                );
                assert!(
                    text.contains(&format!(".entry group_norm_bwd_{n}(")),
                    "{}",
                    r.stem
                );
            }
            for k in [
                "group_norm_fwd_any",
                "group_norm_bwd_any",
                "grad_sq_norm",
                "adam_step",
                "modulate_fwd",
                "modulate_bwd",
                "gated_residual_fwd",
                "gated_residual_bwd",
                "gelu_tanh_fwd",
                "gelu_tanh_bwd",
                "softmax_rows_fwd",
                "softmax_rows_bwd",
            ] {
                assert!(text.contains(&format!(".entry {k}(")), "{}: no {k}", r.stem);
            }
        }
        compiled += 1;
    }
    assert!(compiled >= 8, "only {compiled} presets");
}
