//! `sigdiff validate` and `sigdiff plan`: the build's diagnostics without building.

use std::path::Path;
use std::process::Command;

fn sigdiff(args: &[&str]) -> (bool, String, String) {
    sigdiff_with(&[], args)
}

/// `sigdiff` with environment variables `vars` set.
fn sigdiff_with(vars: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sigdiff"))
        .args(args)
        .envs(vars.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn validate_reports_mistakes_with_locations_and_exit_1() {
    let (ok, _, err) = sigdiff(&[
        "validate",
        "config/classification/quickstart.toml",
        "macros/tests/compile_fail/typo_in_key.toml",
    ]);
    assert!(!ok);
    assert!(
        err.contains(
            "macros/tests/compile_fail/typo_in_key.toml:18:1: error: unknown key `optimizer.learnig_rate`"
        ),
        "{err}"
    );
    assert!(err.contains("1 of 2 config(s) failed"), "{err}");
}

#[test]
fn validate_accepts_configs_whose_trainer_is_not_built_yet() {
    // The quickstart asking for VAE tiling in pixel space: valid, but not built.
    let quickstart = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/diffusion/quickstart.toml"),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("tiling.toml");
    std::fs::write(
        &config,
        quickstart.replace("sample_size = 64", "sample_size = 64\nvae_tiling = true"),
    )
    .unwrap();
    let (ok, out, err) = sigdiff(&["validate", config.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("tiling.toml: valid; building a trainer from it stops with")
            && out.contains("not yet supported: VAE tiling"),
        "{out}"
    );
}

/// A latent preset validates against the VAE in the Hugging Face cache the environment names
/// (here one holding the SD 3.5 VAE's config.json), and its plan shows the latent shapes; with
/// the cache elsewhere the VAE is missing, said at the key with the paths searched.
#[test]
fn latent_presets_validate_against_the_hugging_face_cache_of_the_environment() {
    let preset = "config/diffusion/dit-db-only.toml";
    let hub = [("HF_HUB_CACHE", "tests/fixtures/hub")];
    let (ok, out, err) = sigdiff_with(&hub, &["plan", preset]);
    assert!(ok, "{err}");
    assert!(
        out.contains("images [3, 256, 256] -> latents [16, 32, 32]"),
        "{out}"
    );
    let (ok, _, err) = sigdiff_with(&[("HF_HUB_CACHE", "/nonexistent")], &["validate", preset]);
    assert!(!ok);
    assert!(
        err.contains("dit-db-only.toml:25:7: error: no VAE `stabilityai/stable-diffusion-3.5-medium` on this machine")
            && err.contains("/nonexistent/models--stabilityai--stable-diffusion-3.5-medium/refs/main"),
        "{err}"
    );
}

#[test]
fn plan_prints_the_dit_baseline_with_the_reference_parameter_count() {
    let (ok, out, err) = sigdiff(&["plan", "config/diffusion/baseline.toml"]);
    assert!(ok, "{err}");
    assert!(out.contains("total parameters 322,876,812"), "{out}");
}

/// `SIGNAL_DIFFUSION_MAX_CPU_ISA` takes `avx2` or `avx512`; anything else stops the binary with
/// an error naming the variable and its values, before any work.
#[test]
fn a_bad_cpu_isa_cap_is_an_error_naming_the_variable() {
    let plan = ["plan", "config/diffusion/quickstart.toml"];
    for ok in ["avx2", "AVX512"] {
        let (success, _, err) = sigdiff_with(&[("SIGNAL_DIFFUSION_MAX_CPU_ISA", ok)], &plan);
        assert!(success, "{ok}: {err}");
    }
    let (success, _, err) = sigdiff_with(&[("SIGNAL_DIFFUSION_MAX_CPU_ISA", "sse4")], &plan);
    assert!(!success);
    assert!(
        err.contains("SIGNAL_DIFFUSION_MAX_CPU_ISA is \"sse4\": expected `avx2`"),
        "{err}"
    );
}
