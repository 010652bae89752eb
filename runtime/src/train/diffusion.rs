//! The DiT diffusion trainer, top to bottom: resolve the embedded config, read the splits
//! (resized and augmented as the reference's torchvision pipeline), build the model (optionally
//! from diffusers weights), then the loop: micro-batches accumulated into one optimizer update
//! (noise level, noise, weighted loss, backward), clipped AdamW step, schedule, EMA; evaluation
//! (validation loss, a sample grid, KID and MMD² on spectrogram or signal features) and checkpoints at the
//! updates where they are due; a final evaluation and the weights in diffusers' layout.
//!
//! Fixed against the reference on purpose (docs/config.md): one null condition for training and
//! sampling; the loss weight uses the path's exact factor; epsilon and sample objectives sample
//! correctly; evaluation counts optimizer updates, has no CFG dropout in its validation loss, is
//! seeded (the same noise and conditions at every evaluation) and compares against reference
//! features computed once; a resumed run skips the batches it has seen and does not evaluate
//! again at its first step; EMA is kept in f32.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use signal_diffusion_config::{schema::Diffusion, Kind};

use super::benchmark::benchmark_diffusion;
use super::checkpoint::{self, State};
use super::evaluate::{reference_features, Evaluator};
use super::export::{load_pretrained, save_weights};
use super::optim::{lr_factor, Optimizer};
use super::{list_dirs, Compiled, RunOptions};
use crate::data::image::Augment;
use crate::data::io::fnv;
use crate::data::latents::{self, Encoder, Encoding};
use crate::data::loader::{read_split, Loader, Samples, Split};
use crate::diffusion::denoiser::{Denoiser, DenoiserShape};
use crate::diffusion::ema::Ema;
use crate::diffusion::loss::{diffusion_grads, StepSpec};
use crate::diffusion::path::{normals, Betas, Path as NoisePath};
use crate::diffusion::sampler::{conditions, SampleSpec};
use crate::models::dit::{Condition, Conditioning};
use crate::models::lora::{LoraBase, LoraSpec};
use crate::models::nn::Params;
use crate::models::vae::Vae;
use crate::ops::precision::{self, LossScaler};
use crate::track::{Logger, Tracking};
use signal_diffusion_config::choice::{DatasetType, EvalStrategy, Objective, OutputType};

/// Entry point of a generated diffusion trainer.
pub fn main(compiled: &Compiled, shape: &DenoiserShape, options: RunOptions) -> ExitCode {
    match run(compiled, shape, options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// With probability `p` per sample, the null condition (classifier-free guidance training).
fn drop_conditions(cond: &mut Condition, c: Conditioning, p: f64, rng: &mut ChaCha8Rng) {
    if !c.is_conditional() || p <= 0.0 {
        return;
    }
    for k in 0..cond.len() {
        if rng.random::<f64>() < p {
            cond.labels[k] = c.null_label();
            cond.ages[k] = f32::NAN;
        }
    }
}

/// One optimizer update from the accumulated gradients: with fp16's `scaler`, unscaled first and
/// skipped (returning `None`) when they overflowed; then clipped and applied. Returns the norm
/// before clipping.
pub(super) fn update(
    opt: &mut Optimizer,
    grads: &mut GradStore,
    scaler: Option<&mut LossScaler>,
    lr: f64,
    clip: Option<f64>,
) -> Result<Option<f64>> {
    if let Some(scaler) = scaler {
        let finite = scaler.unscale(grads, opt.params())?;
        scaler.update(!finite);
        if !finite {
            return Ok(None);
        }
    }
    Ok(Some(opt.step(grads, lr, clip)?.value()?))
}

/// Everything the loop, evaluation and checkpoints share.
pub(super) struct Ctx<'a> {
    pub(super) cfg: &'a Diffusion,
    pub(super) shape: &'a DenoiserShape,
    pub(super) device: &'a Device,
    /// The model's per-sample input (latents in latent space).
    pub(super) input: Vec<usize>,
    /// A sample as an image: `input` in pixel space, the VAE's decoding in latent space.
    pub(super) image: Vec<usize>,
    /// Latent space's frozen VAE.
    pub(super) vae: Option<Arc<Vae>>,
    pub(super) path: NoisePath,
    pub(super) objective: Objective,
    pub(super) spec: SampleSpec,
    pub(super) run_dir: PathBuf,
}

impl Ctx<'_> {
    /// What the loader reads per sample: the input, or in latent space the cached mean and
    /// log-variance stacked on the channels.
    pub(super) fn loaded(&self) -> Vec<usize> {
        let mut shape = self.input.clone();
        if self.vae.is_some() {
            shape[0] *= 2;
        }
        shape
    }

    /// The model's input for `n` loaded samples: as they are, or in latent space a draw from
    /// each cached distribution, z = mean + exp(logvar / 2)·ε, scaled and shifted as the VAE's
    /// config says.
    pub(super) fn batch_input(
        &self,
        data: &[f32],
        n: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Tensor> {
        let mut dims = vec![n];
        dims.extend(self.loaded());
        let x = Tensor::from_slice(data, dims, self.device)?;
        let Some(vae) = &self.vae else {
            return Ok(x);
        };
        let c = self.input[0];
        let (mean, logvar) = (x.narrow(1, 0, c)?, x.narrow(1, c, c)?);
        let eps = Tensor::from_vec(normals(rng, mean.elem_count()), mean.shape(), self.device)?;
        let z = (mean + ((logvar * 0.5)?.exp()? * eps)?)?;
        vae.to_model(&z)
    }

    /// Samples as images: decoded by the VAE in latent space (a batch at a time).
    pub(super) fn to_images(&self, x: Tensor) -> Result<Tensor> {
        match &self.vae {
            Some(vae) => vae.decode(&vae.from_model(&x)?),
            None => Ok(x),
        }
    }

    /// A seeded RNG for (update, micro-batch): the same draws after a resume.
    pub(super) fn rng(&self, update: u64, micro: usize) -> ChaCha8Rng {
        let seed = self.cfg.training.seed;
        ChaCha8Rng::seed_from_u64(
            seed ^ update.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ (micro as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9),
        )
    }
}

fn run(compiled: &Compiled, shape: &DenoiserShape, options: RunOptions) -> Result<()> {
    let config = compiled.resolve(&options.sets)?;
    if super::answered(compiled, &config, &options) {
        return Ok(());
    }
    let Kind::Diffusion(cfg) = &config.kind else {
        bail!("this trainer was compiled for diffusion")
    };
    let t = &cfg.training;
    let amp = precision::dtype_of(t.mixed_precision);
    // Diffusion configs have no `device` key: the GPU when there is one (as the reference).
    let device = super::select_device(signal_diffusion_config::choice::Device::Auto, compiled)?;
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        candle_core::cuda_backend::set_gemm_reduced_precision_f32(t.allow_tf32);
    }
    if let Some(steps) = options.benchmark {
        return benchmark_diffusion(compiled, shape, cfg, &device, steps);
    }

    let resume = options
        .resume
        .clone()
        .or(t.resume.as_ref().map(PathBuf::from));
    let name = cfg
        .logging
        .run_name
        .clone()
        .unwrap_or_else(|| compiled.name.to_string());
    let run_dir = super::run_directory(
        compiled,
        &config,
        &options,
        resume.as_deref(),
        (t.output_dir.as_ref(), "runs/diffusion"),
        name,
    )?;

    // Data: the dataset's own directory, or a settings dataset's preprocessed output (its
    // spectrograms, or its time series).
    let ds = &cfg.dataset;
    let dir = super::dataset_dir(compiled, &ds.name, &ds.path, ds.named.is_some())?;
    super::check_layout(&dir, &config)?;
    let tasks = compiled.tasks;
    let image_column = (ds.image_column != "image").then_some(ds.image_column.as_str());
    let vae = match &cfg.model.vae_config {
        Some(v) => {
            let vae = Vae::load(v, cfg.model.vae_tiling, &device)?;
            println!(
                "latent space: VAE {} ({} channels, downscale {}, scale {}, shift {})",
                v.dir.display(),
                v.latent_channels,
                v.downscale(),
                v.scaling_factor,
                v.shift_factor
            );
            Some(Arc::new(vae))
        }
        None => None,
    };
    let to_latents = |split: &Arc<Split>, training: bool| -> Result<Arc<Split>> {
        let vae = vae.as_ref().expect("only latent space encodes");
        latents_of(cfg, vae, (&dir, split, training), &device)
    };
    let read = |split: &str, augment: Augment, max: Option<usize>| -> Result<Arc<Split>> {
        let mut s = read_split(&dir, split, tasks, image_column)?;
        let encoded = matches!(s.samples, Samples::Encoded { .. });
        match ds.dataset_type {
            DatasetType::ImageFolder if encoded => bail!(
                "{}: `dataset_type = \"imagefolder\"`, but the split `{split}` is a Parquet table",
                dir.display()
            ),
            DatasetType::Parquet if !encoded => bail!(
                "{}: `dataset_type = \"parquet\"`, but the split `{split}` is an image folder",
                dir.display()
            ),
            DatasetType::ImageFolder | DatasetType::Parquet | DatasetType::Auto => {}
        }
        s.augment = augment;
        if let Some(n) = max {
            s.truncate(n);
        }
        // Latent space caches the latents instead (data/latents.rs).
        if let (Some(cache), None) = (&ds.cache_dir, &vae) {
            let workers = ds.num_workers.max(1);
            s = crate::data::cache::cached(s, &dir, Path::new(cache), image_column, workers)?;
        }
        Ok(Arc::new(s))
    };
    let eval_augment = Augment {
        resize: true,
        random_crop: false,
        random_flip: false,
    };
    // In latent space the images are encoded centre-cropped and unflipped (the mirror images
    // are cached beside them).
    let train_images = read(
        &ds.train_split,
        match vae {
            None => Augment {
                resize: true,
                random_crop: !ds.center_crop,
                random_flip: ds.random_flip,
            },
            Some(_) => eval_augment,
        },
        ds.max_train_samples,
    )?;
    let val_images = match &ds.val_split {
        Some(v) => Some(read(v, eval_augment, ds.max_eval_samples)?),
        None => None,
    };
    let (train, val) = match &vae {
        None => (train_images.clone(), val_images.clone()),
        Some(_) => (
            to_latents(&train_images, true)?,
            val_images
                .as_ref()
                .map(|v| to_latents(v, false))
                .transpose()?,
        ),
    };
    let bs = compiled.batch_size;
    let accum = t.gradient_accumulation_steps;
    let batches_per_epoch = train.len().div_ceil(bs);
    let updates_per_epoch = batches_per_epoch.div_ceil(accum);
    let total = t.max_train_steps.unwrap_or(t.epochs * updates_per_epoch);
    println!(
        "train {} samples ({batches_per_epoch} batches of {bs}, {updates_per_epoch} updates per epoch), val {}; {total} updates; {} parameters",
        train.len(),
        val.as_ref().map_or(0, |v| v.len()),
        compiled.parameters
    );

    let objective = cfg.objective.prediction_type;
    let spec = SampleSpec {
        shape: shape.clone(),
        objective: cfg.objective.prediction_type,
        scheduler: cfg.objective.scheduler,
        timesteps: cfg.objective.num_timesteps,
        betas: Betas::of(&cfg.objective),
        flow_shift: cfg.objective.flow_shift,
        text_encoder_2: cfg.model.text_encoder_2_config.clone(),
        sampler: cfg.inference.sampler,
        denoising_steps: cfg.inference.denoising_steps,
        cfg_scale: cfg.inference.cfg_scale,
        guidance: cfg.inference.guidance,
        columns: tasks.iter().map(|t| t.column.to_string()).collect(),
        output_type: config.output_type,
        polar_layout: (config.output_type == OutputType::DbPolar).then_some(config.polar_layout),
        source_width: match cfg.dataset_is_timeseries {
            true => 0,
            false => source_width(&train_images)?,
        },
        n_eeg_channels: ds.n_eeg_channels,
        timeseries: cfg.dataset_is_timeseries,
        vae: cfg.model.vae_config.clone(),
        vae_tiling: cfg.model.vae_tiling,
        text_encoder: cfg.model.text_encoder_config.clone(),
        lora: LoraSpec::of(&cfg.model)
            .zip(cfg.model.pretrained_path.clone())
            .map(|(spec, pretrained)| LoraBase { spec, pretrained }),
    };
    let input = compiled.input_shape.to_vec();
    let ctx = Ctx {
        cfg,
        shape,
        device: &device,
        image: match &vae {
            Some(v) => vec![v.config.out_channels, ds.resolution, ds.resolution],
            None => input.clone(),
        },
        input,
        vae: vae.clone(),
        path: spec.path(),
        objective,
        spec,
        run_dir: run_dir.clone(),
    };

    // Model, optimizer, EMA.
    let mut params = model_params(cfg, &device);
    let mut model = Denoiser::new(shape, &mut params, &device)?;
    // Evaluation samples with a detached twin on the same storage: no autograd graph.
    let mut sampling_model = Denoiser::new(shape, &mut Params::sharing(&params), &device)?;
    // The build computed the count from the config alone (config/src/plan.rs).
    if params.count() as u64 != compiled.parameters {
        bail!(
            "the {} built has {} parameters where its shape plan counted {}: a bug in signal-diffusion, please report it",
            shape.family(),
            params.count(),
            compiled.parameters
        );
    }
    if let Some(path) = &cfg.model.pretrained_path {
        load_pretrained(path, shape, &params, &device)?;
    }
    if let Some(lora) = params.lora() {
        let adapters: Vec<usize> = params
            .trainable
            .iter()
            .filter(|(n, _)| n.contains(".lora_"))
            .map(|(_, v)| v.elem_count())
            .collect();
        let adapter_count: usize = adapters.iter().sum();
        println!(
            "LoRA rank {} (scale {}) on {} linear layers: {adapter_count} adapter parameters and {} of biases train; the model's other {} are frozen",
            lora.rank,
            lora.scale,
            adapters.len() / 2,
            params.trainable_count() - adapter_count,
            params.count() + adapter_count - params.trainable_count(),
        );
    }
    // Captions: each split's distinct captions embedded once, and the null caption (the empty
    // one's embedding) set into the model, where sampling finds it.
    let (train_texts, val_texts) = match &cfg.model.text_encoder_config {
        Some(text_encoder) => {
            let second = cfg.model.text_encoder_2_config.as_ref();
            let encoder = shape.caption_encoder((text_encoder, second), &device)?;
            // A DiT's null caption is a buffer; the hourglass-shaped models' is zeros.
            let null = params
                .buffers
                .iter()
                .find(|(n, _)| n == "caption_null.weight");
            if let Some((_, var)) = null {
                let empty = encoder.rows(&[String::new()])?;
                var.set(&Tensor::from_vec(empty, var.dims(), &device)?)?;
            }
            if model.needs_null_caption() {
                let null = encoder.rows(&[String::new()])?;
                model.set_null_caption(&null, &device)?;
                sampling_model.set_null_caption(&null, &device)?;
            }
            let embed = |split: &Split| -> Result<Option<Arc<Vec<f32>>>> {
                Ok(Some(Arc::new(encoder.rows(&split.texts)?)))
            };
            let val_texts = val.as_deref().map(embed).transpose()?.flatten();
            println!(
                "captions: {} distinct in training, {} in validation, embedded by {}{}",
                train.texts.len(),
                val.as_ref().map_or(0, |v| v.texts.len()),
                text_encoder.dir.display(),
                second.map_or(String::new(), |g| format!(" and {}", g.dir.display()))
            );
            (embed(&train)?, val_texts)
        }
        None => (None, None),
    };
    let all_vars: Vec<(String, Var)> = params
        .trainable
        .iter()
        .chain(&params.buffers)
        .cloned()
        .collect();
    let mut opt = optimizer(cfg, shape, &params)?;
    println!("{}", opt.describe());
    let mut ema = (t.ema_decay > 0.0)
        .then(|| {
            Ema::new(
                &tensors(&params.trainable),
                t.ema_decay,
                t.ema_power,
                t.ema_inv_gamma,
                t.ema_update_after_step as u64,
                t.ema_use_ema_warmup,
            )
        })
        .transpose()?;
    let mut state = State {
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        best: vec![],
        evals_without_improvement: 0,
        best_score: None,
        config_hash: format!("{:016x}", fnv(config.to_json().as_bytes())),
        target_norm: vec![],
        swa_n: 0,
        loss_scaler: LossScaler::for_dtype(amp),
        config: Some(config.to_value()),
    };
    if let Some(ck) = &resume {
        let loaded = checkpoint::load(ck, &device)?;
        checkpoint::check_config(&config, &loaded.state, ck)?;
        checkpoint::restore(&all_vars, &loaded.model)?;
        let skipped = loaded.state.loss_scaler.map_or(0, |s| s.skipped);
        opt.load_state(&loaded.optimizer, loaded.state.step - skipped)?;
        if let (Some(e), Some(saved)) = (&mut ema, loaded.extras.get("ema.safetensors")) {
            e.tensors = named(&params.trainable, saved)?;
        }
        // fp16 keeps the checkpoint's loss scale; a change of `mixed_precision` starts or drops
        // the scaler. Later checkpoints record the config this run continues with.
        let loss_scaler = match (state.loss_scaler, loaded.state.loss_scaler) {
            (Some(_), Some(saved)) => Some(saved),
            (Some(new), None) => {
                println!(
                    "mixed_precision is now fp16: a loss scaler starts at {}",
                    new.scale
                );
                Some(new)
            }
            (None, Some(saved)) => {
                println!(
                    "mixed_precision is no longer fp16: the checkpoint's loss scaler (scale {}) is dropped",
                    saved.scale
                );
                None
            }
            (None, None) => None,
        };
        state = State {
            loss_scaler,
            config_hash: state.config_hash,
            config: state.config,
            ..loaded.state
        };
        println!(
            "resumed from {} at update {} (epoch {}, batch {})",
            ck.display(),
            state.step,
            state.epoch,
            state.batch_in_epoch
        );
    }

    let logging = &cfg.logging;
    let tracking = Tracking {
        tensorboard: logging.tensorboard,
        log_dir: logging.log_dir.as_ref(),
        mlflow: logging.mlflow,
        wandb_project: logging.wandb_project.as_deref(),
        wandb_entity: logging.wandb_entity.as_deref(),
        wandb_tags: &logging.wandb_tags,
        run_name: logging.run_name.as_deref(),
        histogram_every: logging.histogram_every_steps as u64,
    };
    let mut log = Logger::open(&run_dir, &tracking, &config, compiled.plan)?;
    // Reference features for KID/MMD, once per run: the validation split, else
    // `eval_mmd_fallback_ntrain` rows of the training split (0: all; evenly spaced, so a split
    // sorted by subject is still covered) without its random augmentations.
    let reference = match (t.eval_mmd_samples >= 2, t.eval_strategy) {
        (true, EvalStrategy::Steps | EvalStrategy::Epoch) => {
            let (split, rows) = match &val_images {
                Some(v) => (v.clone(), (0..v.len()).collect()),
                None => {
                    let split = read(&ds.train_split, eval_augment, ds.max_train_samples)?;
                    let rows = spread(split.len(), t.eval_mmd_fallback_ntrain);
                    (split, rows)
                }
            };
            println!("KID/MMD² reference: {} samples", rows.len());
            Some(reference_features(&ctx, &split, rows)?)
        }
        (false, _) | (true, EvalStrategy::None) => None,
    };
    let cond_source = val.clone().unwrap_or_else(|| train.clone());
    let cond_texts = match &val {
        Some(_) => val_texts.clone(),
        None => train_texts.clone(),
    };
    let mut eval = Evaluator {
        ctx: &ctx,
        model: &sampling_model,
        trainable: &params.trainable,
        all_vars: &all_vars,
        val: val.as_ref(),
        cond_source: &cond_source,
        reference: reference.as_ref(),
        val_texts: val_texts.clone(),
        cond_texts,
    };

    if t.initial_eval && resume.is_none() && t.eval_strategy != EvalStrategy::None {
        eval.run(&mut state, ema.as_ref(), &mut log)?;
    }
    let started = Instant::now();
    let first = state.step;
    log.start_progress(total as u64, first);
    let ckpt_dir = run_dir.join("checkpoints");
    let mut periodic = list_dirs(&ckpt_dir, "checkpoint-");
    let mut last_eval = state.step;
    let mut acc = GradStore::default();
    let mut loss_sum = 0f64;
    let cond_kind = shape.conditioning();
    let spec = StepSpec {
        path: &ctx.path,
        objective,
        snr_gamma: t.snr_gamma,
        amp,
        checkpointing: t.gradient_checkpointing,
    };
    'epochs: while (state.step as usize) < total {
        let mut order: Vec<usize> = (0..train.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(
            t.seed ^ 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(state.epoch as u64 + 1),
        ));
        let skip = state.batch_in_epoch * bs;
        let salt = t.seed ^ 0xa076_1d64_78bd_642fu64.wrapping_mul(state.epoch as u64 + 1);
        let loader = Loader::new(
            train.clone(),
            order[skip.min(order.len())..].to_vec(),
            bs,
            ctx.loaded(),
            ds.num_workers,
            salt,
        );
        for batch in loader {
            let batch = batch?;
            let i = state.batch_in_epoch;
            let group = i - i % accum;
            let in_group = accum.min(batches_per_epoch - group);
            let idx: Vec<usize> = order[i * bs..i * bs + batch.size].to_vec();
            let mut rng = ctx.rng(state.step, i % accum);
            let mut cond = conditions(cond_kind, &train.targets, &idx);
            cond.texts = train_texts.clone();
            drop_conditions(&mut cond, cond_kind, cfg.model.cfg_dropout, &mut rng);
            let mut x = ctx.batch_input(&batch.inputs, batch.size, &mut rng)?;
            if ds.gaussian_noise_std > 0.0 {
                let noise = normals(&mut rng, x.elem_count());
                let noise = Tensor::from_vec(noise, x.shape(), x.device())?;
                x = (x + (noise * ds.gaussian_noise_std)?)?;
            }
            // Each micro-batch's share of the update's mean loss, times fp16's loss scale.
            let loss_scale = state.loss_scaler.map_or(1.0, |s| s.scale);
            let share = 1.0 / in_group as f64;
            let (loss, mut grads) =
                diffusion_grads(&model, &x, &cond, &spec, (share, loss_scale), &mut rng)?;
            loss_sum += loss;
            let mut mine = GradStore::default();
            for (_, v) in &params.trainable {
                if let Some(g) = grads.remove(v.as_tensor()) {
                    mine.insert(v.as_tensor(), g);
                }
            }
            acc.extend(mine)?;
            state.batch_in_epoch += 1;
            if state.batch_in_epoch - group < in_group {
                continue;
            }

            // One optimizer update.
            let s = state.step as usize;
            let lr = cfg.optimizer.learning_rate * lr_factor(&cfg.scheduler, s, total);
            if log.wants_histograms(state.step + 1) {
                let scale = state.loss_scaler.as_ref().map_or(1.0, |s| s.scale);
                log.parameter_histograms(opt.params(), &acc, scale, state.step + 1)?;
            }
            let grad_norm = update(
                &mut opt,
                &mut acc,
                state.loss_scaler.as_mut(),
                lr,
                t.gradient_clip_norm,
            )?;
            acc = GradStore::default();
            state.step += 1;
            if let Some(e) = &mut ema {
                e.update(&tensors(&params.trainable), state.step)?;
            }
            let loss_v = std::mem::take(&mut loss_sum);
            if !loss_v.is_finite() {
                bail!("the loss became {loss_v} at update {}; lower `optimizer.learning_rate` or set `gradient_clip_norm`", state.step);
            }
            let step = state.step;
            log.scalar("train/loss", loss_v, step)?;
            log.scalar("train/lr", lr, step)?;
            if let Some(norm) = grad_norm {
                log.scalar("train/grad_norm", norm, step)?;
            }
            if let Some(s) = &state.loss_scaler {
                log.scalar("train/loss_scale", s.scale, step)?;
            }
            let mut status = None;
            if step.is_multiple_of(t.log_every_steps as u64) || step as usize == total {
                let per_s = (step - first) as f64 / started.elapsed().as_secs_f64().max(1e-9);
                let images = per_s * (bs * accum) as f64;
                let norm = match (grad_norm, &state.loss_scaler) {
                    (Some(n), _) => format!("grad_norm {n:.3}"),
                    (None, Some(s)) => format!(
                        "skipped (fp16 gradients overflowed; loss scale now {})",
                        s.scale
                    ),
                    (None, None) => unreachable!("only fp16 skips updates"),
                };
                log.line(&format!("epoch {} update {step}/{total} loss {loss_v:.4} lr {lr:.2e} {norm} ({images:.2} images/s)", state.epoch + 1));
                status = Some(format!("loss {loss_v:.4} lr {lr:.2e} {images:.2} images/s"));
            }
            log.step(status);
            let end_of_epoch = state.batch_in_epoch == batches_per_epoch;
            if t.eval_strategy == EvalStrategy::Steps
                && step.is_multiple_of(t.eval_num_steps as u64)
            {
                eval.run(&mut state, ema.as_ref(), &mut log)?;
                last_eval = step;
            }
            if t.checkpoint_interval
                .is_some_and(|n| step.is_multiple_of(n as u64))
            {
                let dir = ckpt_dir.join(format!("checkpoint-{step}"));
                save(
                    &dir,
                    &ctx,
                    &all_vars,
                    &opt,
                    ema.as_ref(),
                    &state,
                    end_of_epoch,
                )?;
                periodic.push(dir);
                if let Some(keep) = t.checkpoint_total_limit {
                    checkpoint::prune(&mut periodic, keep)?;
                }
            }
            if step as usize >= total {
                break 'epochs;
            }
        }
        state.epoch += 1;
        state.batch_in_epoch = 0;
        if t.eval_strategy == EvalStrategy::Epoch && last_eval != state.step {
            eval.run(&mut state, ema.as_ref(), &mut log)?;
            last_eval = state.step;
        }
    }
    log.finish_progress();
    if t.eval_strategy != EvalStrategy::None && last_eval != state.step {
        eval.run(&mut state, ema.as_ref(), &mut log)?;
    }
    save(
        &ckpt_dir.join("last"),
        &ctx,
        &all_vars,
        &opt,
        ema.as_ref(),
        &state,
        false,
    )?;
    let final_dir = run_dir.join("final");
    let pretrained = cfg.model.pretrained_path.as_deref();
    save_weights(
        &final_dir,
        &ctx.spec,
        pretrained,
        &params,
        &tensors(&params.trainable),
    )?;
    if let Some(e) = &ema {
        save_weights(
            &final_dir.join("ema"),
            &ctx.spec,
            pretrained,
            &params,
            &e.tensors,
        )?;
    }
    // The lowest KID of the run (the first kept evaluation), in W&B's summary.
    let best: Vec<(&str, f64)> = state
        .best
        .first()
        .map(|b| ("best/kid_mean", b.0))
        .into_iter()
        .collect();
    log.finish(&best)?;
    let summary = serde_json::json!({
        "run_dir": run_dir,
        "updates": state.step,
        "best_eval": state.best,
    });
    std::fs::write(
        run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    println!(
        "done: {} updates in {:.1} s; weights in {}, checkpoints in {}",
        state.step,
        started.elapsed().as_secs_f64(),
        final_dir.display(),
        ckpt_dir.display()
    );
    Ok(())
}

/// `split` (images, resized and centre-cropped) as latents: encoded once by `vae` into
/// `dataset.cache_dir`, else beside the dataset `dir`, then read from there (data/latents.rs).
/// The training split gets its random flips (mirror images cached beside); the others are
/// evaluated as they are.
fn latents_of(
    cfg: &Diffusion,
    vae: &Vae,
    (dir, split, training): (&Path, &Arc<Split>, bool),
    device: &Device,
) -> Result<Arc<Split>> {
    let ds = &cfg.dataset;
    let spec = Encoding {
        root: ds
            .cache_dir
            .as_ref()
            .map_or(dir.to_path_buf(), PathBuf::from),
        dataset_dir: dir.to_path_buf(),
        random_crop: training && !ds.center_crop,
        random_flip: training && ds.random_flip,
        resolution: ds.resolution,
        image_column: (ds.image_column != "image").then(|| ds.image_column.clone()),
        workers: ds.num_workers.max(1),
        shard_size: latents::SHARD,
    };
    let side = ds.resolution / vae.config.downscale();
    let encode = |x: &Tensor| vae.encode(x);
    let hash = vae.encoding_key();
    let encoder = Encoder {
        hash: &hash,
        latent: [vae.config.latent_channels, side, side],
        encode: &encode,
    };
    Ok(Arc::new(latents::cached(split, &encoder, &spec, device)?))
}

/// `sigdiff cache-latents`: encode the training and validation splits of a latent-space config
/// into its latent cache (what its trainer would do on first use), on the CPU.
pub fn cache_latents(cfg: &Diffusion) -> Result<()> {
    let Some(vae_config) = &cfg.model.vae_config else {
        bail!("the config trains in pixel space (`model.extras.latent_space` is false): there are no latents to cache");
    };
    let device = Device::Cpu;
    let vae = Vae::load(vae_config, cfg.model.vae_tiling, &device)?;
    let ds = &cfg.dataset;
    let dir = &ds.path;
    let image_column = (ds.image_column != "image").then_some(ds.image_column.as_str());
    let splits = [
        Some((&ds.train_split, ds.max_train_samples, true)),
        ds.val_split
            .as_ref()
            .map(|v| (v, ds.max_eval_samples, false)),
    ];
    for (name, max, training) in splits.into_iter().flatten() {
        let mut split = read_split(dir, name, &[], image_column)?;
        split.augment = Augment {
            resize: true,
            random_crop: false,
            random_flip: false,
        };
        if let Some(n) = max {
            split.truncate(n);
        }
        latents_of(cfg, &vae, (dir, &Arc::new(split), training), &device)?;
    }
    Ok(())
}

/// The parameters a model of this config is built with: seeded by `training.seed`, under its
/// LoRA spec when `[model.lora]` is enabled.
pub(super) fn model_params(cfg: &Diffusion, device: &Device) -> Params {
    match LoraSpec::of(&cfg.model) {
        Some(lora) => Params::with_lora(cfg.training.seed, device, lora),
        None => Params::new(cfg.training.seed, device),
    }
}

/// The optimizer of `cfg` over the model's trainable tensors; the hourglass-shaped models get
/// the reference's parameter groups (hourglass.rs `param_group`), rebuilt from the names on a
/// resume.
pub(super) fn optimizer(
    cfg: &Diffusion,
    shape: &DenoiserShape,
    params: &Params,
) -> Result<Optimizer> {
    let opt = Optimizer::new(&cfg.optimizer, params.trainable.clone())?;
    Ok(match shape {
        DenoiserShape::Dit(_) | DenoiserShape::Unet { .. } | DenoiserShape::Mmdit { .. } => opt,
        DenoiserShape::Hourglass { .. } | DenoiserShape::LocalMamba { .. } => {
            opt.with_groups(|name| crate::models::hourglass::param_group(name).into())
        }
    })
}

pub(super) fn tensors(vars: &[(String, Var)]) -> Vec<Tensor> {
    vars.iter().map(|(_, v)| v.as_tensor().clone()).collect()
}

/// `ema.safetensors`: the EMA of every trainable tensor and the buffers as they are, by name
/// (`vars` lists the trainable tensors first, as the EMA does).
pub(super) fn ema_tensors(vars: &[(String, Var)], ema: &Ema) -> HashMap<String, Tensor> {
    vars.iter()
        .enumerate()
        .map(|(i, (n, v))| {
            (
                n.clone(),
                ema.tensors
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| v.as_tensor().clone()),
            )
        })
        .collect()
}

/// The tensors of `saved` in the order of `vars`, checked by name and shape.
fn named(vars: &[(String, Var)], saved: &HashMap<String, Tensor>) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|(n, v)| {
            let t = saved.get(n).with_context(|| format!("no tensor `{n}`"))?;
            if t.dims() != v.dims() {
                bail!(
                    "tensor `{n}` has shape {:?}, the model expects {:?}",
                    t.dims(),
                    v.dims()
                );
            }
            Ok(t.clone())
        })
        .collect()
}

/// Width of the split's first image as stored (before any resize).
fn source_width(split: &Split) -> Result<usize> {
    if let Samples::Signals { table, .. } = &split.samples {
        bail!(
            "{}: a time-series table, but this trainer was compiled for spectrograms (set `data_type = \"timeseries\"`)",
            table.display()
        );
    }
    Ok(split.decode(0)?.3)
}

/// A resumable checkpoint: weights, optimizer moments, EMA, state, and `sampling.json`. Saved at
/// the end of an epoch, it records the next epoch's start so a resume does not rerun the epoch's
/// last steps' bookkeeping.
fn save(
    dir: &Path,
    ctx: &Ctx,
    vars: &[(String, Var)],
    opt: &Optimizer,
    ema: Option<&Ema>,
    state: &State,
    end_of_epoch: bool,
) -> Result<()> {
    let mut state = state.clone();
    if end_of_epoch {
        state.epoch += 1;
        state.batch_in_epoch = 0;
    }
    let ema_map = ema.map(|e| ema_tensors(vars, e));
    let extras: Vec<(&str, &HashMap<String, Tensor>)> =
        ema_map.iter().map(|m| ("ema.safetensors", m)).collect();
    checkpoint::save(dir, vars, &opt.state()?, &state, &extras)?;
    std::fs::write(
        dir.join("sampling.json"),
        serde_json::to_string_pretty(&ctx.spec)?,
    )?;
    Ok(())
}

/// `n` row indices spread evenly over `len` rows (all of them when `n` is 0 or at least `len`).
fn spread(len: usize, n: usize) -> Vec<usize> {
    match n == 0 || n >= len {
        true => (0..len).collect(),
        false => (0..n).map(|i| i * len / n).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn the_fallback_reference_spreads_over_the_split() {
        assert_eq!(spread(10, 0), (0..10).collect::<Vec<_>>());
        assert_eq!(spread(10, 25), (0..10).collect::<Vec<_>>());
        assert_eq!(spread(10, 4), vec![0, 2, 5, 7]);
        assert_eq!(spread(1000, 3), vec![0, 333, 666]);
    }
}
