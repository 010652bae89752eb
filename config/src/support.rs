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
    if m.name != DiffusionModel::Dit && !skeleton {
        let what = format!(
            "the `{}` diffusion model (the trainer builds DiT, hourglass and LocalMamba)",
            m.name
        );
        unsupported(
            ctx,
            "model.name",
            what,
            "use `name = \"dit\"`, \"hourglass\" or \"localmamba\"; `sigdiff validate` checks this config",
        );
        return;
    }
    let rules: [(bool, &str, &str, &str); 2] = [
        (
            m.lora_enabled,
            "model.lora.enabled",
            "LoRA (it needs a pretrained model's adapters)",
            "set `enabled = false`",
        ),
        (
            m.vae_tiling && !m.latent_space,
            "model.vae_tiling",
            "VAE tiling (pixel-space models have no VAE)",
            "remove `vae_tiling`",
        ),
    ];
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
