//! The CUDA kernels compile to PTX for every shipped classification and DiT preset's shapes, with no GPU needed: nvcc
//! (found as build.rs finds it) on the same translation unit the trainer embeds, for each
//! architecture the build targets. This test links nothing of CUDA, so it runs on a machine
//! without a GPU driver: `cargo test --features cuda --test integration kernels::`.
#![cfg(feature = "cuda")]

use std::path::PathBuf;

use signal_diffusion_config::{self as config, settings::Env, Kind, Target};

fn nvcc() -> PathBuf {
    config::cuda::find_nvcc().expect(
        "a `--features cuda` build needs nvcc: run .ci/cuda-toolkit.sh and set CUDA_HOME (README)",
    )
}

/// Every classification preset, and every DiT preset (planned without asking whether this build
/// trains it), with the sizes of its shape plan.
fn presets(root: &std::path::Path) -> Vec<(String, config::cuda::KernelSizes)> {
    let env = Env::from_process(root.to_path_buf());
    let mut found = vec![];
    for kind in ["classification", "diffusion"] {
        for entry in std::fs::read_dir(root.join("config").join(kind))
            .unwrap()
            .flatten()
        {
            let path = entry.path();
            let r = match kind {
                "classification" => config::resolve(&path, &env, Target { cuda: true }),
                _ => config::plan_unchecked(&path, &env),
            }
            .unwrap_or_else(|e| panic!("{}", config::render(&e)));
            assert!(kind == "diffusion" || matches!(r.config.kind, Kind::Classification(_)));
            // Models without a plan (hourglass, LocalMamba, SD) have no trainer, so no kernels.
            let Some(plan) = r.plan.as_ref() else {
                continue;
            };
            if kind == "classification" || plan.model == "dit" {
                found.push((r.stem.clone(), config::cuda::KernelSizes::of(plan)));
            }
        }
    }
    found
}

#[test]
fn kernels_compile_for_every_classification_and_dit_preset() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let presets = presets(&root);
    for (stem, sizes) in &presets {
        let src = dir.path().join(format!("{stem}.cu"));
        let tu = config::cuda::translation_unit(&root.join("runtime/kernels"), sizes).unwrap();
        std::fs::write(&src, tu).unwrap();
        for arch in config::cuda::PTX_ARCHS {
            let ptx = dir.path().join(format!("{stem}_{arch}.ptx"));
            let out = config::cuda::nvcc_ptx(&nvcc(), arch, &src, &ptx).unwrap();
            assert!(
                out.status.success(),
                "{stem} compute_{arch}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = std::fs::read_to_string(&ptx).unwrap();
            // A specialised forward and backward per listed size, plus the generic ones.
            let specialised = [
                ("group_norm", &sizes.norm),
                ("modulate", &sizes.widths),
                ("softmax_rows", &sizes.tokens),
            ];
            for (kernel, list) in specialised {
                for suffix in list.iter().map(|n| n.to_string()).chain(["any".into()]) {
                    for pass in ["fwd", "bwd"] {
                        let entry = format!(".entry {kernel}_{pass}_{suffix}(");
                        assert!(text.contains(&entry), "{stem}: no {entry}");
                    }
                }
            }
            for k in [
                "grad_sq_norm",
                "adam_step",
                "gated_residual_fwd",
                "gated_residual_bwd",
                "gelu_tanh_fwd",
                "gelu_tanh_bwd",
                "ema_update",
                "weighted_mse_fwd",
                "weighted_mse_bwd",
            ] {
                assert!(text.contains(&format!(".entry {k}(")), "{stem}: no {k}");
            }
        }
    }
    let dits = presets.iter().filter(|(_, s)| !s.widths.is_empty()).count();
    assert!(
        presets.len() >= 12 && dits >= 4,
        "{} presets, {dits} DiT",
        presets.len()
    );
}
