//! The diffusion trainer's config: its sections and `read_diffusion`.

use serde::Serialize;

use crate::choice::{
    self, BetaSchedule, Choice, CompileMode, Conditioning, DataType, DatasetType, DiffusionModel,
    EvalStrategy, FeedForward, Guidance, LoraBias, LrSchedule, MixedPrecision, NoiseScheduler,
    Objective, OptimizerName, Sampler,
};
use crate::diag::Sources;
use crate::literal::literal;
use crate::settings::{Env, Settings};
use crate::tree::{Ctx, Section};

use super::{read_data_overrides, read_optimizer, read_scheduler, Optimizer, Scheduler};

literal! {
    #[derive(Debug, Clone, Serialize)]
    pub struct DiffDataset {
        pub name: String,
        /// A `[datasets.*]` entry's directory (its spectrograms, or its time series), or a path.
        pub path: std::path::PathBuf = "dataset.name (its directory)",
        pub named: Option<String> = "dataset.name (a [datasets.*] entry)",
        pub train_split: String,
        pub val_split: Option<String>,
        pub batch_size: usize,
        pub eval_batch_size: usize = "training.eval_batch_size",
        pub num_workers: usize,
        pub resolution: usize,
        pub cache_dir: Option<String>,
        pub center_crop: bool,
        pub random_flip: bool,
        pub image_column: String,
        pub caption_column: Option<String>,
        pub class_column: Option<String>,
        pub gender_column: String,
        pub health_column: String,
        pub age_column: String,
        pub num_classes: usize = "from model.conditioning",
        pub dataset_type: DatasetType,
        pub max_train_samples: Option<usize>,
        pub max_eval_samples: Option<usize>,
        pub n_eeg_channels: usize = "dataset.extras.n_eeg_channels",
        pub sequence_length: usize = "dataset.extras.sequence_length",
        pub gaussian_noise_std: f64 = "dataset.extras.gaussian_noise_std",
    }
}

literal! {
    /// Architecture hyper-parameters; each model reads the ones it has.
    #[derive(Debug, Clone, Serialize)]
    pub struct DiffModel {
        pub name: DiffusionModel,
        pub conditioning: Conditioning,
        pub pretrained: Option<String>,
        /// The weights `pretrained` names, found at build time: a file, or the directory that
        /// holds them.
        pub pretrained_path: Option<std::path::PathBuf> = "model.pretrained (found)",
        pub revision: Option<String>,
        pub sample_size: usize,
        pub vae_tiling: bool,
        pub lora_enabled: bool = "model.lora.enabled",
        pub lora_rank: usize = "model.lora.rank",
        pub lora_alpha: f64 = "model.lora.alpha",
        pub lora_dropout: f64 = "model.lora.dropout",
        pub lora_target_modules: Vec<String> = "model.lora.target_modules",
        pub lora_bias: LoraBias = "model.lora.bias",
        pub lora_scaling: Option<f64> = "model.lora.scaling",
        pub latent_space: bool = "model.extras.latent_space",
        pub vae: Option<String> = "model.extras.vae",
        /// The VAE latent-space training encodes with, as its config.json describes it.
        pub vae_config: Option<crate::pretrained::Vae> = "model.extras.vae (its config.json)",
        pub text_encoder: Option<String> = "model.extras.text_encoder",
        /// `caption` conditioning's text encoder, as its config.json describes it.
        pub text_encoder_config: Option<crate::pretrained::ClipText> = "model.extras.text_encoder (its config.json)",
        /// Stable Diffusion 1.5's UNet, as its `unet/config.json` describes it.
        pub unet_config: Option<crate::pretrained::Unet> = "model.pretrained (its unet/config.json)",
        /// Stable Diffusion 3.5's MMDiT, as its `transformer/config.json` describes it.
        pub mmdit_config: Option<crate::pretrained::Mmdit> = "model.pretrained (its transformer/config.json)",
        /// Stable Diffusion 3.5's second text encoder (CLIP-G, `text_encoder_2/`); the first
        /// (CLIP-L) is `text_encoder_config`.
        pub text_encoder_2_config: Option<crate::pretrained::ClipText> = "model.pretrained (its text_encoder_2/config.json)",
        pub in_channels: usize = "model.extras.in_channels",
        pub out_channels: usize = "model.extras.out_channels",
        pub cfg_dropout: f64 = "model.extras.cfg_dropout",
        pub num_classes: usize = "model.extras.num_classes",
        pub num_attention_heads: usize = "model.extras.num_attention_heads",
        pub attention_head_dim: usize = "model.extras.attention_head_dim",
        pub num_layers: usize = "model.extras.num_layers",
        pub patch_size: [usize; 2] = "model.extras.patch_size",
        pub widths: Vec<usize> = "model.extras.widths",
        pub depths: Vec<usize> = "model.extras.depths",
        pub dims: Vec<usize> = "model.extras.dims",
        pub d_state: usize = "model.extras.d_state",
        pub scan_directions: Vec<String> = "model.extras.scan_directions",
        /// Hourglass: each level's attention: "neighborhood", "global", "shifted-window", "none".
        pub attention: Vec<String> = "model.extras.attention (or self_attns[i].type)",
        pub d_heads: Vec<usize> = "model.extras.self_attns[i].d_head",
        /// Each level's neighbourhood kernel or shifted window (0: global attention, none).
        pub kernel_sizes: Vec<usize> = "model.extras.self_attns[i].kernel_size (or window_size)",
        pub d_ffs: Vec<usize> = "model.extras.d_ffs",
        pub dropout_rates: Vec<f64> = "model.extras.dropout_rate",
        pub mapping_width: usize = "model.extras.mapping_width",
        pub mapping_depth: usize = "model.extras.mapping_depth",
        pub mapping_d_ff: usize = "model.extras.mapping_d_ff",
        pub mapping_dropout_rate: f64 = "model.extras.mapping_dropout_rate",
        /// The age features' width for `gend_hlth_age` (`age_embedding_dim`), else 0.
        pub mapping_cond_dim: usize = "model.extras.mapping_cond_dim",
        pub ssm_ratio: f64 = "model.extras.ssm_ratio (or expand)",
        pub d_conv: usize = "model.extras.d_conv",
        /// Δ's projection rank (`None`: "auto", ⌈width / 16⌉).
        pub ssm_dt_rank: Option<usize> = "model.extras.ssm_dt_rank",
        pub drop_path_rate: f64 = "model.extras.drop_path_rate",
        pub dropout: f64 = "model.extras.dropout",
        pub attention_bias: bool = "model.extras.attention_bias",
        pub activation_fn: FeedForward = "model.extras.activation_fn",
        pub norm_elementwise_affine: bool = "model.extras.norm_elementwise_affine",
        pub norm_eps: f64 = "model.extras.norm_eps",
        /// diffusers' f32 attention scores under mixed precision.
        pub upcast_attention: bool = "model.extras.upcast_attention",
    }
}

literal! {
    #[derive(Debug, Clone, Serialize)]
    pub struct DiffTraining {
        pub seed: u64,
        pub output_dir: Option<String>,
        pub mixed_precision: MixedPrecision,
        pub gradient_checkpointing: bool,
        pub gradient_accumulation_steps: usize,
        pub epochs: usize,
        pub max_train_steps: Option<usize>,
        pub log_every_steps: usize,
        pub checkpoint_interval: Option<usize>,
        pub checkpoint_total_limit: Option<usize>,
        pub resume: Option<String>,
        pub gradient_clip_norm: Option<f64>,
        pub ema_decay: f64,
        pub ema_power: f64,
        pub ema_inv_gamma: f64,
        pub ema_update_after_step: usize,
        pub ema_use_ema_warmup: bool,
        pub allow_tf32: bool,
        pub compile_model: bool,
        pub compile_mode: CompileMode,
        pub snr_gamma: Option<f64>,
        pub eval_num_examples: usize,
        pub eval_mmd_samples: usize,
        pub eval_mmd_fallback_ntrain: usize,
        pub eval_strategy: EvalStrategy,
        pub eval_num_steps: usize,
        pub eval_batch_size: usize,
        pub initial_eval: bool,
    }
}

literal! {
    /// `[objective]`: what the network predicts, on which noise path.
    #[derive(Debug, Clone, Serialize)]
    pub struct DiffObjective {
        pub prediction_type: Objective,
        pub scheduler: NoiseScheduler,
        pub num_timesteps: usize,
        /// A VP path's β from `beta_start` to `beta_end` over the timesteps: diffusers' DDPM
        /// default (linear, 1e-4 to 0.02), or a pretrained pipeline's `scheduler_config.json`.
        pub beta_schedule: BetaSchedule = "objective (the pipeline's scheduler_config.json)",
        pub beta_start: f64 = "objective (the pipeline's scheduler_config.json)",
        pub beta_end: f64 = "objective (the pipeline's scheduler_config.json)",
        /// The flow path's timestep shift σ' = s·σ / (1 + (s − 1)·σ): 1 (none), or a pretrained
        /// pipeline's `shift` (SD 3.5's 3.0), in training and sampling alike.
        pub flow_shift: f64 = "objective (the pipeline's scheduler_config.json)",
    }
}

literal! {
    /// `[logging]`.
    #[derive(Debug, Clone, Serialize)]
    pub struct DiffLogging {
        pub tensorboard: bool,
        /// An MLflow file-store run (runtime track/mlflow.rs).
        pub mlflow: bool,
        pub log_dir: Option<String>,
        pub wandb_project: Option<String>,
        pub wandb_entity: Option<String>,
        pub wandb_tags: Vec<String>,
        /// Parameter and gradient histograms every N optimizer steps (0: never).
        pub histogram_every_steps: usize,
        pub run_name: Option<String>,
    }
}

literal! {
    /// `[inference]`: how samples are drawn (evaluation and `sigdiff sample`).
    #[derive(Debug, Clone, Serialize)]
    pub struct DiffInference {
        pub denoising_steps: usize,
        pub cfg_scale: f64,
        pub sampler: Sampler,
        pub guidance: Guidance,
    }
}

literal! {
    #[derive(Debug, Clone, Serialize)]
    pub struct Diffusion {
        pub dataset: DiffDataset,
        pub model: DiffModel,
        pub objective: DiffObjective,
        pub optimizer: Optimizer,
        pub scheduler: Scheduler,
        pub training: DiffTraining,
        pub logging: DiffLogging,
        pub inference: DiffInference,
        /// `data.data_type = "timeseries"`.
        pub dataset_is_timeseries: bool = "data.data_type",
    }
}

pub fn read_diffusion(
    root: &Section,
    ctx: &mut Ctx,
    settings: &Settings,
    (env, sources): (&Env, &mut Sources),
) -> (Diffusion, super::Data) {
    let data = read_data_overrides(root, ctx, settings);
    let (output_type, data_type) = (data.output_type, data.data_type);
    let ts = data_type == DataType::Timeseries;
    for sec in ["dataset", "model", "objective", "training"] {
        if !root.has(sec) {
            ctx.diags.error(root.loc(), format!("missing section `[{sec}]` (diffusion configs need [dataset], [model], [objective] and [training])"));
        }
    }
    let (mut dataset, eval_batch_size_ds) = read_dataset(root, ctx);
    (dataset.path, dataset.named) = super::dataset_dir(settings, &dataset.name, data_type);
    let (model, is_sd) = read_model(root, ctx, &dataset, ts);
    let objective = read_objective(root, ctx);
    let optimizer = read_optimizer(
        root,
        ctx,
        &[
            OptimizerName::AdamW,
            OptimizerName::Adam,
            OptimizerName::Sgd,
            OptimizerName::AdamW8bit,
        ],
        1e-4,
        1e-2,
    );
    let scheduler = read_scheduler(
        root,
        ctx,
        &[
            LrSchedule::Constant,
            LrSchedule::ConstantWithWarmup,
            LrSchedule::Linear,
            LrSchedule::Cosine,
            LrSchedule::Polynomial,
        ],
    );

    let training = read_training(root, ctx, dataset.batch_size, eval_batch_size_ds);
    let logging = read_logging(root, ctx);
    let inference = read_inference(root, ctx, objective.prediction_type);
    root.finish(ctx, &[]);
    dataset.eval_batch_size = training.eval_batch_size;
    // The dataset's classes: gender × health for `gend_hlth_age`, else the model's.
    dataset.num_classes = match model.conditioning {
        Conditioning::GenderHealthAge => 4,
        Conditioning::None | Conditioning::Caption | Conditioning::Classes => model.num_classes,
    };
    let mut diff = Diffusion {
        dataset,
        model,
        objective,
        optimizer,
        scheduler,
        training,
        logging,
        inference,
        dataset_is_timeseries: ts,
    };
    // A Stable Diffusion pipeline's denoiser config and scheduler first: its VAE and text
    // encoders are read from the same pipeline.
    match diff.model.name {
        DiffusionModel::StableDiffusion15 => read_sd15(ctx, env, sources, root, &mut diff),
        DiffusionModel::StableDiffusion35 => read_sd35(ctx, env, sources, root, &mut diff),
        _ => {}
    }
    if diff.model.latent_space || is_sd {
        read_latent_space(ctx, env, sources, settings, &mut diff);
    }
    // Without a caption column diffusion_rules.rs reports that first.
    if diff.model.conditioning == Conditioning::Caption && diff.dataset.caption_column.is_some() {
        read_text_encoder(ctx, env, sources, settings, &mut diff.model);
    }
    check_text_widths(ctx, &diff.model);
    if let (Some(spec), false) = (diff.model.pretrained.clone(), is_sd) {
        let files = crate::pretrained::weight_files(diff.model.name);
        diff.model.pretrained_path = crate::pretrained::read_pretrained(
            ctx,
            env,
            sources,
            &spec,
            diff.model.revision.as_deref(),
            &files,
        );
    }
    super::diffusion_rules::check(ctx, &diff, is_sd, settings, output_type);
    (diff, data)
}

/// `caption` conditioning's text encoder: `model.extras.text_encoder`, else the text encoder of
/// the settings' Stable Diffusion model (its `text_encoder/` and `tokenizer/`).
fn read_text_encoder(
    ctx: &mut Ctx,
    env: &Env,
    sources: &mut Sources,
    settings: &Settings,
    m: &mut DiffModel,
) {
    let (spec, key) = match (
        &m.text_encoder,
        settings.hf_models.get("stable_diffusion_model_id"),
    ) {
        (Some(t), _) => (t.clone(), "model.extras.text_encoder"),
        // A Stable Diffusion pipeline's own `text_encoder/` and `tokenizer/`.
        (None, _) if is_stable_diffusion(m.name) => match sd_pipeline(m) {
            Some(p) => (p, "model.pretrained"),
            None => return,
        },
        (None, Some(id)) => (id.clone(), "model.conditioning"),
        (None, None) => {
            ctx.error("model.conditioning", "caption conditioning needs a text encoder: set `model.extras.text_encoder` (a CLIP text encoder's directory, or a Hugging Face id)");
            return;
        }
    };
    let revision = m.revision.as_deref();
    m.text_encoder_config = crate::pretrained::read_clip_text(
        ctx,
        env,
        sources,
        (&spec, key),
        revision,
        "text_encoder",
    );
    // SD 3.5 embeds captions with CLIP-L and CLIP-G (T5 is not loaded).
    if m.name == DiffusionModel::StableDiffusion35 {
        m.text_encoder_2_config = crate::pretrained::read_clip_text(
            ctx,
            env,
            sources,
            (&spec, key),
            revision,
            "text_encoder_2",
        );
    }
    // The hourglass-shaped models take the pooled embedding through `mapping_cond_in_proj`.
    if let (Some(t), DiffusionModel::Hourglass | DiffusionModel::LocalMamba) =
        (&m.text_encoder_config, m.name)
    {
        let pooled = t.pooled_dim();
        if m.mapping_cond_dim != 0 && m.mapping_cond_dim != pooled {
            let key = match ctx.loc("model.extras.mapping_cond") {
                Some(_) => "model.extras.mapping_cond",
                None => "model.extras.mapping_cond_dim",
            };
            let config = t.dir.join("config.json");
            ctx.error(
                key,
                format!(
                    "the caption embedding is {} wide, but the text encoder's pooled embedding has {pooled} values ({})",
                    m.mapping_cond_dim,
                    config.display()
                ),
            )
            .help = Some("remove it: the text encoder's config.json decides it (the reference's 2048 is CLIP-L's pooled embedding followed by CLIP-G's; ours embeds captions with one CLIP text encoder)".into());
        }
        m.mapping_cond_dim = pooled;
    }
}

/// The VAE of a latent-space model (`model.extras.vae`, else the settings' Stable Diffusion
/// model's), and what it fixes: the input channels (the latent channels, as the contract's Note
/// 2 says: written ones must agree) and the latent side (resolution / the VAE's downscale).
fn read_latent_space(
    ctx: &mut Ctx,
    env: &Env,
    sources: &mut Sources,
    settings: &Settings,
    d: &mut Diffusion,
) {
    if d.dataset_is_timeseries {
        ctx.error(
            "model.extras.latent_space",
            "latent space needs images: a VAE encodes RGB spectrograms, not time series",
        )
        .help = Some("train time series in pixel space: `latent_space = false`".into());
        return;
    }
    let m = &mut d.model;
    let (spec, key) = match (&m.vae, settings.hf_models.get("stable_diffusion_model_id")) {
        (Some(v), _) => (v.clone(), "model.extras.vae"),
        // A Stable Diffusion pipeline's own `vae/`.
        (None, _) if is_stable_diffusion(m.name) => match sd_pipeline(m) {
            Some(p) => (p, "model.pretrained"),
            None => return,
        },
        (None, Some(id)) => (id.clone(), "model.extras.latent_space"),
        (None, None) => return, // diffusion_rules.rs asks for a VAE.
    };
    let Some(vae) =
        crate::pretrained::read_vae(ctx, env, sources, (&spec, key), m.revision.as_deref())
    else {
        return;
    };
    let config = vae.dir.join("config.json");
    if vae.in_channels != 3 {
        ctx.error(
            key,
            format!(
                "{}: the VAE encodes {} channels; spectrograms are read as RGB (3)",
                config.display(),
                vae.in_channels
            ),
        );
    }
    for (k, value) in [
        ("in_channels", m.in_channels),
        ("out_channels", m.out_channels),
    ] {
        let key = format!("model.extras.{k}");
        if ctx.loc(&key).is_some() && value != vae.latent_channels {
            ctx.error(
                &key,
                format!(
                    "`{k}` = {value}, but the VAE's latents have {} channels ({})",
                    vae.latent_channels,
                    config.display()
                ),
            )
            .help = Some(format!(
                "remove `{k}` (it is read from the VAE) or set it to {}",
                vae.latent_channels
            ));
        }
    }
    (m.in_channels, m.out_channels) = (vae.latent_channels, vae.latent_channels);
    let (resolution, down) = (d.dataset.resolution, vae.downscale());
    if !resolution.is_multiple_of(down) {
        ctx.error(
            "dataset.resolution",
            format!("`resolution` = {resolution} is not a multiple of the VAE's downscale {down}"),
        )
        .help = Some(format!(
            "use a multiple of {down}, such as {}",
            resolution.next_multiple_of(down)
        ));
        return;
    }
    let side = resolution / down;
    if ctx.loc("model.sample_size").is_some() && m.sample_size != side {
        ctx.error("model.sample_size", format!("`sample_size` = {} is not the latent side: resolution {resolution} / the VAE's downscale {down} = {side}", m.sample_size))
            .help = Some(format!("set `sample_size = {side}`, or remove it (it is computed)"));
    }
    m.sample_size = side;
    if let Some(unet) = &m.unet_config {
        let unet_config = unet.dir.join("config.json");
        if (unet.in_channels, unet.out_channels) != (vae.latent_channels, vae.latent_channels) {
            ctx.error(
                pipeline_key(ctx, "model.extras.vae"),
                format!(
                    "the UNet maps {} to {} channels ({}), but the VAE's latents have {} ({})",
                    unet.in_channels,
                    unet.out_channels,
                    unet_config.display(),
                    vae.latent_channels,
                    config.display()
                ),
            )
            .help = Some("use the pipeline's own VAE: remove `model.extras.vae`".into());
        }
        let halvings = unet.block_out_channels.len() - 1;
        if !side.is_multiple_of(1 << halvings) {
            ctx.error(
                "dataset.resolution",
                format!("the {side}×{side} latents do not halve {halvings} times through the UNet's levels ({})", unet_config.display()),
            )
            .help = Some(format!(
                "use a resolution that is a multiple of {}",
                down << halvings
            ));
        }
    }
    if let Some(mmdit) = &m.mmdit_config {
        let transformer_config = mmdit.dir.join("config.json");
        if (mmdit.in_channels, mmdit.out_channels) != (vae.latent_channels, vae.latent_channels) {
            ctx.error(
                pipeline_key(ctx, "model.extras.vae"),
                format!(
                    "the transformer maps {} to {} channels ({}), but the VAE's latents have {} ({})",
                    mmdit.in_channels,
                    mmdit.out_channels,
                    transformer_config.display(),
                    vae.latent_channels,
                    config.display()
                ),
            )
            .help = Some("use the pipeline's own VAE: remove `model.extras.vae`".into());
        }
        let (patch, max) = (mmdit.patch_size, mmdit.pos_embed_max_size);
        if !side.is_multiple_of(patch) {
            ctx.error(
                "dataset.resolution",
                format!(
                    "the {side}×{side} latents are not whole {patch}×{patch} patches ({})",
                    transformer_config.display()
                ),
            )
            .help = Some(format!(
                "use a resolution that is a multiple of {}",
                down * patch
            ));
        } else if side / patch > max {
            ctx.error(
                "dataset.resolution",
                format!(
                    "the {side}×{side} latents are {0}×{0} patches, more than the transformer's position table ({max}×{max}, {1})",
                    side / patch,
                    transformer_config.display()
                ),
            )
            .help = Some(format!("use a resolution of at most {}", max * patch * down));
        }
    }
    m.vae_config = Some(vae);
}

/// The Stable Diffusion pipeline its parts are read from: `model.pretrained` once its UNet or
/// transformer was found (`None` when it was not: `read_sd15` / `read_sd35` reported that, and
/// nothing else is looked for).
fn sd_pipeline(m: &DiffModel) -> Option<String> {
    (m.unet_config.is_some() || m.mmdit_config.is_some())
        .then(|| m.pretrained.clone())
        .flatten()
}

fn is_stable_diffusion(name: DiffusionModel) -> bool {
    matches!(
        name,
        DiffusionModel::StableDiffusion15 | DiffusionModel::StableDiffusion35
    )
}

/// The denoiser's text inputs against the text encoders that feed them: SD 1.5's UNet attends
/// to its encoder's states; SD 3.5's MMDiT reads CLIP-L's and CLIP-G's states side by side
/// (zero-padded to its joint width, of the same token count) and their pooled embeddings
/// side by side.
fn check_text_widths(ctx: &mut Ctx, m: &DiffModel) {
    let config = |dir: &std::path::Path| dir.join("config.json").display().to_string();
    if let (Some(unet), Some(text)) = (&m.unet_config, &m.text_encoder_config) {
        if unet.cross_attention_dim != text.hidden_size {
            let key = pipeline_key(ctx, "model.extras.text_encoder");
            ctx.error(
                key,
                format!(
                    "the UNet attends to {}-wide text states ({}), but the text encoder's are {} wide ({})",
                    unet.cross_attention_dim,
                    config(&unet.dir),
                    text.hidden_size,
                    config(&text.dir)
                ),
            )
            .help = Some("use the pipeline's own text encoder: remove `model.extras.text_encoder`".into());
        }
    }
    let (Some(mmdit), Some(l), Some(g)) = (
        &m.mmdit_config,
        &m.text_encoder_config,
        &m.text_encoder_2_config,
    ) else {
        return;
    };
    let (both, files) = (
        format!("{} and {}", config(&l.dir), config(&g.dir)),
        config(&mmdit.dir),
    );
    let pooled = l.pooled_dim() + g.pooled_dim();
    if pooled != mmdit.pooled_projection_dim {
        ctx.error(
            "model.pretrained",
            format!(
                "the transformer reads a {}-wide pooled text vector ({files}), but the two text encoders' pooled embeddings are {} + {} = {pooled} wide ({both})",
                mmdit.pooled_projection_dim,
                l.pooled_dim(),
                g.pooled_dim()
            ),
        );
    }
    let width = l.hidden_size + g.hidden_size;
    if width > mmdit.joint_attention_dim {
        ctx.error(
            "model.pretrained",
            format!(
                "the two text encoders' states are {} + {} = {width} wide ({both}), more than the transformer's joint_attention_dim {} ({files})",
                l.hidden_size, g.hidden_size, mmdit.joint_attention_dim
            ),
        );
    }
    if l.max_position_embeddings != g.max_position_embeddings {
        ctx.error(
            "model.pretrained",
            format!(
                "the two text encoders read {} and {} tokens ({both}); their states are joined token by token",
                l.max_position_embeddings, g.max_position_embeddings
            ),
        );
    }
}

/// `key` when the config sets it, else `model.pretrained` (the pipeline that supplied the part).
fn pipeline_key<'a>(ctx: &Ctx, key: &'a str) -> &'a str {
    match ctx.loc(key) {
        Some(_) => key,
        None => "model.pretrained",
    }
}

/// What one Stable Diffusion version's pipeline holds, for `read_pipeline`.
struct Pipeline<T> {
    version: &'static str,
    /// The denoiser's subfolder and what it is called in errors.
    subfolder: &'static str,
    denoiser: &'static str,
    /// The class its config must describe (the help of a config that does not parse).
    class: &'static str,
    /// The subfolders a user downloads, and the hub id of the published pipeline.
    parts: &'static str,
    hub_id: &'static str,
    parse: fn(&str, &std::path::Path) -> Result<T, String>,
}

/// A Stable Diffusion pipeline's denoiser config: `model.pretrained` (a directory or a Hugging
/// Face id) `/<subfolder>/config.json`, parsed; `None` when it was reported missing or wrong. Its
/// weights are read when training starts (a cache of configurations builds, as the latent-space
/// VAE's does; a missing file is then a run-time error naming the directory).
fn read_pipeline<T>(
    ctx: &mut Ctx,
    env: &Env,
    sources: &mut Sources,
    m: &DiffModel,
    p: &Pipeline<T>,
) -> Option<(std::path::PathBuf, T)> {
    let key = "model.pretrained";
    let Some(spec) = m.pretrained.clone() else {
        ctx.error(
            "model.name",
            format!("Stable Diffusion {} fine-tunes a pretrained pipeline, but `model.pretrained` is not set", p.version),
        )
        .help = Some(format!("set `model.pretrained` to a local diffusers pipeline directory (with {}), or its Hugging Face id in the local cache", p.parts.replace('*', "")));
        return None;
    };
    let include: Vec<String> = p
        .parts
        .split(' ')
        .map(|part| format!("\"{part}\""))
        .collect();
    let help = format!("download it on a connected machine (`huggingface-cli download {} --include {}`) and copy the cache (HF_HOME), or set `model.pretrained` to the pipeline's directory", p.hub_id, include.join(" "));
    let (dir, text) = crate::pretrained::read_config(
        ctx,
        env,
        sources,
        (&spec, key, m.revision.as_deref()),
        (p.denoiser, p.subfolder),
        help,
    )?;
    match (p.parse)(&text, &dir) {
        Ok(config) => Some((dir, config)),
        Err(why) => {
            ctx.error(key, format!("{}: {why}", dir.join("config.json").display()))
                .help = Some(format!(
                "the {} must be a diffusers {}",
                p.subfolder, p.class
            ));
            None
        }
    }
}

/// Stable Diffusion 1.5's pipeline: its `unet/config.json` and the β schedule of its
/// `scheduler/scheduler_config.json` (SD 1.5's published one when the pipeline has none). Its
/// VAE and text encoder are read by `read_latent_space` and `read_text_encoder`.
fn read_sd15(ctx: &mut Ctx, env: &Env, sources: &mut Sources, root: &Section, d: &mut Diffusion) {
    let pipeline = Pipeline {
        version: "1.5",
        subfolder: "unet",
        denoiser: "Stable Diffusion UNet",
        class: "UNet2DConditionModel of Stable Diffusion 1.5's kind",
        parts: "unet/* vae/* text_encoder/* tokenizer/* scheduler/*",
        hub_id: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        parse: crate::pretrained::parse_unet,
    };
    let Some((dir, unet)) = read_pipeline(ctx, env, sources, &d.model, &pipeline) else {
        return;
    };
    let extras = root.section(ctx, "model").section(ctx, "extras");
    check_sd15_extras(ctx, &extras, &unet);
    read_scheduler_config(ctx, env, sources, &dir, &mut d.objective, d.model.name);
    d.model.pretrained_path = Some(dir);
    d.model.unet_config = Some(unet);
    // Stable Diffusion trains in its VAE's latent space, always.
    d.model.latent_space = true;
}

/// Stable Diffusion 3.5's pipeline: its `transformer/config.json` and the timestep shift of its
/// `scheduler/scheduler_config.json` (SD 3.5's published 3.0 when the pipeline has none). Its
/// VAE and its two CLIP text encoders are read by `read_latent_space` and `read_text_encoder`.
fn read_sd35(ctx: &mut Ctx, env: &Env, sources: &mut Sources, root: &Section, d: &mut Diffusion) {
    let pipeline = Pipeline {
        version: "3.5",
        subfolder: "transformer",
        denoiser: "Stable Diffusion 3 transformer",
        class: "SD3Transformer2DModel (Stable Diffusion 3 or 3.5)",
        parts: "transformer/* vae/* text_encoder/* text_encoder_2/* tokenizer/* tokenizer_2/* scheduler/*",
        hub_id: "stabilityai/stable-diffusion-3.5-medium",
        parse: crate::pretrained::parse_mmdit,
    };
    let Some((dir, mmdit)) = read_pipeline(ctx, env, sources, &d.model, &pipeline) else {
        return;
    };
    let extras = root.section(ctx, "model").section(ctx, "extras");
    check_sd35_extras(ctx, &extras, &mmdit);
    read_scheduler_config(ctx, env, sources, &dir, &mut d.objective, d.model.name);
    d.model.pretrained_path = Some(dir);
    d.model.mmdit_config = Some(mmdit);
    d.model.latent_space = true;
}

/// The contract's SD 3.5 `[model.extras]` keys: the transformer's shape (its config.json
/// decides it; written, it must agree), T5 (not loaded: `skip_t5` must stay true) and the text
/// encoders' training (not built).
fn check_sd35_extras(ctx: &mut Ctx, x: &Section, m: &crate::pretrained::Mmdit) {
    let config = m.dir.join("config.json");
    for (k, value) in [
        ("num_layers", m.num_layers),
        ("attention_head_dim", m.attention_head_dim),
        ("num_attention_heads", m.num_attention_heads),
        ("joint_attention_dim", m.joint_attention_dim),
        ("caption_projection_dim", m.dim()),
        ("pooled_projection_dim", m.pooled_projection_dim),
    ] {
        match x.count_opt(ctx, k, 1) {
            Some(n) if n != value => {
                ctx.error(
                    &format!("model.extras.{k}"),
                    format!(
                        "`{k}` = {n}, but the pretrained transformer's is {value} ({})",
                        config.display()
                    ),
                )
                .help = Some("remove it: the transformer's config.json decides it".into());
            }
            _ => {}
        }
    }
    if !x.bool_or(ctx, "skip_t5", true) {
        ctx.error(
            "model.extras.skip_t5",
            "not yet supported: the T5 text encoder (`text_encoder_3`); captions are embedded by CLIP-L and CLIP-G, with zeros where T5's tokens go, as diffusers' StableDiffusion3Pipeline does without T5",
        )
        .help = Some("set `skip_t5 = true` (or remove it)".into());
    }
    check_frozen_text_encoder(ctx, x);
}

/// The contract's SD 1.5 `[model.extras]` keys: the UNet's shape (the pipeline's config decides
/// it; written, it must agree) and the text encoder's training (not built: it stays frozen).
fn check_sd15_extras(ctx: &mut Ctx, x: &Section, unet: &crate::pretrained::Unet) {
    let config = unet.dir.join("config.json");
    if let Some(channels) = x.int_list(ctx, "block_out_channels") {
        let channels: Vec<usize> = channels.iter().map(|&c| c.max(0) as usize).collect();
        if channels != unet.block_out_channels {
            ctx.error(
                "model.extras.block_out_channels",
                format!(
                    "`block_out_channels` = {channels:?}, but the pretrained UNet's are {:?} ({})",
                    unet.block_out_channels,
                    config.display()
                ),
            )
            .help = Some("remove it: the UNet's config.json decides it".into());
        }
    }
    if let Some(n) = x.count_opt(ctx, "num_res_blocks", 1) {
        if n != unet.layers_per_block {
            ctx.error(
                "model.extras.num_res_blocks",
                format!(
                    "`num_res_blocks` = {n}, but the pretrained UNet has {} per level ({})",
                    unet.layers_per_block,
                    config.display()
                ),
            )
            .help = Some("remove it: the UNet's config.json decides it".into());
        }
    }
    check_frozen_text_encoder(ctx, x);
}

/// `train_text_encoder` (not built: the text encoders stay frozen) and its learning rate.
fn check_frozen_text_encoder(ctx: &mut Ctx, x: &Section) {
    let trains_text = x.bool_or(ctx, "train_text_encoder", false);
    if trains_text {
        ctx.error(
            "model.extras.train_text_encoder",
            "not yet supported: training the text encoder (it is frozen: each caption is embedded once per run)",
        )
        .help = Some("remove it; LoRA on the UNet (`[model.lora]`) adapts the model to the captions".into());
    }
    if x.float(ctx, "text_encoder_lr_scale").is_some() && !trains_text {
        ctx.error(
            "model.extras.text_encoder_lr_scale",
            "`text_encoder_lr_scale` has no effect: the text encoder is frozen",
        )
        .help = Some("remove it".into());
    }
}

/// The noise schedule of the `scheduler/scheduler_config.json` beside a pipeline's `unet/` or
/// `transformer/`, checked against `[objective]`: SD 1.5's β (its published scaled-linear
/// 0.00085 → 0.012 over 1000 steps, ε-prediction, when there is none); SD 3.5's flow shift (its
/// published 3.0 when there is none).
fn read_scheduler_config(
    ctx: &mut Ctx,
    env: &Env,
    sources: &mut Sources,
    denoiser_dir: &std::path::Path,
    o: &mut DiffObjective,
    model: DiffusionModel,
) {
    let flow = model == DiffusionModel::StableDiffusion35;
    (o.beta_schedule, o.beta_start, o.beta_end) = (BetaSchedule::ScaledLinear, 0.00085, 0.012);
    o.flow_shift = if flow { 3.0 } else { 1.0 };
    let path = denoiser_dir
        .with_file_name("scheduler")
        .join("scheduler_config.json");
    let in_pipeline = denoiser_dir
        .file_name()
        .is_some_and(|n| n == "unet" || n == "transformer");
    let text = match in_pipeline {
        true => env.read(&path).ok(),
        false => None,
    };
    let Some(text) = text else { return };
    sources.add(path.display().to_string(), Some(path.clone()), text.clone());
    let at = path.display();
    let v: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            ctx.error("model.pretrained", format!("{at}: not JSON: {e}"));
            return;
        }
    };
    if flow {
        read_flow_shift(ctx, &v, &at.to_string(), o);
    } else {
        read_betas(ctx, &v, &at.to_string(), o);
    }
    let steps = v["num_train_timesteps"].as_u64().unwrap_or(1000) as usize;
    if steps != o.num_timesteps {
        match ctx.loc("objective.num_timesteps") {
            Some(_) => {
                ctx.error(
                    "objective.num_timesteps",
                    format!(
                        "`num_timesteps` = {}, but the pipeline was trained over {steps} ({at})",
                        o.num_timesteps
                    ),
                )
                .help = Some("remove it (the pipeline's scheduler config gives it)".into());
            }
            None => o.num_timesteps = steps,
        }
    }
}

/// SD 1.5's DDPM-family scheduler: its β schedule, and ε-prediction.
fn read_betas(ctx: &mut Ctx, v: &serde_json::Value, at: &str, o: &mut DiffObjective) {
    match v["beta_schedule"].as_str().unwrap_or("linear") {
        "linear" => o.beta_schedule = BetaSchedule::Linear,
        "scaled_linear" => o.beta_schedule = BetaSchedule::ScaledLinear,
        other => {
            ctx.error(
                "model.pretrained",
                format!("{at}: `beta_schedule` is \"{other}\"; the VP paths built are \"linear\" and \"scaled_linear\""),
            );
        }
    }
    o.beta_start = v["beta_start"].as_f64().unwrap_or(0.0001);
    o.beta_end = v["beta_end"].as_f64().unwrap_or(0.02);
    if !(0.0 < o.beta_start && o.beta_start < o.beta_end && o.beta_end < 1.0) {
        ctx.error(
            "model.pretrained",
            format!(
                "{at}: β must rise within (0, 1), not from {} to {}",
                o.beta_start, o.beta_end
            ),
        );
    }
    let predicts = v["prediction_type"].as_str().unwrap_or("epsilon");
    if predicts != "epsilon" {
        ctx.error(
            "model.pretrained",
            format!("{at}: the pipeline predicts `{predicts}`; Stable Diffusion 1.5 fine-tuning trains ε-prediction"),
        );
    }
}

/// SD 3.5's `FlowMatchEulerDiscreteScheduler`: its static timestep shift.
fn read_flow_shift(ctx: &mut Ctx, v: &serde_json::Value, at: &str, o: &mut DiffObjective) {
    let class = v["_class_name"]
        .as_str()
        .unwrap_or("FlowMatchEulerDiscreteScheduler");
    if class != "FlowMatchEulerDiscreteScheduler" {
        ctx.error(
            "model.pretrained",
            format!("{at}: the pipeline's scheduler is `{class}`; Stable Diffusion 3.5 trains on FlowMatchEulerDiscreteScheduler's rectified flow"),
        );
    }
    if v["use_dynamic_shifting"].as_bool() == Some(true) {
        ctx.error(
            "model.pretrained",
            format!("{at}: not yet supported: `use_dynamic_shifting` (a resolution-dependent shift); the static `shift` is built"),
        );
    }
    o.flow_shift = v["shift"].as_f64().unwrap_or(1.0);
    if !(o.flow_shift > 0.0 && o.flow_shift.is_finite()) {
        ctx.error(
            "model.pretrained",
            format!("{at}: `shift` must be positive, not {}", o.flow_shift),
        );
    }
}

fn nonempty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

/// `[dataset]`: the dataset directory, its columns and the loader; also the dataset's own
/// `eval_batch_size` (training's wins).
fn read_dataset(root: &Section, ctx: &mut Ctx) -> (DiffDataset, Option<usize>) {
    let d = root.section(ctx, "dataset");
    let name = nonempty(d.string(ctx, "name"))
        .or(nonempty(d.string(ctx, "identifier")))
        .unwrap_or_default();
    if d.is_present() && name.is_empty() {
        ctx.diags.error(
            d.loc(),
            "`dataset.name` is required: the preprocessed dataset directory",
        );
    }
    let train_split = nonempty(d.string(ctx, "train_split")).unwrap_or_else(|| "train".into());
    let val_split = nonempty(d.string(ctx, "val_split"));
    let batch_size = d.count(ctx, "batch_size", 4, 1);
    let eval_batch_size_ds = d.count_opt(ctx, "eval_batch_size", 1);
    let num_workers = d.count(ctx, "num_workers", 4, 0);
    let resolution = d.count(ctx, "resolution", 256, 8);
    let cache_dir = nonempty(d.string(ctx, "cache_dir"));
    let center_crop = d.bool_or(ctx, "center_crop", false);
    let random_flip = d.bool_or(ctx, "random_flip", false);
    let image_column = d.string_or(ctx, "image_column", "image");
    let caption_column = match d.string(ctx, "caption_column") {
        None => Some("text".to_string()),
        Some(s) if s.is_empty() => None,
        Some(s) => Some(s),
    };
    let class_column = nonempty(d.string(ctx, "class_column"));
    let gender_column = d.string_or(ctx, "gender_column", "gender");
    let health_column = d.string_or(ctx, "health_column", "health");
    let age_column = d.string_or(ctx, "age_column", "age");
    let num_classes_ds = d.count(ctx, "num_classes", 0, 0);
    let dataset_type = d.pick(ctx, "dataset_type", DatasetType::Auto, DatasetType::ALL);
    let max_train_samples = d.count_opt(ctx, "max_train_samples", 1);
    let max_eval_samples = d.count_opt(ctx, "max_eval_samples", 1);
    let de = d.section(ctx, "extras");
    let n_eeg_channels = de.count(ctx, "n_eeg_channels", 20, 1);
    let sequence_length = de.count(ctx, "sequence_length", resolution, 8);
    let gaussian_noise_std = de.float_in(ctx, "gaussian_noise_std", 0.0, 0.0, 10.0);
    de.finish(ctx, &[]);
    d.finish(ctx, &[]);
    let dataset = DiffDataset {
        // Where the name points is resolved with the settings (read_diffusion).
        path: std::path::PathBuf::new(),
        named: None,
        name,
        train_split,
        val_split,
        batch_size,
        // `training.eval_batch_size` wins when set (read_diffusion).
        eval_batch_size: eval_batch_size_ds.unwrap_or(batch_size),
        num_workers,
        resolution,
        cache_dir,
        center_crop,
        random_flip,
        image_column,
        caption_column,
        class_column,
        gender_column,
        health_column,
        age_column,
        num_classes: num_classes_ds,
        dataset_type,
        max_train_samples,
        max_eval_samples,
        n_eeg_channels,
        sequence_length,
        gaussian_noise_std,
    };
    (dataset, eval_batch_size_ds)
}

impl Diffusion {
    /// The model's input height and width: EEG channels × samples for time series, else the
    /// resolution (the latent sample size in latent space).
    pub fn input_hw(&self) -> [usize; 2] {
        if self.dataset_is_timeseries {
            [self.dataset.n_eeg_channels, self.dataset.sequence_length]
        } else if self.model.latent_space {
            [self.model.sample_size, self.model.sample_size]
        } else {
            [self.dataset.resolution, self.dataset.resolution]
        }
    }
}

/// `[model]` and its `[model.lora]` and `[model.extras]`; also whether it is a Stable Diffusion
/// model.
fn read_model(root: &Section, ctx: &mut Ctx, dataset: &DiffDataset, ts: bool) -> (DiffModel, bool) {
    let (num_classes_ds, resolution) = (dataset.num_classes, dataset.resolution);
    let m = root.section(ctx, "model");
    let name_m = m.pick(ctx, "name", DiffusionModel::Dit, DiffusionModel::ALL);
    if m.is_present() && !m.has("name") {
        ctx.diags.error(
            m.loc(),
            format!(
                "`model.name` is required (one of {})",
                choice::names(DiffusionModel::ALL).join(", ")
            ),
        );
    }
    let is_sd = matches!(
        name_m,
        DiffusionModel::StableDiffusion15 | DiffusionModel::StableDiffusion35
    );
    let conditioning = m.pick(
        ctx,
        "conditioning",
        if is_sd {
            Conditioning::Caption
        } else {
            Conditioning::None
        },
        Conditioning::ALL,
    );
    let pretrained = nonempty(m.string(ctx, "pretrained"));
    let revision = nonempty(m.string(ctx, "revision"));
    let sample_size = m.count(ctx, "sample_size", resolution, 1);
    let vae_tiling = m.bool_or(ctx, "vae_tiling", false);
    let lora = m.section(ctx, "lora");
    let lora_enabled = lora.bool_or(ctx, "enabled", false);
    let lora_rank = lora.count(ctx, "rank", 4, 1);
    let lora_alpha = lora.float(ctx, "alpha").unwrap_or(4.0);
    let lora_dropout = lora.float_in(ctx, "dropout", 0.0, 0.0, 0.999);
    let lora_target_modules = lora.string_list(ctx, "target_modules").unwrap_or_else(|| {
        ["to_q", "to_k", "to_v", "to_out.0"]
            .map(String::from)
            .to_vec()
    });
    let lora_bias = lora.pick(ctx, "bias", LoraBias::None, LoraBias::ALL);
    let lora_scaling = lora.float(ctx, "scaling");
    lora.finish(ctx, &[]);
    // The reference moves unknown top-level [model] keys into extras; `latent_space` is the one
    // its configs use, so accept it in both places.
    let latent_top = m
        .has("latent_space")
        .then(|| m.bool_or(ctx, "latent_space", false));
    let x = m.section(ctx, "extras");
    let latent_space = latent_top.unwrap_or_else(|| x.bool_or(ctx, "latent_space", false));
    if latent_top.is_some() {
        x.bool_or(ctx, "latent_space", false);
    }
    let vae = nonempty(x.string(ctx, "vae"));
    let text_encoder = nonempty(x.string(ctx, "text_encoder"));
    let default_ch = if ts { 1 } else { 3 };
    let in_channels = x.count(ctx, "in_channels", default_ch, 1);
    let out_channels = x.count(ctx, "out_channels", in_channels, 1);
    let cfg_dropout = x.float_in(
        ctx,
        "cfg_dropout",
        if name_m == DiffusionModel::StableDiffusion35 {
            0.1
        } else {
            0.0
        },
        0.0,
        1.0,
    );
    let num_classes_x = x.count_opt(ctx, "num_classes", 0);
    let num_attention_heads = x.count(ctx, "num_attention_heads", 16, 1);
    let attention_head_dim = x.count(ctx, "attention_head_dim", 72, 1);
    let num_layers = x.count(ctx, "num_layers", 28, 1);
    let patch_size = match x.node(ctx, "patch_size").map(|n| n.value.clone()) {
        None => {
            if ts {
                [1, 8]
            } else {
                [2, 2]
            }
        }
        Some(crate::tree::Value::Int(p)) if p >= 1 => [p as usize, p as usize],
        Some(_) => match x.int_list(ctx, "patch_size") {
            Some(v) if v.len() == 2 && v.iter().all(|p| *p >= 1) => [v[0] as usize, v[1] as usize],
            _ => {
                ctx.error(
                    "model.extras.patch_size",
                    "`model.extras.patch_size` must be a positive integer or a pair like [1, 8]",
                );
                [2, 2]
            }
        },
    };
    let us = |v: Option<Vec<i64>>| {
        v.map(|v| v.into_iter().map(|x| x.max(0) as usize).collect::<Vec<_>>())
    };
    let widths = us(x.int_list(ctx, "widths")).unwrap_or_else(|| vec![128, 256, 512]);
    let depths = us(x.int_list(ctx, "depths")).unwrap_or_else(|| {
        if name_m == DiffusionModel::LocalMamba {
            vec![2, 2, 9, 2]
        } else {
            vec![2, 2, 4]
        }
    });
    let dims = us(x.int_list(ctx, "dims")).unwrap_or_else(|| vec![96, 192, 384, 768]);
    let d_state = x.count(ctx, "d_state", 16, 1);
    let scan_directions = x
        .string_list(ctx, "scan_directions")
        .or(x.string_list(ctx, "scans"))
        .unwrap_or_else(|| ["h", "v", "w7"].map(String::from).to_vec());
    let mapping_width = x.count(ctx, "mapping_width", 256, 1);
    let mapping_depth = x.count(ctx, "mapping_depth", 2, 1);
    let skeleton = match name_m {
        DiffusionModel::Hourglass | DiffusionModel::LocalMamba => {
            let levels = (widths.clone(), dims.clone(), depths.clone());
            Some(super::skeleton::read(
                &x,
                ctx,
                name_m,
                conditioning,
                mapping_width,
                levels,
            ))
        }
        _ => None,
    };
    // DiT's diffusers keys.
    let dropout = x.float_in(ctx, "dropout", 0.0, 0.0, 0.999);
    let attention_bias = x.bool_or(ctx, "attention_bias", true);
    let activation_fn = x.pick(
        ctx,
        "activation_fn",
        FeedForward::GeluApproximate,
        FeedForward::ALL,
    );
    let norm_elementwise_affine = x.bool_or(ctx, "norm_elementwise_affine", false);
    let norm_eps = x.float_in(ctx, "norm_eps", 1e-5, 1e-12, 1.0);
    let upcast_attention = x.bool_or(ctx, "upcast_attention", false);
    x.count(ctx, "norm_num_groups", 32, 1);
    if x.has("norm_num_groups") && name_m == DiffusionModel::Dit {
        ctx.warn(
            "model.extras.norm_num_groups",
            "`model.extras.norm_num_groups` has no effect: a DiT's norms are adaLN-Zero layer norms, with no groups (diffusers ignores it too)",
        );
    }
    super::extras::check(&x, ctx, name_m);
    x.finish(ctx, &[]);
    m.finish(ctx, &[]);
    let num_classes = num_classes_x.unwrap_or(num_classes_ds);
    let (mut widths, mut dims, mut depths) = (widths, dims, depths);
    let s = skeleton.unwrap_or_default();
    match name_m {
        DiffusionModel::Hourglass => (widths, depths) = (s.widths, s.depths),
        DiffusionModel::LocalMamba => (dims, depths) = (s.widths, s.depths),
        _ => {}
    }
    let model = DiffModel {
        name: name_m,
        conditioning,
        pretrained,
        pretrained_path: None,
        unet_config: None,
        mmdit_config: None,
        text_encoder_2_config: None,
        revision,
        sample_size,
        vae_tiling,
        lora_enabled,
        lora_rank,
        lora_alpha,
        lora_dropout,
        lora_target_modules,
        lora_bias,
        lora_scaling,
        latent_space,
        vae,
        vae_config: None,
        text_encoder,
        text_encoder_config: None,
        in_channels,
        out_channels,
        cfg_dropout,
        num_classes,
        num_attention_heads,
        attention_head_dim,
        num_layers,
        patch_size,
        widths,
        depths,
        dims,
        d_state,
        scan_directions,
        attention: s.attention,
        d_heads: s.d_heads,
        kernel_sizes: s.kernel_sizes,
        d_ffs: s.d_ffs,
        dropout_rates: s.dropout_rates,
        mapping_width,
        mapping_depth,
        mapping_d_ff: s.mapping_d_ff,
        mapping_dropout_rate: s.mapping_dropout_rate,
        mapping_cond_dim: s.mapping_cond_dim,
        ssm_ratio: s.ssm_ratio,
        d_conv: s.d_conv,
        ssm_dt_rank: s.ssm_dt_rank,
        drop_path_rate: s.drop_path_rate,
        dropout,
        attention_bias,
        activation_fn,
        norm_elementwise_affine,
        norm_eps,
        upcast_attention,
    };
    (model, is_sd)
}

/// `[objective]`: what the network predicts, the noise path and its timesteps.
fn read_objective(root: &Section, ctx: &mut Ctx) -> DiffObjective {
    let o = root.section(ctx, "objective");
    let prediction_type = o.pick(
        ctx,
        "prediction_type",
        Objective::Epsilon,
        &[
            Objective::Epsilon,
            Objective::Sample,
            Objective::VectorField,
        ],
    );
    let scheduler = o.pick(
        ctx,
        "scheduler",
        if prediction_type == Objective::VectorField {
            NoiseScheduler::FlowMatchEuler
        } else {
            NoiseScheduler::Ddim
        },
        &[
            NoiseScheduler::Ddim,
            NoiseScheduler::Ddpm,
            NoiseScheduler::FlowMatchEuler,
        ],
    );
    let num_timesteps = o.count(ctx, "num_timesteps", 1000, 2);
    o.finish(
        ctx,
        &[(
            "flow_match_timesteps",
            "the reference reads only `num_timesteps`; use that",
        )],
    );

    DiffObjective {
        prediction_type,
        scheduler,
        num_timesteps,
        beta_schedule: BetaSchedule::Linear,
        beta_start: 1e-4,
        beta_end: 0.02,
        flow_shift: 1.0,
    }
}

/// `[training]`.
fn read_training(
    root: &Section,
    ctx: &mut Ctx,
    batch_size: usize,
    eval_batch_size_ds: Option<usize>,
) -> DiffTraining {
    let t = root.section(ctx, "training");
    let seed = t.int(ctx, "seed").map(|s| s as u64).unwrap_or(42);
    let output_dir = nonempty(t.string(ctx, "output_dir"));
    let mixed_precision = t.pick(
        ctx,
        "mixed_precision",
        MixedPrecision::Bf16,
        MixedPrecision::ALL,
    );
    let gradient_checkpointing = if t.has("grad_checkpointing") {
        t.bool_or(ctx, "grad_checkpointing", false)
    } else {
        t.bool_or(ctx, "gradient_checkpointing", false)
    };
    let gradient_accumulation_steps = t.count(ctx, "gradient_accumulation_steps", 1, 1);
    let epochs = t.count(ctx, "epochs", 1, 1);
    let max_train_steps = t.count_opt(ctx, "max_train_steps", 1);
    let log_every_steps = t.count(ctx, "log_every_steps", 10, 1);
    let checkpoint_interval = t.count_opt(ctx, "checkpoint_interval", 1);
    let checkpoint_total_limit = t.count_opt(ctx, "checkpoint_total_limit", 1);
    let resume = nonempty(t.string(ctx, "resume"));
    let gradient_clip_norm = match t.float(ctx, "gradient_clip_norm") {
        None => Some(1.0),
        Some(0.0) => None,
        Some(v) if v > 0.0 => Some(v),
        Some(v) => {
            ctx.error(
                "training.gradient_clip_norm",
                format!("`training.gradient_clip_norm` = {v} must be positive, or 0 to disable"),
            );
            None
        }
    };
    let ema_decay = t.float_in(ctx, "ema_decay", 0.999, 0.0, 1.0);
    let ema_power = t.float_in(ctx, "ema_power", 0.75, 0.0, 10.0);
    let ema_inv_gamma = t.float_in(ctx, "ema_inv_gamma", 1.0, 1e-9, 1e9);
    let ema_update_after_step = t.count(ctx, "ema_update_after_step", 5000, 0);
    let ema_use_ema_warmup = if t.has("ema_warmup") {
        t.bool_or(ctx, "ema_warmup", true)
    } else {
        t.bool_or(ctx, "ema_use_ema_warmup", true)
    };
    let allow_tf32 = t.bool_or(ctx, "allow_tf32", true);
    let (compile_model, compile_mode) = super::read_compile_keys(&t, ctx, false);
    let snr_gamma = t.float(ctx, "snr_gamma");
    if let Some(g) = snr_gamma {
        if g <= 0.0 {
            ctx.error(
                "training.snr_gamma",
                "`training.snr_gamma` must be positive (remove it for uniform weighting)",
            );
        }
    }
    let eval_num_examples = t.count(ctx, "eval_num_examples", 0, 0);
    let eval_mmd_samples = t.count(ctx, "eval_mmd_samples", 0, 0);
    let eval_mmd_fallback_ntrain = t.count(ctx, "eval_mmd_fallback_ntrain", 0, 0);
    let eval_strategy = t.pick(ctx, "eval_strategy", EvalStrategy::Epoch, EvalStrategy::ALL);
    let eval_num_steps = t.count(ctx, "eval_num_steps", 0, 0);
    if eval_strategy == EvalStrategy::Steps && eval_num_steps == 0 {
        ctx.error(
            "training.eval_strategy",
            "`training.eval_strategy` = \"steps\" needs `training.eval_num_steps` > 0",
        )
        .help = Some("add `eval_num_steps = 100` (optimizer updates between evaluations)".into());
    }
    let eval_batch_size = t
        .count_opt(ctx, "eval_batch_size", 0)
        .filter(|b| *b > 0)
        .or(eval_batch_size_ds)
        .unwrap_or(batch_size);
    let initial_eval = t.bool_or(ctx, "initial_eval", true);
    t.finish(
        ctx,
        &[
            (
                "ema_use_warmup",
                "the reference reads `ema_use_ema_warmup` (default true); use that",
            ),
            (
                "eval_gen_seed",
                "the reference never reads it; evaluation sampling is seeded from `training.seed`",
            ),
        ],
    );

    DiffTraining {
        seed,
        output_dir,
        mixed_precision,
        gradient_checkpointing,
        gradient_accumulation_steps,
        epochs,
        max_train_steps,
        log_every_steps,
        checkpoint_interval,
        checkpoint_total_limit,
        resume,
        gradient_clip_norm,
        ema_decay,
        ema_power,
        ema_inv_gamma,
        ema_update_after_step,
        ema_use_ema_warmup,
        allow_tf32,
        compile_model,
        compile_mode,
        snr_gamma,
        eval_num_examples,
        eval_mmd_samples,
        eval_mmd_fallback_ntrain,
        eval_strategy,
        eval_num_steps,
        eval_batch_size,
        initial_eval,
    }
}

/// `[logging]`.
fn read_logging(root: &Section, ctx: &mut Ctx) -> DiffLogging {
    let l = root.section(ctx, "logging");
    let tensorboard = l.bool_or(ctx, "tensorboard", false);
    let mlflow = l.bool_or(ctx, "mlflow", false);
    let log_dir = nonempty(l.string(ctx, "log_dir"));
    let wandb_project = nonempty(l.string(ctx, "wandb_project"));
    let wandb_entity = nonempty(l.string(ctx, "wandb_entity"));
    let wandb_tags = l.string_list(ctx, "wandb_tags").unwrap_or_default();
    let histogram_every_steps = l.count(ctx, "histogram_every_steps", 0, 0);
    let run_name = nonempty(l.string(ctx, "run_name"));
    l.finish(ctx, &[]);

    DiffLogging {
        tensorboard,
        mlflow,
        log_dir,
        wandb_project,
        wandb_entity,
        wandb_tags,
        histogram_every_steps,
        run_name,
    }
}

/// `[inference]`; the sampler's default follows the objective.
fn read_inference(root: &Section, ctx: &mut Ctx, prediction_type: Objective) -> DiffInference {
    let i = root.section(ctx, "inference");
    let denoising_steps = i.count(ctx, "denoising_steps", 50, 1);
    let cfg_scale = i.float_in(ctx, "cfg_scale", 7.5, 0.0, 100.0);
    let sampler = i.pick(
        ctx,
        "sampler",
        if prediction_type == Objective::VectorField {
            Sampler::Euler
        } else {
            Sampler::Ddim
        },
        &[
            Sampler::Euler,
            Sampler::Ddim,
            Sampler::Heun,
            Sampler::DpmPP2M,
        ],
    );
    let guidance = i.pick(ctx, "guidance", Guidance::Cfg, Guidance::ALL);
    i.finish(ctx, &[]);
    DiffInference {
        denoising_steps,
        cfg_scale,
        sampler,
        guidance,
    }
}
