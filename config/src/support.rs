//! What this build can honour: a valid config that asks for a model, option or device the
//! trainer does not have yet is refused here, at the key that asks for it, with what to use
//! instead. Validity (types, ranges, cross-field rules) is the schema's; this is only support.

use crate::choice::{
    Choice, Conditioning, Device, DiffusionModel, Guidance, MixedPrecision, Objective, Sampler,
};
use crate::diag::Diagnostic;
use crate::schema::Diffusion;
use crate::tree::Ctx;
use crate::{Kind, Target};

/// Reject what this build cannot honour yet, at the key that asks for it.
pub(crate) fn check_support(ctx: &mut Ctx, kind: &Kind, target: Target) {
    let unsupported = |ctx: &mut Ctx, key: &str, what: String, help: &str| {
        let loc = ctx.loc(key).or_else(|| ctx.loc("settings.trainer"));
        ctx.diags.push(
            Diagnostic::error(loc, format!("not yet supported: {what}")).help(help.to_string()),
        );
    };
    match kind {
        Kind::Diffusion(d) => check_diffusion(ctx, d, target, unsupported),
        Kind::Classification(c) => {
            let t = &c.training;
            wandb_needs_project(
                ctx,
                "training",
                t.wandb_project.is_some(),
                t.wandb_entity.is_some() || !t.wandb_tags.is_empty(),
            );
            if t.use_amp {
                warn_cpu_mixed_precision(ctx, "training.use_amp", "bf16", target);
            }
            if t.device == Device::Cuda && !target.cuda {
                unsupported(
                    ctx,
                    "training.device",
                    "`device = \"cuda\"` in a build without the `cuda` feature".into(),
                    "use `device = \"auto\"` or \"cpu\", or build with `--features cuda`",
                );
            }
        }
    }
}

/// What the diffusion trainer cannot honour yet, each at its key.
fn check_diffusion(
    ctx: &mut Ctx,
    d: &Diffusion,
    target: Target,
    unsupported: impl Fn(&mut Ctx, &str, String, &str),
) {
    let m = &d.model;
    let skeleton = matches!(
        m.name,
        DiffusionModel::Hourglass | DiffusionModel::LocalMamba
    );
    let sd = matches!(
        m.name,
        DiffusionModel::StableDiffusion15 | DiffusionModel::StableDiffusion35
    );
    let rules: [(bool, &str, &str, &str); 3] = [
        (
            m.lora_enabled && skeleton,
            "model.lora.enabled",
            "LoRA on the hourglass-shaped models (the trainer adapts the linear layers of a DiT or a Stable Diffusion UNet)",
            "set `enabled = false` to fine-tune the whole model from `model.pretrained`",
        ),
        (
            sd && m.conditioning != Conditioning::Caption,
            "model.conditioning",
            "Stable Diffusion conditioned on anything but captions (its UNet or transformer attends to text encoders' states)",
            "use `conditioning = \"caption\"` with `dataset.caption_column`",
        ),
        (
            m.vae_tiling && !m.latent_space,
            "model.vae_tiling",
            "VAE tiling (pixel-space models have no VAE)",
            "remove `vae_tiling`",
        ),
    ];
    match (&m.unet_config, &m.mmdit_config, m.lora_enabled) {
        (_, _, false) => {}
        (Some(unet), _, true) => check_lora_targets(
            ctx,
            "UNet",
            &unet_linear_layers(unet),
            &m.lora_target_modules,
        ),
        (_, Some(mmdit), true) => check_lora_targets(
            ctx,
            "transformer",
            &mmdit_linear_layers(mmdit),
            &m.lora_target_modules,
        ),
        (None, None, true) => check_lora_targets(
            ctx,
            "DiT",
            &dit_linear_layers(m.conditioning),
            &m.lora_target_modules,
        ),
    }
    wandb_needs_project(
        ctx,
        "logging",
        d.logging.wandb_project.is_some(),
        d.logging.wandb_entity.is_some() || !d.logging.wandb_tags.is_empty(),
    );
    for (bad, key, what, help) in rules {
        if bad {
            unsupported(ctx, key, what.to_string(), help);
        }
    }
    // Rectified-CFG++ is a guided Euler step (its midpoint is half an Euler step).
    if m.conditioning != Conditioning::None
        && d.inference.sampler != Sampler::Euler
        && d.inference.guidance == Guidance::RectifiedCfgPp
    {
        unsupported(
            ctx,
            "inference.guidance",
            format!(
                "Rectified-CFG++ with the `{}` sampler (it is a guided Euler step)",
                d.inference.sampler
            ),
            "use `sampler = \"euler\"` with Rectified-CFG++, or `guidance = \"cfg\"`",
        );
    }
    if d.inference.sampler == Sampler::Heun && d.objective.prediction_type != Objective::VectorField
    {
        unsupported(
            ctx,
            "inference.sampler",
            "Heun on a DDPM/DDIM path".into(),
            "use `sampler = \"ddim\"` for epsilon/sample objectives",
        );
    }
    if d.training.mixed_precision != MixedPrecision::No {
        let precision = d.training.mixed_precision.toml();
        warn_cpu_mixed_precision(ctx, "training.mixed_precision", precision, target);
    }
}

/// The linear layers of a DiT as diffusers names them, for one block and the head (block `i`
/// repeats block 0's under `transformer_blocks.i`): what LoRA can target. The runtime's DiT
/// builds exactly these (runtime/tests/lora.rs checks it).
pub fn dit_linear_layers(conditioning: Conditioning) -> Vec<String> {
    let emb = "transformer_blocks.0.norm1.emb";
    let mut layers: Vec<String> = ["timestep_embedder.linear_1", "timestep_embedder.linear_2"]
        .iter()
        .map(|l| format!("{emb}.{l}"))
        .collect();
    match conditioning {
        Conditioning::GenderHealthAge => layers.push(format!("{emb}.age_embedder.linear_1")),
        Conditioning::Caption => layers.push(format!("{emb}.caption_embedder.linear_1")),
        Conditioning::None | Conditioning::Classes => {}
    }
    let block = [
        "norm1.linear",
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
    ];
    layers.extend(block.iter().map(|l| format!("transformer_blocks.0.{l}")));
    layers.extend(["proj_out_1".to_string(), "proj_out_2".to_string()]);
    layers
}

/// The linear layers of a Stable Diffusion 3.5 MMDiT as diffusers names them, every one (the
/// runtime's MMDiT builds exactly these: runtime/tests/mmdit.rs checks it).
pub fn mmdit_linear_layers(m: &crate::pretrained::Mmdit) -> Vec<String> {
    let mut layers: Vec<String> = [
        "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2",
        "time_text_embed.text_embedder.linear_1",
        "time_text_embed.text_embedder.linear_2",
        "context_embedder",
    ]
    .map(String::from)
    .to_vec();
    for i in 0..m.num_layers {
        let last = i + 1 == m.num_layers;
        let mut block = vec!["norm1.linear", "norm1_context.linear"];
        block.extend(["attn.to_q", "attn.to_k", "attn.to_v"]);
        block.extend(["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]);
        block.push("attn.to_out.0");
        if !last {
            block.push("attn.to_add_out");
        }
        if m.dual_attention_layers.contains(&i) {
            block.extend(["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]);
        }
        block.extend(["ff.net.0.proj", "ff.net.2"]);
        if !last {
            block.extend(["ff_context.net.0.proj", "ff_context.net.2"]);
        }
        layers.extend(block.iter().map(|l| format!("transformer_blocks.{i}.{l}")));
    }
    layers.extend(["norm_out.linear".to_string(), "proj_out".to_string()]);
    layers
}

/// The linear layers of a Stable Diffusion 1.5 UNet as diffusers names them, every one (the
/// runtime's UNet builds exactly these: runtime/tests/lora.rs checks it).
pub fn unet_linear_layers(u: &crate::pretrained::Unet) -> Vec<String> {
    let mut layers = vec![
        "time_embedding.linear_1".to_string(),
        "time_embedding.linear_2".to_string(),
    ];
    let transformer = |layers: &mut Vec<String>, at: String| {
        if u.use_linear_projection {
            layers.push(format!("{at}.proj_in"));
        }
        let block = format!("{at}.transformer_blocks.0");
        for attn in ["attn1", "attn2"] {
            for l in ["to_q", "to_k", "to_v", "to_out.0"] {
                layers.push(format!("{block}.{attn}.{l}"));
            }
        }
        layers.push(format!("{block}.ff.net.0.proj"));
        layers.push(format!("{block}.ff.net.2"));
        if u.use_linear_projection {
            layers.push(format!("{at}.proj_out"));
        }
    };
    let blocks = [
        ("down_blocks", u.layers_per_block, &u.down_attention),
        ("up_blocks", u.layers_per_block + 1, &u.up_attention),
    ];
    for (i, (kind, resnets, attention)) in blocks.into_iter().enumerate() {
        for (b, &attends) in attention.iter().enumerate() {
            for j in 0..resnets {
                layers.push(format!("{kind}.{b}.resnets.{j}.time_emb_proj"));
                if attends {
                    transformer(&mut layers, format!("{kind}.{b}.attentions.{j}"));
                }
            }
        }
        if i == 0 {
            layers.push("mid_block.resnets.0.time_emb_proj".into());
            transformer(&mut layers, "mid_block.attentions.0".into());
            layers.push("mid_block.resnets.1.time_emb_proj".into());
        }
    }
    layers
}

/// Every LoRA target names a linear layer of the model (`what`, its `layers`) as PEFT matches
/// names (the layer's path or a `.`-suffix of it, with any block index), and none the patch
/// embedding's convolution (PEFT would adapt it; our adapters are on linear layers).
fn check_lora_targets(ctx: &mut Ctx, what: &str, layers: &[String], targets: &[String]) {
    // A block index in a target (`transformer_blocks.3.attn1.to_q`) matches block 0's layer.
    let in_block_0 = |t: &str| {
        let mut parts: Vec<&str> = t.split('.').collect();
        if let Some(i) = parts.iter().position(|p| *p == "transformer_blocks") {
            if parts.get(i + 1).is_some_and(|n| n.parse::<usize>().is_ok()) {
                parts[i + 1] = "0";
            }
        }
        parts.join(".")
    };
    let matches = |layer: &str, t: &str| layer == t || layer.ends_with(&format!(".{t}"));
    for target in targets {
        let t = in_block_0(target);
        let loc = ctx.loc("model.lora.target_modules");
        if matches("pos_embed.proj", &t) {
            ctx.diags.push(
                Diagnostic::error(
                    loc,
                    format!("LoRA target `{target}` names the patch embedding's convolution (`pos_embed.proj`): the adapters here are on linear layers"),
                )
                .help("name the linear layer (`ff.net.0.proj` rather than `proj`)".to_string()),
            );
        } else if !layers.iter().any(|l| matches(l, &t)) {
            // The layers' names within their block (after `transformer_blocks.0.`, a UNet's
            // `resnets.j.` or `attentions.j.`), each once.
            let mut names: Vec<String> = vec![];
            for l in layers {
                let parts: Vec<&str> = l.split('.').collect();
                let start = (1..parts.len())
                    .rev()
                    .find(|&i| {
                        parts[i].parse::<usize>().is_ok()
                            && ["transformer_blocks", "resnets", "attentions"]
                                .contains(&parts[i - 1])
                    })
                    .map_or(0, |i| i + 1);
                let name = parts[start..].join(".");
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            ctx.diags.push(
                Diagnostic::error(loc, format!("LoRA target `{target}` matches no linear layer of this {what}"))
                    .help(format!("a target is a layer's name or its ending after a `.`; this {what}'s linear layers: {}", names.join(", "))),
            );
        }
    }
}

/// Mixed precision is honoured on every device, but a CPU has no 16-bit GEMM here: it gets the
/// GPU's numerics (operands rounded to 16 bits) at f32 speed plus the rounding.
fn warn_cpu_mixed_precision(ctx: &mut Ctx, key: &str, precision: &str, target: Target) {
    if target.cuda {
        return;
    }
    let loc = ctx.loc(key).or_else(|| ctx.loc("settings.trainer"));
    ctx.diags.push(
        Diagnostic::warning(
            loc,
            format!("{precision} mixed precision in a CPU build: products are rounded to {precision} (a GPU's numerics) but computed by f32 kernels, so training is no faster than in f32 (about 10 % slower)"),
        )
        .help("for speed on a CPU, turn mixed precision off; build with `--features cuda` for 16-bit GEMMs"),
    );
}

/// A W&B entity or tags without a project would name a run that is never written: an error at
/// the first of those keys.
fn wandb_needs_project(ctx: &mut Ctx, table: &str, project: bool, others: bool) {
    if project || !others {
        return;
    }
    let key = ["wandb_entity", "wandb_tags"]
        .into_iter()
        .map(|k| format!("{table}.{k}"))
        .find(|k| ctx.loc(k).is_some())
        .unwrap_or_else(|| format!("{table}.wandb_entity"));
    let loc = ctx.loc(&key);
    ctx.diags.push(
        Diagnostic::error(loc, format!("`{key}` is set without `{table}.wandb_project`"))
            .help(format!(
                "add `wandb_project = \"<project>\"` to [{table}] (the W&B run is written offline under `wandb/`), or remove `{key}`"
            )),
    );
}
