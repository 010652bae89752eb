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

/// The project, with a Hugging Face cache holding the SD 3.5 VAE's published configuration.
fn env() -> Env {
    let mut env = Env::isolated(root());
    env.hub_cache = Some(root().join("tests/fixtures/hub"));
    env
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
            "dit-caption",
            "dit-db-iq",
            "dit-db-only",
            "dit-db-polar",
            "dit-timeseries",
            "hourglass-db-iq",
            "hourglass-db-only",
            "hourglass-db-polar",
            "hourglass-timeseries",
            "localmamba-db-only",
            "localmamba-timeseries",
            "quickstart",
            "sd15-lora-db-only-tiny",
            "sd15-lora-db-only",
            "sd35-db-iq",
            "sd35-db-only-tiny",
            "sd35-db-only",
            "sd35-db-polar",
            "sd35-lora-db-only-tiny"
        ]
    );
}

/// `preset` with its text edited by `edit`, resolved from a temporary file (`tag` names it).
fn resolve_edited(
    preset: &str,
    tag: &str,
    edit: impl FnOnce(String) -> String,
) -> Result<config::Resolved, config::diag::ConfigError> {
    let text = edit(std::fs::read_to_string(root().join(preset)).unwrap());
    let path = std::env::temp_dir().join(format!("{tag}-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let r = config::resolve(&path, &env(), Target::default());
    std::fs::remove_file(&path).unwrap();
    r
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

/// `--plan` names each convolution's CPU algorithm, chosen by its shape: the baseline's 5×5
/// stem by im2col + GEMM, its nine 3×3 block convolutions by Winograd; the 1-D CNN's kernels
/// and the quickstart's 8-channel first block (too narrow for Winograd's transforms to pay) by
/// im2col.
#[test]
fn the_plan_names_each_convolutions_algorithm() {
    let plan = |p: &str| {
        config::resolve(Path::new(p), &env(), Target::default())
            .unwrap()
            .plan
            .unwrap()
    };
    let algorithms = |p: &str| -> Vec<(String, &'static str)> {
        plan(p)
            .layers
            .iter()
            .filter_map(|l| l.conv.map(|c| (l.name.clone(), c.algorithm.name())))
            .collect()
    };
    let baseline = algorithms("config/classification/baseline.toml");
    assert_eq!(baseline.len(), 10);
    assert_eq!(baseline[0], ("backbone.input_conv.0".into(), "im2col+GEMM"));
    assert!(baseline[1..]
        .iter()
        .all(|(_, a)| *a == "Winograd F(4x4,3x3)"));
    let text = plan("config/classification/baseline.toml").render();
    let line = text
        .lines()
        .find(|l| l.starts_with("backbone.blocks.2.5"))
        .unwrap();
    assert!(line.ends_with("2717.9  Winograd F(4x4,3x3)"), "{line}");
    let series = algorithms("config/classification/baseline-timeseries.toml");
    assert!(
        series.iter().all(|(_, a)| *a == "im2col+GEMM"),
        "{series:?}"
    );
    let quickstart = algorithms("config/classification/quickstart.toml");
    assert_eq!(quickstart[1], ("backbone.blocks.0.1".into(), "im2col+GEMM"));
    assert_eq!(quickstart[2].1, "Winograd F(4x4,3x3)");
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
    // On the SD 3.5 VAE's 16 × 32 × 32 latents.
    assert_eq!(
        params("config/diffusion/localmamba-db-only.toml"),
        10_811_666
    );
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

/// The latent presets read the SD 3.5 VAE's config.json from the Hugging Face cache at build
/// time: its 16 channels and ×8 downscale make the model's input, the plan names the VAE, and
/// the file is one of the config's sources (rebuilt when it changes, embedded in the trainer).
#[test]
fn latent_presets_take_their_shapes_from_the_vae_in_the_hub_cache() {
    let r = config::resolve(
        Path::new("config/diffusion/dit-db-only.toml"),
        &env(),
        Target::default(),
    )
    .unwrap();
    let plan = r.plan.unwrap();
    assert_eq!(plan.input, [16, 32, 32]);
    let line = plan.render();
    assert!(
        line.contains("16 latent channels, downscale 8, scale 1.5305, shift 0.0609): images [3, 256, 256] -> latents [16, 32, 32]"),
        "{line}"
    );
    let config_json = "models--stabilityai--stable-diffusion-3.5-medium/snapshots/b940f670f0eda2d07fbb75229e779da1ad11eb80/vae/config.json";
    assert!(
        line.contains(config_json.trim_end_matches("/config.json")),
        "{line}"
    );
    assert!(r.sources.paths().any(|p| p.ends_with(config_json)));
    assert!(r.sources.paths().any(|p| p.ends_with("refs/main")));
}

#[test]
fn a_vae_missing_from_the_machine_is_an_error_at_the_key_listing_the_paths_searched() {
    let mut empty = env();
    empty.hub_cache = Some(root().join("tests/fixtures/no-such-hub"));
    let e = config::resolve(
        Path::new("config/diffusion/dit-db-only.toml"),
        &empty,
        Target::default(),
    )
    .unwrap_err();
    let text = config::render(&e);
    let errors: Vec<_> = e.diagnostics.errors().collect();
    assert_eq!(errors.len(), 1, "{text}");
    for want in [
        "dit-db-only.toml:25:7",
        "no VAE `stabilityai/stable-diffusion-3.5-medium` on this machine",
        "stabilityai/stable-diffusion-3.5-medium/vae/config.json",
        "no-such-hub/models--stabilityai--stable-diffusion-3.5-medium/refs/main",
        "huggingface-cli download stabilityai/stable-diffusion-3.5-medium --include \"vae/*\"",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
}

#[test]
fn latent_channels_and_sample_size_that_contradict_the_vae_are_errors_at_their_keys() {
    // The preset with a 3-channel input and a pixel-sized sample (the reference's dit-db-iq).
    let e = resolve_edited("config/diffusion/dit-db-only.toml", "dit-db-wrong", |t| {
        t.replace("in_channels = 16", "in_channels = 3")
            .replace("sample_size = 32", "sample_size = 256")
    })
    .unwrap_err();
    let text = config::render(&e);
    assert!(
        text.contains("`in_channels` = 3, but the VAE's latents have 16 channels"),
        "{text}"
    );
    assert!(
        text.contains("`sample_size` = 256 is not the latent side: resolution 256 / the VAE's downscale 8 = 32"),
        "{text}"
    );
}

/// `model.pretrained` is found at build time: a path that is not there is an error at the key
/// listing where it looked; an existing file is kept as the path the trainer loads.
#[test]
fn pretrained_weights_are_found_at_build_time() {
    let with = |pretrained: &str| {
        let tag = format!("pretrained-{}", pretrained.len());
        resolve_edited("config/diffusion/quickstart.toml", &tag, |t| {
            let line = format!("[model]\npretrained = \"{pretrained}\"\n");
            t.replacen("[model]\n", &line, 1)
        })
    };
    let text = config::render(&with("runs/nowhere").unwrap_err());
    assert!(
        text.contains("error: no pretrained weights `runs/nowhere` on this machine")
            && text.contains("runs/nowhere/transformer/{diffusion_pytorch_model.safetensors, model.safetensors, diffusion_pytorch_model.bin}"),
        "{text}"
    );
    // Any file is taken as the weights (its contents are checked when the trainer loads it).
    let file = root().join("config/default.toml");
    let r = with(&file.display().to_string()).unwrap();
    let Kind::Diffusion(d) = &r.config.kind else {
        panic!()
    };
    assert_eq!(d.model.pretrained_path.as_deref(), Some(file.as_path()));
}

/// Caption conditioning reads its text encoder's config.json at build time (a directory holding
/// `text_encoder/` and `tokenizer/`): the DiT gains a caption embedder per block sized by the
/// pooled width; a text encoder that is not there is an error at the key listing where it looked.
#[test]
fn caption_conditioning_finds_its_text_encoder_at_build_time() {
    let with = |encoder: &str| {
        let tag = format!("caption-{}", encoder.len());
        resolve_edited("config/diffusion/quickstart.toml", &tag, |t| {
            let extras = format!("[model.extras]\ntext_encoder = \"{encoder}\"\n");
            t.replace(
                "conditioning = \"gend_hlth_age\"",
                "conditioning = \"caption\"",
            )
            .replacen(
                "[dataset]\n",
                "[dataset]\ncaption_column = \"caption\"\n",
                1,
            )
            .replacen("[model.extras]\n", &extras, 1)
        })
    };
    let r = with("runtime/tests/fixtures/clip/tiny").unwrap();
    let Kind::Diffusion(d) = &r.config.kind else {
        panic!()
    };
    let t = d.model.text_encoder_config.as_ref().unwrap();
    assert_eq!((t.pooled_dim(), t.hidden_size), (24, 32));
    assert!(t.tokenizer_dir.ends_with("clip/tiny/tokenizer"));
    let plan = r.plan.unwrap();
    let emb = |name: &str| plan.layers.iter().find(|l| l.name == name).unwrap().params;
    // The quickstart's 128-wide DiT: timestep MLP, label table of 1001 rows, caption 24 -> 128.
    let dim = 128u64;
    assert_eq!(
        emb("transformer_blocks.0.norm1.emb"),
        256 * dim + dim + dim * dim + dim + 1001 * dim + 24 * dim + dim
    );
    let text = config::render(&with("runtime/tests/fixtures/clip/none").unwrap_err());
    assert!(
        text.contains("error: no text encoder `runtime/tests/fixtures/clip/none` on this machine")
            && text.contains("clip/none/text_encoder/config.json"),
        "{text}"
    );
}

/// The dit-caption preset takes the VAE and the CLIP-L text encoder of the settings' SD 3.5
/// model from the hub cache: 768-wide pooled captions into each of its 8 blocks, both models
/// named in the plan.
#[test]
fn dit_caption_reads_the_sd35_text_encoder_from_the_hub_cache() {
    let r = config::resolve(
        Path::new("config/diffusion/dit-caption.toml"),
        &env(),
        Target::default(),
    )
    .unwrap_or_else(|e| panic!("{}", config::render(&e)));
    let Kind::Diffusion(d) = &r.config.kind else {
        panic!()
    };
    let t = d.model.text_encoder_config.as_ref().unwrap();
    assert!(t
        .dir
        .ends_with("b940f670f0eda2d07fbb75229e779da1ad11eb80/text_encoder"));
    assert!(t
        .tokenizer_dir
        .ends_with("b940f670f0eda2d07fbb75229e779da1ad11eb80/tokenizer"));
    assert_eq!(
        (t.pooled_dim(), t.num_hidden_layers, t.vocab_size),
        (768, 12, 49408)
    );
    let plan = r.plan.unwrap();
    // dit-db-only's DiT plus one 768 -> 1152 caption linear per block.
    assert_eq!(
        plan.params,
        params("config/diffusion/dit-db-only.toml") + 8 * (768 * 1152 + 1152)
    );
    let text = plan.render();
    assert!(text.contains("latent space: VAE "), "{text}");
    assert!(
        text.contains("(CLIP, 12 layers, 768 wide; pooled embedding 768)"),
        "{text}"
    );
}

/// The hourglass and LocalMamba take a caption's pooled embedding through the mapping network:
/// its width is the text encoder's (24 for the tiny test encoder); the reference's
/// `mapping_cond` may say so, and disagreeing is an error at the key.
#[test]
fn hourglass_captions_take_the_text_encoders_pooled_width() {
    let preset = "tests/train/caption_hourglass.toml";
    let absolute = |t: String| t.replace("\"../../", &format!("\"{}/", root().display()));
    let r = resolve_edited(preset, "hg-caption", absolute)
        .unwrap_or_else(|e| panic!("{}", config::render(&e)));
    let Kind::Diffusion(d) = &r.config.kind else {
        panic!()
    };
    assert_eq!(d.model.mapping_cond_dim, 24);
    let with = |extra: &'static str| {
        resolve_edited(preset, "hg-caption-width", move |t| {
            absolute(t).replacen("[model.extras]\n", &format!("[model.extras]\n{extra}\n"), 1)
        })
    };
    assert!(with("mapping_cond = 24").is_ok());
    let text = config::render(&with("mapping_cond = 2048").unwrap_err());
    assert!(
        text.contains("the caption embedding is 2048 wide, but the text encoder's pooled embedding has 24 values"),
        "{text}"
    );
    let text = config::render(&with("mapping_cond = 24\nmapping_cond_dim = 32").unwrap_err());
    assert!(
        text.contains("`mapping_cond_dim` = 32, but `mapping_cond` = 24"),
        "{text}"
    );
}

/// The errors of `preset` edited by `edit`, rendered, one string each.
fn errors_of(preset: &str, tag: &str, edit: impl FnOnce(String) -> String) -> Vec<String> {
    match resolve_edited(preset, tag, edit) {
        Ok(_) => panic!("{tag}: resolved"),
        Err(e) => e
            .diagnostics
            .errors()
            .map(|d| format!("{}: {}", d.message, d.help.clone().unwrap_or_default()))
            .collect(),
    }
}

#[test]
fn stable_diffusion_15_is_read_from_its_pipeline_in_the_hub_cache() {
    let r = config::resolve(
        Path::new("config/diffusion/sd15-lora-db-only.toml"),
        &env(),
        Target::default(),
    )
    .unwrap();
    let Kind::Diffusion(d) = &r.config.kind else {
        panic!()
    };
    // The published UNet: diffusers counts 859,520,964 parameters.
    let plan = r.plan.as_ref().unwrap();
    assert_eq!(plan.params, 859_520_964);
    // Under LoRA the frozen weights need no gradients or AdamW moments in the estimate.
    let full = resolve_edited(
        "config/diffusion/sd15-lora-db-only.toml",
        "sd15-full",
        |t| t.replace("enabled = true", "enabled = false"),
    )
    .unwrap()
    .plan
    .unwrap();
    assert!(plan.frozen && !full.frozen);
    assert_eq!(plan.memory_bytes + 12 * plan.params, full.memory_bytes);
    let unet = d.model.unet_config.as_ref().unwrap();
    assert!(unet.dir.ends_with("unet"), "{}", unet.dir.display());
    assert_eq!((unet.cross_attention_dim, unet.heads[0]), (768, 8));
    // The latent space and the captions come from the same pipeline.
    assert_eq!((d.model.in_channels, d.model.sample_size), (4, 32));
    assert_eq!(
        d.model.text_encoder_config.as_ref().unwrap().hidden_size,
        768
    );
    let o = &d.objective;
    assert_eq!(
        (
            o.beta_schedule.to_string(),
            o.beta_start,
            o.beta_end,
            o.num_timesteps
        ),
        ("scaled_linear".to_string(), 0.00085, 0.012, 1000)
    );
    // The reference's name is the same model.
    let aliased = resolve_edited(
        "config/diffusion/sd15-lora-db-only.toml",
        "sd15-alias",
        |t| {
            t.replace(
                "name = \"stable-diffusion\"",
                "name = \"stable-diffusion-v1-5\"",
            )
        },
    )
    .unwrap();
    let Kind::Diffusion(a) = &aliased.config.kind else {
        panic!()
    };
    assert_eq!(a.model.name, d.model.name);
}

#[test]
fn stable_diffusion_15_errors_name_the_key_and_the_pipeline_file() {
    let tiny = "config/diffusion/sd15-lora-db-only-tiny.toml";
    let missing = errors_of(tiny, "sd15-missing", |t| {
        t.replace(
            "tests/fixtures/sd15-tiny",
            "tests/fixtures/no-such-pipeline",
        )
    });
    // One error: the VAE and text encoder it would have held are not looked for elsewhere.
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(
        missing[0].contains("no Stable Diffusion UNet")
            && missing[0].contains("no-such-pipeline/unet/config.json"),
        "{missing:?}"
    );
    let steps = errors_of(tiny, "sd15-steps", |t| {
        t.replace(
            "scheduler = \"ddpm\"",
            "scheduler = \"ddpm\"\nnum_timesteps = 500",
        )
    });
    assert!(
        steps[0].contains("`num_timesteps` = 500, but the pipeline was trained over 1000")
            && steps[0].contains("scheduler_config.json"),
        "{steps:?}"
    );
    let text = errors_of(tiny, "sd15-text", |t| {
        t.replace(
            "[model.extras]",
            "[model.extras]\ntext_encoder = \"stabilityai/stable-diffusion-3.5-medium\"",
        )
    });
    assert!(
        text[0].contains("the UNet attends to 32-wide text states")
            && text[0].contains("the text encoder's are 768 wide"),
        "{text:?}"
    );
    let widths = errors_of(tiny, "sd15-widths", |t| {
        t.replace(
            "[model.extras]",
            "[model.extras]\nblock_out_channels = [32, 64]",
        )
    });
    assert!(
        widths[0]
            .contains("`block_out_channels` = [32, 64], but the pretrained UNet's are [16, 32]"),
        "{widths:?}"
    );
    let text_training = errors_of(tiny, "sd15-train-text", |t| {
        t.replace(
            "[model.extras]",
            "[model.extras]\ntrain_text_encoder = true",
        )
    });
    assert!(
        text_training[0].starts_with("not yet supported: training the text encoder"),
        "{text_training:?}"
    );
    let target = errors_of(tiny, "sd15-target", |t| {
        t.replace("\"ff.net.2\"]", "\"proj_in\"]")
    });
    assert!(
        target[0].contains("LoRA target `proj_in` matches no linear layer of this UNet")
            && target[0].contains("time_emb_proj"),
        "{target:?}"
    );
    let classes = errors_of(tiny, "sd15-classes", |t| {
        t.replace("conditioning = \"caption\"", "conditioning = \"none\"")
    });
    assert!(
        classes[0].starts_with(
            "not yet supported: Stable Diffusion conditioned on anything but captions"
        ),
        "{classes:?}"
    );
}

#[test]
fn stable_diffusion_35_is_read_from_its_pipeline_in_the_hub_cache() {
    let r = config::resolve(
        Path::new("config/diffusion/sd35-db-only.toml"),
        &env(),
        Target::default(),
    )
    .unwrap();
    let Kind::Diffusion(d) = &r.config.kind else {
        panic!()
    };
    // The published transformer: diffusers counts 2,243,171,520 parameters.
    let plan = r.plan.as_ref().unwrap();
    assert_eq!(plan.params, 2_243_171_520);
    // 8-bit AdamW's moments: 2.03 bytes per parameter in the estimate, not f32 AdamW's 8.
    let f32_adamw = resolve_edited("config/diffusion/sd35-db-only.toml", "sd35-adamw", |t| {
        t.replace("name = \"adamw_8bit\"", "name = \"adamw\"")
    })
    .unwrap()
    .plan
    .unwrap();
    assert!(plan.moments_8bit && !f32_adamw.moments_8bit);
    assert_eq!(
        plan.memory_bytes + plan.params * 597 / 100,
        f32_adamw.memory_bytes
    );
    let m = d.model.mmdit_config.as_ref().unwrap();
    assert!(m.dir.ends_with("transformer"), "{}", m.dir.display());
    assert_eq!(
        (m.dim(), m.num_layers, m.dual_attention_layers.len()),
        (1536, 24, 13)
    );
    // Latents from the pipeline's VAE; captions from its two CLIP encoders; its shifted flow.
    assert_eq!((d.model.in_channels, d.model.sample_size), (16, 32));
    let (l, g) = (
        d.model.text_encoder_config.as_ref().unwrap(),
        d.model.text_encoder_2_config.as_ref().unwrap(),
    );
    assert_eq!((l.pooled_dim(), g.pooled_dim()), (768, 1280));
    assert!(g.tokenizer_dir.ends_with("tokenizer_2"));
    assert_eq!(
        (d.objective.flow_shift, d.objective.num_timesteps),
        (3.0, 1000)
    );
    // The reference's name is the same model (the preset writes it; the contract's is this).
    let aliased = resolve_edited("config/diffusion/sd35-db-only.toml", "sd35-alias", |t| {
        t.replace(
            "name = \"stable-diffusion-3.5-medium\"",
            "name = \"stable-diffusion-35\"",
        )
    })
    .unwrap();
    let Kind::Diffusion(a) = &aliased.config.kind else {
        panic!()
    };
    assert_eq!(a.model.name, d.model.name);
}

#[test]
fn stable_diffusion_35_errors_name_the_key_and_the_pipeline_file() {
    let tiny = "config/diffusion/sd35-db-only-tiny.toml";
    let missing = errors_of(tiny, "sd35-missing", |t| {
        t.replace(
            "tests/fixtures/sd35-tiny",
            "tests/fixtures/no-such-pipeline",
        )
    });
    // One error: the VAE and text encoders it would have held are not looked for elsewhere.
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(
        missing[0].contains("no Stable Diffusion 3 transformer")
            && missing[0].contains("no-such-pipeline/transformer/config.json")
            && missing[0].contains("text_encoder_2/*"),
        "{missing:?}"
    );
    let t5 = errors_of(tiny, "sd35-t5", |t| {
        t.replace("[model.extras]", "[model.extras]\nskip_t5 = false")
    });
    assert!(
        t5[0].starts_with("not yet supported: the T5 text encoder"),
        "{t5:?}"
    );
    let epsilon = errors_of(tiny, "sd35-eps", |t| {
        t.replace("\"vector_field\"", "\"epsilon\"")
    });
    assert!(
        epsilon
            .iter()
            .any(|e| e.starts_with("Stable Diffusion 3.5 is a rectified flow")),
        "{epsilon:?}"
    );
    let layers = errors_of(tiny, "sd35-layers", |t| {
        t.replace("[model.extras]", "[model.extras]\nnum_layers = 24")
    });
    assert!(
        layers[0].contains("`num_layers` = 24, but the pretrained transformer's is 2")
            && layers[0].contains("transformer/config.json"),
        "{layers:?}"
    );
    let steps = errors_of(tiny, "sd35-steps", |t| {
        t.replace(
            "prediction_type = \"vector_field\"",
            "prediction_type = \"vector_field\"\nnum_timesteps = 500",
        )
    });
    assert!(
        steps[0].contains("`num_timesteps` = 500, but the pipeline was trained over 1000")
            && steps[0].contains("scheduler_config.json"),
        "{steps:?}"
    );
    // 128 px: 64×64 latents in 32×32 patches, more than the tiny transformer's 16×16 table.
    let large = errors_of(tiny, "sd35-large", |t| {
        t.replace("resolution = 32", "resolution = 128")
    });
    assert!(
        large[0].contains("are 32×32 patches, more than the transformer's position table (16×16"),
        "{large:?}"
    );
    let target = errors_of(tiny, "sd35-target", |t| {
        t.replace(
            "[model.extras]",
            "[model.lora]\nenabled = true\ntarget_modules = [\"to_q\", \"attn1.to_k\"]\n\n[model.extras]",
        )
    });
    assert!(
        target[0].contains("LoRA target `attn1.to_k` matches no linear layer of this transformer"),
        "{target:?}"
    );
}
