//! The diffusion config's cross-field rules: what one section's values forbid or require in
//! another's (shapes, objective and sampler, model family and its keys), each reported at the
//! key to change.

use crate::choice::{
    Conditioning, DiffusionModel, Guidance, NoiseScheduler, Objective, OutputType, Sampler,
};
use crate::settings::Settings;
use crate::tree::Ctx;

use super::{DiffDataset, DiffModel, Diffusion};

/// The rules that relate keys of different sections.
pub(super) fn check(
    ctx: &mut Ctx,
    d: &Diffusion,
    is_sd: bool,
    settings: &Settings,
    output_type: OutputType,
) {
    let ts = d.dataset_is_timeseries;
    let DiffDataset {
        random_flip,
        ref health_column,
        sequence_length,
        ref gender_column,
        gaussian_noise_std,
        center_crop,
        ref caption_column,
        ref age_column,
        n_eeg_channels,
        resolution,
        ref class_column,
        ..
    } = d.dataset;
    let DiffModel {
        num_classes,
        ref pretrained,
        attention_head_dim,
        lora_enabled,
        ref vae,
        num_attention_heads,
        out_channels,
        sample_size,
        latent_space,
        ref depths,
        ref widths,
        in_channels,
        name: name_m,
        cfg_dropout,
        conditioning,
        ref dims,
        patch_size,
        ..
    } = d.model;
    let (prediction_type, objective_scheduler) =
        (d.objective.prediction_type, d.objective.scheduler);
    let (sampler, guidance, cfg_scale) = (
        d.inference.sampler,
        d.inference.guidance,
        d.inference.cfg_scale,
    );
    match conditioning {
        Conditioning::Caption if caption_column.is_none() => {
            ctx.error(
                "model.conditioning",
                "`model.conditioning` = \"caption\" needs `dataset.caption_column`",
            )
            .help = Some(
                "set `caption_column = \"caption\"` (the meta-dataset's caption column)".into(),
            );
        }
        Conditioning::Classes => {
            if class_column.is_none() {
                ctx.error(
                    "model.conditioning",
                    "`model.conditioning` = \"classes\" needs `dataset.class_column`",
                )
                .help = Some("name the metadata column that holds the integer class".into());
            }
            if num_classes < 2 {
                ctx.error(
                    "model.conditioning",
                    "`model.conditioning` = \"classes\" needs `dataset.num_classes` of at least 2",
                )
                .help = Some("set `[dataset] num_classes = N`".into());
            }
        }
        Conditioning::GenderHealthAge => {
            for (k, v) in [
                ("gender_column", &gender_column),
                ("health_column", &health_column),
                ("age_column", &age_column),
            ] {
                if v.is_empty() {
                    ctx.error(&format!("dataset.{k}"), format!("`model.conditioning` = \"gend_hlth_age\" needs a non-empty `dataset.{k}`"));
                }
            }
        }
        Conditioning::Caption | Conditioning::None => {}
    }
    if conditioning == Conditioning::None
        && cfg_dropout > 0.0
        && ctx.loc("model.extras.cfg_dropout").is_some()
    {
        ctx.warn(
            "model.extras.cfg_dropout",
            "`model.extras.cfg_dropout` has no effect with `model.conditioning` = \"none\": there is no condition to drop",
        )
        .help = Some("remove it, or set `model.conditioning`".into());
    }
    if ctx.loc("training.eval_mmd_fallback_ntrain").is_some() {
        let why = if d.training.eval_mmd_samples < 2 {
            Some("no KID/MMD² is computed (`training.eval_mmd_samples` < 2)")
        } else if d.dataset.val_split.is_some() {
            Some("the reference is the validation split (`dataset.val_split`)")
        } else {
            None
        };
        if let Some(why) = why {
            ctx.warn(
                "training.eval_mmd_fallback_ntrain",
                format!("`training.eval_mmd_fallback_ntrain` has no effect: {why}"),
            )
            .help = Some(
                "it sets how many training samples serve as the KID/MMD² reference when there is no validation split"
                    .into(),
            );
        }
    }
    // The adapter's settings with LoRA off.
    if !lora_enabled {
        for key in [
            "rank",
            "alpha",
            "dropout",
            "target_modules",
            "bias",
            "scaling",
        ] {
            let key = format!("model.lora.{key}");
            if ctx.loc(&key).is_some() {
                ctx.warn(
                    &key,
                    format!("`{key}` has no effect: `model.lora.enabled` is not true"),
                )
                .help = Some("set `enabled = true` in [model.lora], or remove it".into());
            }
        }
    }
    if lora_enabled && pretrained.is_none() {
        ctx.error(
            "model.lora.enabled",
            "LoRA adapts a pretrained model, but `model.pretrained` is not set",
        )
        .help = Some(
            "set `model.pretrained` to a local model directory, or disable `[model.lora]`".into(),
        );
    }
    if latent_space
        && vae.is_none()
        && !settings.hf_models.contains_key("stable_diffusion_model_id")
    {
        ctx.error(
            "model.extras.latent_space",
            "latent-space training needs a VAE: set `model.extras.vae` (a local directory)",
        );
    }
    if d.model.revision.is_some() && !latent_space && pretrained.is_none() && !is_sd {
        ctx.warn(
            "model.revision",
            "`model.revision` has no effect: no model is looked up in the Hugging Face cache",
        )
        .help = Some(
            "it selects the snapshot of `model.pretrained` or of a latent space's VAE when they name a Hugging Face id; remove it".into(),
        );
    }
    if vae.is_some() && !latent_space && !is_sd {
        ctx.warn(
            "model.extras.vae",
            "`model.extras.vae` has no effect: the model trains in pixel space (`latent_space` is false)",
        )
        .help = Some("set `latent_space = true` to train on its latents, or remove it".into());
    }
    if ts && ctx.loc("model.sample_size").is_some() {
        ctx.warn(
            "model.sample_size",
            format!("`model.sample_size` has no effect on time series: the model's input is `n_eeg_channels` × `sequence_length` = {n_eeg_channels} × {sequence_length}"),
        )
        .help = Some("remove it".into());
    }
    if is_sd
        && !latent_space
        && ctx
            .loc_any(&["model.extras.latent_space", "model.latent_space"])
            .is_some()
    {
        ctx.error(
            "model.extras.latent_space",
            "Stable Diffusion models always train in their VAE's latent space",
        );
    }
    if name_m == DiffusionModel::StableDiffusion15 && prediction_type != Objective::Epsilon {
        ctx.error(
            "objective.prediction_type",
            "Stable Diffusion 1.5 is an epsilon-prediction model",
        );
    }
    if name_m == DiffusionModel::StableDiffusion35 && prediction_type != Objective::VectorField {
        ctx.error(
            "objective.prediction_type",
            "Stable Diffusion 3.5 is a rectified flow: it predicts the vector field",
        )
        .help = Some("set `prediction_type = \"vector_field\"`".into());
    }
    if ts && is_sd {
        ctx.error(
            "model.name",
            format!("Stable Diffusion ({name_m}) cannot model time series: it trains in a VAE's latent space of images"),
        );
    }
    if prediction_type == Objective::VectorField
        && objective_scheduler != NoiseScheduler::FlowMatchEuler
    {
        ctx.error("objective.scheduler", format!("`objective.scheduler` = \"{objective_scheduler}\" is a DDPM/DDIM noise schedule, but `prediction_type` = \"vector_field\" trains a rectified flow"))
            .help = Some("use `scheduler = \"flow_match_euler\"`, or an epsilon/sample objective".into());
    }
    if prediction_type != Objective::VectorField
        && objective_scheduler == NoiseScheduler::FlowMatchEuler
    {
        ctx.error("objective.scheduler", format!("`flow_match_euler` needs `prediction_type` = \"vector_field\", not \"{prediction_type}\""));
    }
    if prediction_type == Objective::VectorField
        && sampler == Sampler::Ddim
        && ctx.loc("inference.sampler").is_some()
    {
        ctx.error(
            "inference.sampler",
            "the DDIM sampler needs an epsilon or sample objective",
        );
    }
    if prediction_type != Objective::VectorField
        && sampler == Sampler::Euler
        && ctx.loc("inference.sampler").is_some()
    {
        ctx.error(
            "inference.sampler",
            "the flow Euler sampler needs `prediction_type` = \"vector_field\"",
        );
    }
    if guidance == Guidance::RectifiedCfgPp && prediction_type != Objective::VectorField {
        ctx.error("inference.guidance", "Rectified-CFG++ guides a rectified flow: it needs `prediction_type` = \"vector_field\"");
    }
    if !latent_space && !is_sd && !ts && in_channels != 3 && in_channels != 1 {
        ctx.error("model.extras.in_channels", format!("pixel-space spectrograms have 3 channels (diffusion reads every output type as RGB), not {in_channels}"));
    }
    if !latent_space && !is_sd && !ts && in_channels == 1 {
        ctx.error(
            "model.extras.in_channels",
            "pixel-space spectrograms are read as RGB: `in_channels` must be 3",
        )
        .help = Some(format!(
            "output type \"{output_type}\" is converted to 3 channels, as the reference does"
        ));
    }
    if ts && d.dataset.cache_dir.is_some() {
        ctx.warn(
            "dataset.cache_dir",
            "`dataset.cache_dir` has no effect on time series: they are stored decoded (`.npy` files or float columns); the cache holds decoded images",
        );
    }
    if ts {
        for (key, on) in [("center_crop", center_crop), ("random_flip", random_flip)] {
            if on {
                ctx.error(&format!("dataset.{key}"), format!("`{key}` transforms images; time series are read whole (every sample must be {n_eeg_channels} × {sequence_length})"))
                    .help = Some(format!("remove `{key}`, or use `dataset.extras.gaussian_noise_std` to augment time series"));
            }
        }
    } else if gaussian_noise_std > 0.0 {
        ctx.error("dataset.extras.gaussian_noise_std", "`gaussian_noise_std` adds noise to time series (x + N(0, std²)); spectrograms are augmented by `random_flip` and random crops")
            .help = Some("remove it, or train on time series (`data_type = \"timeseries\"`)".into());
    }
    if ts && in_channels != 1 && !latent_space {
        ctx.error("model.extras.in_channels", format!("time series enter the model as (1, {n_eeg_channels}, {sequence_length}): `in_channels` must be 1"));
    }
    if in_channels != out_channels {
        ctx.error("model.extras.out_channels", format!("`out_channels` = {out_channels} must equal `in_channels` = {in_channels}: the model predicts a tensor shaped like its input"));
    }
    let custom = matches!(
        name_m,
        DiffusionModel::Dit | DiffusionModel::Hourglass | DiffusionModel::LocalMamba
    );
    if custom && !ts && sample_size != resolution && !latent_space {
        ctx.error("model.sample_size", format!("`model.sample_size` = {sample_size} must equal `dataset.resolution` = {resolution} for pixel-space {}", match name_m {
            DiffusionModel::Dit => "DiT",
            DiffusionModel::Hourglass => "hourglass",
            _ => "LocalMamba",
        }))
            .help = Some(format!("set `sample_size = {resolution}` (the reference's baseline preset has this bug)"));
    }
    if name_m == DiffusionModel::Dit {
        let hw = if ts {
            [n_eeg_channels, sequence_length]
        } else {
            [resolution, resolution]
        };
        let grid = if latent_space {
            [sample_size, sample_size]
        } else {
            hw
        };
        for (axis, (n, p)) in ["height", "width"]
            .iter()
            .zip(grid.iter().zip(patch_size.iter()))
        {
            if n % p != 0 {
                ctx.error(
                    "model.extras.patch_size",
                    format!("the input {axis} {n} is not divisible by the patch size {p}"),
                )
                .help = Some(format!("choose a patch size that divides {n}"));
            }
        }
    }
    if matches!(
        name_m,
        DiffusionModel::Hourglass | DiffusionModel::LocalMamba
    ) {
        let levels = if name_m == DiffusionModel::Hourglass {
            &widths
        } else {
            &dims
        };
        if levels.len() != depths.len() {
            let key = if name_m == DiffusionModel::Hourglass {
                "model.extras.widths"
            } else {
                "model.extras.dims"
            };
            ctx.error(key, format!("{} levels in `{key}` but {} in `model.extras.depths`: give one depth per level", levels.len(), depths.len()));
        }
        if name_m == DiffusionModel::LocalMamba {
            for scan in &d.model.scan_directions {
                let base = scan.strip_suffix("_flip").unwrap_or(scan);
                let window = base.strip_prefix('w').and_then(|k| k.parse::<usize>().ok());
                if !(base == "h" || base == "v" || window.is_some_and(|k| k >= 1)) {
                    ctx.error("model.extras.scan_directions", format!("unknown scan direction `{scan}`: expected h, v or wK (K×K windows), each optionally with `_flip`"));
                }
            }
            if d.model.scan_directions.is_empty() {
                ctx.error(
                    "model.extras.scan_directions",
                    "LocalMamba needs at least one scan direction",
                );
            }
        }
        // Patched, then halved by each merge: every level's grid must be whole.
        let [h, w] = d.input_hw();
        let merges = depths.len().max(1) - 1;
        let step = [patch_size[0] << merges, patch_size[1] << merges];
        if !h.is_multiple_of(step[0]) || !w.is_multiple_of(step[1]) {
            ctx.error("model.extras.patch_size", format!("the {h}×{w} input in patches of {patch_size:?} does not halve {merges} times: every level but the last merges 2×2 tokens"))
                .help = Some(format!("the input's sides must be multiples of {} × {}", step[0], step[1]));
        }
        for (i, (&k, kind)) in d
            .model
            .kernel_sizes
            .iter()
            .zip(&d.model.attention)
            .enumerate()
        {
            let (gh, gw) = ((h / patch_size[0]) >> i, (w / patch_size[1]) >> i);
            if kind == "shifted-window" && (!gh.is_multiple_of(k) || !gw.is_multiple_of(k)) {
                ctx.error(
                    "model.extras.self_attns",
                    format!("level {i}'s {gh}×{gw} token grid does not split into {k}×{k} windows"),
                )
                .help = Some("choose a window_size that divides the level's grid".into());
            }
            if kind == "neighborhood" && (gh < k || gw < k) {
                ctx.error("model.extras.self_attns", format!("level {i}'s {gh}×{gw} token grid is smaller than its {k}×{k} neighbourhood"))
                    .help = Some("use a smaller kernel_size, or global attention at that level".into());
            }
        }
    }
    if matches!(
        name_m,
        DiffusionModel::Dit | DiffusionModel::StableDiffusion35
    ) && !(num_attention_heads * attention_head_dim).is_multiple_of(2)
    {
        ctx.error(
            "model.extras.attention_head_dim",
            "heads × head_dim must be even (2-D sin-cos positions split the width in halves)",
        );
    }
    if cfg_scale < 1.0 && ctx.loc("inference.cfg_scale").is_some() {
        ctx.error(
            "inference.cfg_scale",
            format!("`inference.cfg_scale` = {cfg_scale} is below 1; 1 means no guidance"),
        );
    }
}
