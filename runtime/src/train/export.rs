//! Weights in and out: a model initialised from saved weights (a diffusers DiT, a reference
//! hourglass or LocalMamba state dict), and the trained weights written where their users read
//! them (diffusers' layout for a DiT, the reference's state-dict names for the others).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use signal_diffusion_config::choice::Choice;

use super::checkpoint;
use crate::diffusion::denoiser::DenoiserShape;
use crate::diffusion::sampler::SampleSpec;
use crate::models::lora::{diffusers_lora_state, merge, peft_state, LoraSpec};
use crate::models::nn::Params;

/// A state dict by name, in f32: a safetensors file, or a PyTorch pickle (`torch.save` of a
/// state dict, as the reference saves `hourglass_model.pt` / `localmamba_model.pt`, or of a
/// checkpoint holding one under `state_dict` or `model`; bf16 and f16 weights are widened).
pub fn read_state_dict(file: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let pickle = file
        .extension()
        .is_some_and(|e| ["pt", "pth", "bin", "ckpt"].iter().any(|x| e == *x));
    let tensors: Vec<(String, Tensor)> = if pickle {
        [None, Some("state_dict"), Some("model")]
            .iter()
            .find_map(|key| candle_core::pickle::read_all_with_key(file, *key).ok())
            .filter(|t| !t.is_empty())
            .with_context(|| {
                format!(
                    "{}: not a PyTorch state dict (a dict of tensors, or a checkpoint with one under `state_dict` or `model`)",
                    file.display()
                )
            })?
    } else {
        candle_core::safetensors::load(file, device)
            .with_context(|| format!("cannot read {}", file.display()))?
            .into_iter()
            .collect()
    };
    tensors
        .into_iter()
        .map(|(name, t)| {
            let t = match t.dtype() {
                DType::BF16 | DType::F16 | DType::F64 => t.to_dtype(DType::F32)?,
                _ => t,
            };
            Ok((name, t.to_device(device)?))
        })
        .collect()
}

/// Initial weights by name: a diffusers DiT (`save_pretrained` directory or file), a reference
/// hourglass / LocalMamba checkpoint (`hourglass_model.pt`, read as it is), or our own final
/// weights. Every trainable tensor must be there; a buffer the file lacks (the age features,
/// which the reference never saved) keeps its seeded value.
pub(super) fn load_pretrained(
    path: &Path,
    shape: &DenoiserShape,
    params: &Params,
    device: &Device,
) -> Result<()> {
    let file = if path.is_dir() {
        let names = signal_diffusion_config::pretrained::weight_files(shape.model());
        names
            .iter()
            .map(|f| path.join(f))
            .find(|p| p.exists())
            .with_context(|| {
                format!(
                    "{}: none of {} (set `model.pretrained` to the weights of a {})",
                    path.display(),
                    names.join(", "),
                    shape.family()
                )
            })?
    } else {
        path.to_path_buf()
    };
    let saved = read_state_dict(&file, device)?;
    let what = || format!("{}: not weights of this {}", file.display(), shape.family());
    // Under LoRA the model's own parameters, frozen or trained; the adapters start fresh.
    let model: Vec<(String, Var)> = params
        .trainable
        .iter()
        .chain(&params.frozen)
        .filter(|(n, _)| !n.contains(".lora_"))
        .cloned()
        .collect();
    checkpoint::restore(&model, &saved).with_context(what)?;
    let (present, kept): (Vec<_>, Vec<_>) = params
        .buffers
        .iter()
        .cloned()
        .partition(|(name, _)| saved.contains_key(name));
    checkpoint::restore(&present, &saved).with_context(what)?;
    println!("initialised from {}", file.display());
    for (name, _) in kept {
        println!("  `{name}` is not in it: kept as drawn from the seed");
    }
    Ok(())
}

/// The final weights: for a DiT diffusers' `save_pretrained` layout
/// (`diffusion_pytorch_model.safetensors` and the `config.json` that
/// `DiTTransformer2DModel.from_pretrained` reads), for a UNet or an MMDiT the same with its pipeline's
/// `config.json`; for the hourglass and LocalMamba the reference's state-dict names in
/// `hourglass_model.safetensors` / `localmamba_model.safetensors`
/// (`model.load_state_dict(safetensors.torch.load_file(..), strict=False)` loads them; the one
/// extra tensor is our saved `age_emb.weight`) and a `config.json` of the shape. Plus
/// `sampling.json`. `trained` are the values of the trainable parameters (live, or their EMA);
/// `pretrained` the weights the run started from. A LoRA run's adapters are merged into the
/// weights (a plain model loads them), and saved as they are in `lora/` (`save_adapters`).
pub(super) fn save_weights(
    dir: &Path,
    spec: &SampleSpec,
    pretrained: Option<&Path>,
    params: &Params,
    trained: &[Tensor],
) -> Result<()> {
    let tmp = staging(dir)?;
    let trained = named_values(params, trained);
    let mut weights = match params.lora() {
        Some(lora) => {
            save_adapters(&tmp.join("lora"), &spec.shape, pretrained, lora, &trained)?;
            merge(lora, &trained, &params.frozen)?
        }
        None => trained,
    };
    weights.extend(
        params
            .buffers
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone())),
    );
    let map: HashMap<String, Tensor> = weights.into_iter().collect();
    candle_core::safetensors::save(&map, tmp.join(spec.shape.weights_file()))?;
    let config = match &spec.shape {
        DenoiserShape::Dit(s) => serde_json::json!({
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
        }),
        DenoiserShape::Hourglass { hourglass, .. } => serde_json::json!({
            "_class_name": "Hourglass2DModel",
            "shape": hourglass,
        }),
        DenoiserShape::LocalMamba { localmamba, .. } => serde_json::json!({
            "_class_name": "LocalMamba2DModel",
            "shape": localmamba,
        }),
        // The pretrained UNet's or transformer's own config.json: the architecture is unchanged.
        DenoiserShape::Unet { .. } | DenoiserShape::Mmdit { .. } => {
            let file = pretrained
                .context("Stable Diffusion is fine-tuned from a pipeline")?
                .join("config.json");
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {} (the model's config)", file.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", file.display()))?
        }
    };
    std::fs::write(
        tmp.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    // Merged: sampling needs neither the adapters nor the weights they adapted.
    let spec = SampleSpec {
        lora: None,
        ..spec.clone()
    };
    std::fs::write(
        tmp.join("sampling.json"),
        serde_json::to_string_pretty(&spec)?,
    )?;
    publish(&tmp, dir)
}

/// A LoRA run's adapters in `dir`, as they are: PEFT's layout (`adapter_model.safetensors`,
/// `adapter_config.json`: `PeftModel.from_pretrained(base, dir)`), and for a UNet or an MMDiT diffusers'
/// LoRA file too (`pytorch_lora_weights.safetensors`: `pipe.load_lora_weights(dir)`).
fn save_adapters(
    dir: &Path,
    shape: &DenoiserShape,
    pretrained: Option<&Path>,
    lora: &LoraSpec,
    trained: &[(String, Tensor)],
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let adapters: HashMap<String, Tensor> = peft_state(lora, trained).into_iter().collect();
    candle_core::safetensors::save(&adapters, dir.join("adapter_model.safetensors"))?;
    let base = pretrained.unwrap_or(Path::new(""));
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&lora.peft_config(&base.display().to_string()))?,
    )?;
    let component = match shape {
        DenoiserShape::Unet { .. } => Some("unet"),
        DenoiserShape::Mmdit { .. } => Some("transformer"),
        _ => None,
    };
    if let Some(component) = component {
        match diffusers_lora_state(component, lora, trained) {
            Some((adapters, config)) => save_with_lora_config(
                &adapters,
                &config,
                &dir.join("pytorch_lora_weights.safetensors"),
            )?,
            None => println!("the adapters are in PEFT's layout only: diffusers' LoRA file holds no trained biases"),
        }
    }
    Ok(())
}

/// `trained` by the names of the parameters they are the values of.
fn named_values(params: &Params, trained: &[Tensor]) -> Vec<(String, Tensor)> {
    params
        .trainable
        .iter()
        .map(|(n, _)| n.clone())
        .zip(trained.iter().cloned())
        .collect()
}

/// An empty staging directory beside `dir`, moved into place by `publish`.
fn staging(dir: &Path) -> Result<std::path::PathBuf> {
    let tmp = crate::data::io::temp_path_for(dir)?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    Ok(tmp)
}

/// `tmp` in place of `dir`: a reader sees the old directory or the whole new one.
fn publish(tmp: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::rename(tmp, dir)
        .with_context(|| format!("cannot move weights into {}", dir.display()))?;
    Ok(())
}

/// `tensors` (f32) in a safetensors file whose metadata carries diffusers' LoRA config
/// (`lora_adapter_metadata`, and `format` = `pt` as PyTorch writes it).
fn save_with_lora_config(tensors: &[(String, Tensor)], config: &str, path: &Path) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let values = t.flatten_all()?.to_vec1::<f32>()?;
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            Ok((name.clone(), t.dims().to_vec(), bytes))
        })
        .collect::<Result<_>>()?;
    let views = bytes
        .iter()
        .map(|(name, shape, data)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)?;
            Ok((name.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = std::collections::HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("lora_adapter_metadata".to_string(), config.to_string()),
    ]);
    safetensors::serialize_to_file(views, Some(metadata), path)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// `sigdiff export`: a checkpoint's model where its users read it, in the layout of a run's
/// final weights (diffusers' for a DiT or a UNet). A LoRA checkpoint holds adapters only: with
/// `merge` they are folded into the weights they adapt (and kept beside them in `lora/`),
/// without it `out` holds the adapters alone (PEFT's layout, and diffusers' LoRA file for a
/// UNet or an MMDiT). `ema`: the checkpoint's EMA weights.
pub fn export(
    checkpoint: &Path,
    out: &Path,
    ema: bool,
    merge: bool,
    overwrite: bool,
) -> Result<()> {
    if out.exists() && !overwrite {
        anyhow::bail!("{} exists; pass `--overwrite` to replace it", out.display());
    }
    let device = Device::Cpu;
    let (spec, params) = super::sample::load_checkpoint(checkpoint, ema, &device)?;
    let trained: Vec<Tensor> = params
        .trainable
        .iter()
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    // The weights the run started from: a LoRA run's base, a UNet's pipeline.
    let pretrained = match (&spec.lora, &spec.shape) {
        (Some(lora), _) => Some(lora.pretrained.clone()),
        (None, DenoiserShape::Unet { unet, .. }) => Some(unet.dir.clone()),
        (None, DenoiserShape::Mmdit { mmdit, .. }) => Some(mmdit.dir.clone()),
        (None, _) => None,
    };
    match (&spec.lora, merge) {
        (Some(lora), false) => {
            let tmp = staging(out)?;
            let named = named_values(&params, &trained);
            save_adapters(&tmp, &spec.shape, pretrained.as_deref(), &lora.spec, &named)?;
            publish(&tmp, out)?;
            println!(
                "wrote the adapters of {} to {}",
                checkpoint.display(),
                out.display()
            );
        }
        (None, true) => anyhow::bail!(
            "{}: not a LoRA checkpoint, nothing to merge; drop `--merge`",
            checkpoint.display()
        ),
        _ => {
            save_weights(out, &spec, pretrained.as_deref(), &params, &trained)?;
            println!(
                "wrote the {} of {} to {}",
                spec.shape.family(),
                checkpoint.display(),
                out.display()
            );
        }
    }
    Ok(())
}
