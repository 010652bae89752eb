//! The frozen VAE's encoder (models/vae.rs) on the CPU: images/s of `encode` at a resolution and
//! batch, as `benches/vae_encode.py` runs it beside diffusers' AutoencoderKL. Prints one JSON
//! line.
//! `cargo bench -p signal-diffusion-runtime --bench vae_encode -- <vae dir> <resolution> <batch> <reps>`

use std::time::Instant;

use candle_core::{Device, Tensor};
use signal_diffusion_runtime::config::pretrained::parse_vae;
use signal_diffusion_runtime::models::vae::Vae;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [dir, resolution, batch, reps] = args.as_slice() else {
        anyhow::bail!("usage: vae_encode <vae dir> <resolution> <batch> <reps>");
    };
    let dir = std::path::Path::new(dir);
    let (r, b, reps): (usize, usize, usize) = (resolution.parse()?, batch.parse()?, reps.parse()?);
    let cfg = parse_vae(&std::fs::read_to_string(dir.join("config.json"))?, dir)
        .map_err(anyhow::Error::msg)?;
    let vae = Vae::load(&cfg, false, &Device::Cpu)?;
    let x = Tensor::randn(0f32, 0.5, (b, 3, r, r), &Device::Cpu)?;
    vae.encode(&x)?; // warm-up
    let started = Instant::now();
    for _ in 0..reps {
        let (mean, _) = vae.encode(&x)?;
        mean.flatten_all()?.sum_all()?.to_scalar::<f32>()?;
    }
    let per_s = (reps * b) as f64 / started.elapsed().as_secs_f64();
    println!("{{\"images_per_s\": {per_s:.4}}}");
    Ok(())
}
