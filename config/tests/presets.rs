//! Every shipped preset resolves; diffusion presets validate fully and stop only at the
//! "not yet supported" gate; parameter counts match the reference's.

use std::path::{Path, PathBuf};

use signal_diffusion_config::{self as config, settings::Env, Kind, Target};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn env() -> Env {
    Env::isolated(root())
}

fn presets(kind: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("config").join(kind))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| p.strip_prefix(root()).unwrap().to_path_buf())
        .collect();
    v.sort();
    v
}

#[test]
fn classification_presets_compile() {
    for p in presets("classification") {
        if let Err(e) = config::resolve(&p, &env(), Target::default()) {
            panic!("{}:\n{}", p.display(), config::render(&e));
        }
    }
}

#[test]
fn diffusion_presets_build_or_stop_only_at_the_support_gate() {
    let mut built = vec![];
    for p in presets("diffusion") {
        match config::resolve(&p, &env(), Target::default()) {
            Ok(_) => built.push(p.file_stem().unwrap().to_string_lossy().into_owned()),
            Err(e) => {
                // Latent-space and non-DiT presets: one error, at the gate.
                let errors: Vec<_> = e.diagnostics.errors().collect();
                assert_eq!(errors.len(), 1, "{}:\n{}", p.display(), config::render(&e));
                assert!(
                    errors[0].message.starts_with("not yet supported:"),
                    "{}",
                    config::render(&e)
                );
            }
        }
    }
    assert_eq!(
        built,
        [
            "baseline",
            "dit-timeseries",
            "hourglass-db-iq",
            "hourglass-db-only",
            "hourglass-db-polar",
            "hourglass-timeseries",
            "localmamba-timeseries",
            "quickstart"
        ]
    );
}

fn params(p: &str) -> u64 {
    let e = env();
    // Resolution stops at the support gate for diffusion; read the plan from a resolution
    // that skips the gate by resolving the schema directly.
    match config::resolve(Path::new(p), &e, Target::default()) {
        Ok(r) => r.plan.unwrap().params,
        Err(err) => panic!("{}", config::render(&err)),
    }
}

#[test]
fn cnn_parameter_counts_equal_the_reference() {
    assert_eq!(params("config/classification/baseline.toml"), 5_249_477);
    assert_eq!(
        params("config/classification/baseline-db-iq.toml"),
        1_562_373
    );
    assert_eq!(
        params("config/classification/test_gender_health_age.toml"),
        1_560_773
    );
    assert_eq!(
        params("config/classification/baseline-timeseries.toml"),
        1_237_477
    );
}

#[test]
fn dit_parameter_counts_equal_the_reference() {
    let r = config::plan_unchecked(Path::new("config/diffusion/baseline.toml"), &env()).unwrap();
    let Kind::Diffusion(_) = &r.config.kind else {
        panic!()
    };
    let plan = r.plan.unwrap();
    assert_eq!(plan.params, 322_876_812);
    let block0: u64 = plan
        .layers
        .iter()
        .filter(|l| l.name == "transformer_blocks.0.norm1.emb")
        .map(|l| l.params)
        .sum();
    assert_eq!(block0, 2_777_472);
    // The CPU benchmark config of issue #6 (benches/dit_cpu.toml; diffusers builds the same).
    let bench =
        config::resolve(Path::new("benches/dit_cpu.toml"), &env(), Target::default()).unwrap();
    assert_eq!(bench.plan.unwrap().params, 20_050_572);
}

#[test]
fn hourglass_and_localmamba_parameter_counts_equal_the_reference() {
    // spec/reference/hourglass-localmamba.md, counted from the reference's own model.
    for db in ["db-only", "db-iq", "db-polar"] {
        assert_eq!(
            params(&format!("config/diffusion/hourglass-{db}.toml")),
            5_967_706
        );
    }
    assert_eq!(
        params("config/diffusion/hourglass-timeseries.toml"),
        21_107_142
    );
    // localmamba-db-only trains on latents (refused until the VAE lands); its plan is the
    // reference's count all the same.
    let lm = config::plan_unchecked(
        Path::new("config/diffusion/localmamba-db-only.toml"),
        &env(),
    )
    .unwrap();
    assert_eq!(lm.plan.unwrap().params, 10_811_666);
    assert_eq!(
        params("config/diffusion/localmamba-timeseries.toml"),
        10_795_020
    );
}

#[test]
fn transformer_layers_have_the_reference_size() {
    // The reference's TransformerEncoderLayer(d=256, heads=4, ff=512): 527,104 parameters.
    let r = config::resolve(
        Path::new("config/classification/transformer-timeseries.toml"),
        &env(),
        Target::default(),
    )
    .unwrap();
    let layer0: u64 = r
        .plan
        .unwrap()
        .layers
        .iter()
        .filter(|l| l.name.starts_with("backbone.layers.0."))
        .map(|l| l.params)
        .sum();
    assert_eq!(layer0, 527_104);
}

/// `dataset.name` naming a settings dataset points a diffusion trainer at its spectrograms, or
/// at its time series when `data.data_type = "timeseries"` (the classification trainer's rule).
#[test]
fn named_datasets_resolve_to_their_spectrograms_or_time_series() {
    let set = [("dataset.name".to_string(), "math".to_string())];
    for (preset, timeseries) in [
        ("config/diffusion/quickstart.toml", false),
        ("config/diffusion/dit-timeseries.toml", true),
        ("config/classification/baseline-timeseries.toml", true),
    ] {
        let r = config::resolve_with(Path::new(preset), &env(), Target::default(), &set).unwrap();
        let math = &r.config.settings.datasets["math"];
        let want = match timeseries {
            true => &math.timeseries_output,
            false => &math.output,
        };
        let (path, named) = match &r.config.kind {
            Kind::Diffusion(d) => (&d.dataset.path, &d.dataset.named),
            Kind::Classification(c) => (&c.dataset.path, &c.dataset.named),
        };
        assert_eq!(path, want, "{preset}");
        assert_eq!(named.as_deref(), Some("math"));
    }
}
