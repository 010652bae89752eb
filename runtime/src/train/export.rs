//! Weights in and out of diffusers' layout: a DiT initialised from a `save_pretrained`
//! directory, and the trained weights written as one (`DiTTransformer2DModel.from_pretrained`
//! reads them).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor, Var};
use signal_diffusion_config::choice::Choice;

use super::checkpoint;
use super::diffusion::Ctx;

/// Weights saved by diffusers (`save_pretrained` dir or a safetensors file), by name.
pub(super) fn load_pretrained(path: &Path, vars: &[(String, Var)], device: &Device) -> Result<()> {
    let file = if path.is_dir() {
        ["diffusion_pytorch_model.safetensors", "model.safetensors"]
            .iter()
            .map(|f| path.join(f))
            .find(|p| p.exists())
            .with_context(|| format!("{}: no diffusion_pytorch_model.safetensors or model.safetensors (set `model.pretrained` to a diffusers DiT directory)", path.display()))?
    } else {
        path.to_path_buf()
    };
    let saved = candle_core::safetensors::load(&file, device)
        .with_context(|| format!("cannot read {}", file.display()))?;
    checkpoint::restore(vars, &saved)
        .with_context(|| format!("{}: not weights of this DiT", file.display()))?;
    println!("initialised from {}", file.display());
    Ok(())
}

/// Weights in diffusers' `save_pretrained` layout (`diffusion_pytorch_model.safetensors` and a
/// `config.json` that `DiTTransformer2DModel.from_pretrained` reads), plus `sampling.json`.
/// `values` are the tensors to write under the names of `vars` (all of them, buffers included).
pub(super) fn save_diffusers(
    dir: &Path,
    ctx: &Ctx,
    vars: &[(String, Var)],
    values: &[Tensor],
) -> Result<()> {
    let tmp = crate::data::io::temp_path_for(dir)?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let map: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, _)| n.clone())
        .zip(values.iter().cloned())
        .collect();
    candle_core::safetensors::save(&map, tmp.join("diffusion_pytorch_model.safetensors"))?;
    let s = ctx.shape;
    let config = serde_json::json!({
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": s.heads,
        "attention_head_dim": s.head_dim,
        "in_channels": s.in_channels,
        "out_channels": s.out_channels,
        "num_layers": s.layers,
        "dropout": s.dropout,
        "norm_num_groups": 32,
        "attention_bias": s.attention_bias,
        "sample_size": s.height,
        "patch_size": s.patch[0],
        "activation_fn": s.feed_forward.toml(),
        "num_embeds_ada_norm": s.num_embeds,
        "upcast_attention": s.upcast_attention,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": s.norm_affine,
        "norm_eps": s.norm_eps,
    });
    std::fs::write(
        tmp.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    std::fs::write(
        tmp.join("sampling.json"),
        serde_json::to_string_pretty(&ctx.spec)?,
    )?;
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("cannot move weights into {}", dir.display()))?;
    Ok(())
}
