//! Our AutoencoderKL against diffusers' (fixtures/vae/generate.py): the tiny SD 1.5-shaped VAE
//! (4 latent channels, quant convs) and SD 3.5-shaped one (16 channels, none), same weights,
//! same encoder mean and log-variance, same decoding, within 1e-4 (f32).

use std::path::Path;

use candle_core::{Device, Tensor};
use signal_diffusion_runtime::config::pretrained::Vae as VaeConfig;
use signal_diffusion_runtime::models::vae::Vae;

use crate::common::max_abs_diff;

fn fixture(name: &str) -> (Vae, std::collections::HashMap<String, Tensor>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae");
    let cfg = vae_config(&dir.join(name));
    let vae = Vae::load(&cfg, false, &Device::Cpu).unwrap();
    let expected = candle_core::safetensors::load(
        dir.join(format!("{name}.expected.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    (vae, expected)
}

/// The config the build would read (config/src/pretrained.rs).
pub fn vae_config(dir: &Path) -> VaeConfig {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    signal_diffusion_runtime::config::pretrained::parse_vae(&text, dir).unwrap()
}

#[test]
fn encode_and_decode_equal_diffusers() {
    for name in ["sd15-tiny", "sd35-tiny"] {
        let (vae, e) = fixture(name);
        let (mean, logvar) = vae.encode(&e["input"]).unwrap();
        let decoded = vae.decode(&e["z"]).unwrap();
        for (what, ours, theirs) in [
            ("mean", &mean, &e["mean"]),
            ("logvar", &logvar, &e["logvar"]),
            ("decoded", &decoded, &e["decoded"]),
        ] {
            let d = max_abs_diff(ours, theirs);
            let scale = max_abs_diff(theirs, &theirs.zeros_like().unwrap());
            assert!(scale > 0.05, "{name} {what}: the fixture is degenerate");
            assert!(d < 1e-4, "{name} {what}: max |ours − diffusers| = {d}");
        }
    }
}

/// With tiling on, inputs larger than the tile (sd35-tiny's 16 pixels, 8 latents) are encoded
/// and decoded in diffusers' blended tiles: 4 × 4 tiles each way here, the last ones short.
/// Without it, the same inputs give other numbers (the test sees the tiles).
#[test]
fn tiled_encode_and_decode_equal_diffusers_tiling() {
    let (mut vae, _) = fixture("sd35-tiny");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae");
    let e = candle_core::safetensors::load(dir.join("sd35-tiny.tiled.safetensors"), &Device::Cpu)
        .unwrap();
    let whole = vae.encode(&e["input"]).unwrap().0;
    vae.tiling = true;
    let (mean, logvar) = vae.encode(&e["input"]).unwrap();
    let decoded = vae.decode(&e["z"]).unwrap();
    assert_eq!(mean.dims(), [2, 16, 20, 20]);
    assert_eq!(decoded.dims(), [2, 3, 40, 40]);
    for (what, ours, theirs) in [
        ("mean", &mean, &e["mean"]),
        ("logvar", &logvar, &e["logvar"]),
        ("decoded", &decoded, &e["decoded"]),
    ] {
        let d = max_abs_diff(ours, theirs);
        assert!(d < 1e-4, "tiled {what}: max |ours − diffusers| = {d}");
    }
    assert!(
        max_abs_diff(&whole, &e["mean"]) > 1e-2,
        "tiling made no difference"
    );
}

#[test]
fn the_scale_and_shift_round_trip_as_diffusers_pipelines_apply_them() {
    let (vae, e) = fixture("sd35-tiny");
    let z = &e["z"];
    let x = vae.to_model(z).unwrap();
    // (z − 0.0609) · 1.5305, elementwise.
    let by_hand = ((z - 0.0609).unwrap() * 1.5305).unwrap();
    assert!(max_abs_diff(&x, &by_hand) < 1e-6);
    assert!(max_abs_diff(&vae.from_model(&x).unwrap(), z) < 1e-6);
}
