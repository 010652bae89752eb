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
use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use signal_diffusion_config::{schema::Diffusion, Kind};

use super::checkpoint::{self, State};
use super::{fnv, list_dirs, Compiled, RunOptions};
use crate::data::{read_split, Loader, Samples, Split};
use crate::diffusion::{
    loss_weight, normals, per_sample, target, weighted_mse, Ema, Guidance, Method, Objective,
    Path as NoisePath, Sampler,
};
use crate::dit::{Condition, Conditioning, Dit, DitShape};
use crate::fidelity::{signal_features, spectrogram_features, strips, Reference};
use crate::image::Augment;
use crate::log::Logger;
use crate::nn::Params;
use crate::optim::{lr_factor, Optimizer};
use crate::precision::{self, Autocast, LossScaler};

/// Entry point of a generated diffusion trainer.
pub fn main(compiled: &Compiled, shape: &DitShape, options: RunOptions) -> ExitCode {
    match run(compiled, shape, options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What rebuilds a trained model and its sampler from a checkpoint directory (`sampling.json`,
/// read by `sigdiff sample`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SampleSpec {
    pub shape: DitShape,
    pub objective: String,
    /// `flow_match_euler`, `ddpm` or `ddim` (the noise path, and η for DDIM sampling).
    pub scheduler: String,
    pub timesteps: usize,
    pub sampler: String,
    pub denoising_steps: usize,
    pub cfg_scale: f64,
    pub guidance: String,
    /// Metadata columns of the conditioning: [class] or [gender, health, age].
    pub columns: Vec<String>,
    /// What the dataset's images are: `db-only` (grey) or a 3-channel type.
    pub output_type: String,
    /// Width of the images the model was trained from, before resizing (strip geometry; 0 for
    /// time series).
    pub source_width: usize,
    pub n_eeg_channels: usize,
    /// Time series (z-scored signals: not clipped to [-1, 1], written as `.npy`) rather than
    /// spectrogram images.
    #[serde(default)]
    pub timeseries: bool,
}

impl SampleSpec {
    pub fn path(&self) -> NoisePath {
        NoisePath::for_scheduler(&self.scheduler, self.timesteps)
    }

    /// The values a grid shows as black and white: [-1, 1] for images, ±3 for z-scored series.
    pub fn pixel_range(&self) -> f32 {
        if self.timeseries {
            3.0
        } else {
            1.0
        }
    }

    /// The sampler, with `steps` denoising steps and guidance scale `cfg_scale`.
    pub fn sampler(&self, steps: usize, cfg_scale: f64) -> Sampler {
        let method = match self.sampler.as_str() {
            "heun" => Method::Heun,
            "ddim" => Method::Ddim {
                eta_one: self.scheduler == "ddpm",
            },
            _ => Method::Euler,
        };
        Sampler {
            path: self.path(),
            objective: Objective::parse(&self.objective),
            method,
            steps,
            guidance: match self.guidance.as_str() {
                "rectified_cfg_pp" => Guidance::RectifiedCfgPp(cfg_scale),
                _ => Guidance::Cfg(cfg_scale),
            },
            clip_sample: !self.timeseries,
        }
    }
}

/// The conditions of samples `idx` of a split whose targets are the conditioning columns.
pub fn conditions(c: Conditioning, targets: &[Vec<f32>], idx: &[usize]) -> Condition {
    let mut cond = Condition::null(c, idx.len());
    for (k, &i) in idx.iter().enumerate() {
        match c {
            Conditioning::None => {}
            Conditioning::Classes { .. } => cond.labels[k] = targets[0][i] as u32,
            Conditioning::GenderHealthAge => {
                let (g, h, age) = (targets[0][i], targets[1][i], targets[2][i]);
                if !g.is_nan() && !h.is_nan() {
                    cond.labels[k] = (g * 2.0 + h) as u32;
                }
                cond.ages[k] = age / 100.0;
            }
        }
    }
    cond
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

/// A clean batch noised for training: the model input x_t = a·x + s·ε at per-sample levels, the
/// objective's target and the per-sample loss weights.
struct Noised {
    xt: Tensor,
    t: Vec<f32>,
    target: Tensor,
    weights: Tensor,
}

impl Noised {
    /// A noise level and noise per sample of `x` from `rng`.
    fn draw(
        x: &Tensor,
        path: &NoisePath,
        objective: Objective,
        snr_gamma: Option<f64>,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let b = x.dim(0)?;
        let levels: Vec<_> = (0..b).map(|_| path.draw(rng)).collect();
        let eps = Tensor::from_vec(normals(rng, x.elem_count()), x.shape(), x.device())?;
        let a = per_sample(&levels, |l| l.a, x)?;
        let s = per_sample(&levels, |l| l.s, x)?;
        let w: Vec<f32> = levels
            .iter()
            .map(|l| loss_weight(objective, l, snr_gamma) as f32)
            .collect();
        Ok(Noised {
            xt: (x.broadcast_mul(&a)? + eps.broadcast_mul(&s)?)?,
            t: levels.iter().map(|l| l.t).collect(),
            target: target(objective, x, &eps)?,
            weights: Tensor::from_vec(w, b, x.device())?,
        })
    }

    /// Per-sample MSE × weight, batch mean (f32), times `scale`.
    fn loss(&self, out: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
        weighted_mse(out, &self.target, &self.weights)?.mean_all()? * scale
    }
}

/// How a training step computes the loss and its gradients.
#[derive(Clone, Copy)]
pub struct StepSpec<'a> {
    pub path: &'a NoisePath,
    pub objective: Objective,
    /// Soft-min-SNR's γ.
    pub snr_gamma: Option<f64>,
    /// Autocast's 16-bit type (`mixed_precision`); evaluation ignores it and runs in f32.
    pub amp: Option<DType>,
    /// Gradient checkpointing (dit.rs).
    pub checkpointing: bool,
}

/// The weighted diffusion loss of a clean batch `x` (noise levels and noise from `rng`), in f32.
pub fn diffusion_loss(
    model: &Dit,
    x: &Tensor,
    cond: &Condition,
    spec: &StepSpec,
    rng: &mut ChaCha8Rng,
) -> Result<Tensor> {
    let n = Noised::draw(x, spec.path, spec.objective, spec.snr_gamma, rng)?;
    Ok(n.loss(&model.forward(&n.xt, &n.t, cond)?, 1.0)?)
}

/// One optimizer update from the accumulated gradients: with fp16's `scaler`, unscaled first and
/// skipped (returning `None`) when they overflowed; then clipped and applied. Returns the norm
/// before clipping.
fn update(
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

/// The diffusion loss of `x` and the gradients of that loss times `share` (a micro-batch's part
/// of the update) times `loss_scale` (fp16's), under the spec's autocast and checkpointing (the
/// same numbers up to summation order; dit.rs). Returns the loss times `share`, without the fp16
/// scale.
pub fn diffusion_grads(
    model: &Dit,
    x: &Tensor,
    cond: &Condition,
    spec: &StepSpec,
    (share, loss_scale): (f64, f64),
    rng: &mut ChaCha8Rng,
) -> Result<(f64, GradStore)> {
    let _amp = Autocast::enter(spec.amp);
    let n = Noised::draw(x, spec.path, spec.objective, spec.snr_gamma, rng)?;
    let scale = share * loss_scale;
    let (loss, grads) = if spec.checkpointing {
        model.checkpointed_backward(&n.xt, &n.t, cond, |out| n.loss(out, scale))?
    } else {
        let loss = n.loss(&model.forward(&n.xt, &n.t, cond)?, scale)?;
        let grads = loss.backward()?;
        (loss, grads)
    };
    Ok((loss.to_scalar::<f32>()? as f64 / loss_scale, grads))
}

/// Everything the loop, evaluation and checkpoints share.
struct Ctx<'a> {
    cfg: &'a Diffusion,
    shape: &'a DitShape,
    device: &'a Device,
    input: Vec<usize>,
    path: NoisePath,
    objective: Objective,
    spec: SampleSpec,
    run_dir: PathBuf,
}

impl Ctx<'_> {
    fn tensor(&self, data: &[f32], n: usize) -> Result<Tensor> {
        let mut dims = vec![n];
        dims.extend(&self.input);
        Ok(Tensor::from_slice(data, dims, self.device)?)
    }

    /// A seeded RNG for (update, micro-batch): the same draws after a resume.
    fn rng(&self, update: u64, micro: usize) -> ChaCha8Rng {
        let seed = self.cfg.training.seed;
        ChaCha8Rng::seed_from_u64(
            seed ^ update.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ (micro as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9),
        )
    }
}

fn run(compiled: &Compiled, shape: &DitShape, options: RunOptions) -> Result<()> {
    let resolved = compiled.resolve(&options.sets)?;
    if super::answered(compiled, &resolved, &options) {
        return Ok(());
    }
    let Kind::Diffusion(cfg) = &resolved.kind else {
        bail!("this trainer was compiled for diffusion")
    };
    let t = &cfg.training;
    let amp = precision::dtype_of(&t.mixed_precision);
    let device = super::select_device("auto", compiled)?;
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        candle_core::cuda_backend::set_gemm_reduced_precision_f32(t.allow_tf32);
    }
    if let Some(steps) = options.benchmark {
        return benchmark(compiled, shape, cfg, &device, steps);
    }

    let resume = options
        .resume
        .clone()
        .or(t.resume.as_ref().map(PathBuf::from));
    let name = cfg
        .run_name
        .clone()
        .unwrap_or_else(|| compiled.name.to_string());
    let run_dir = super::run_directory(
        compiled,
        &resolved,
        &options,
        resume.as_deref(),
        (t.output_dir.as_ref(), "runs/diffusion"),
        name,
    )?;

    // Data: the dataset's own directory, or a settings dataset's preprocessed output.
    let ds = &cfg.dataset;
    let dir = resolved
        .settings
        .datasets
        .get(&ds.name)
        .map(|d| d.output.clone())
        .unwrap_or_else(|| PathBuf::from(&ds.name));
    let tasks = compiled.tasks;
    let read = |split: &str, augment: Augment, max: Option<usize>| -> Result<Arc<Split>> {
        let mut s = read_split(&dir, split, tasks)?;
        let encoded = matches!(s.samples, Samples::Encoded { .. });
        match ds.dataset_type.as_str() {
            "imagefolder" if encoded => bail!(
                "{}: `dataset_type = \"imagefolder\"`, but the split `{split}` is a Parquet table",
                dir.display()
            ),
            "parquet" if !encoded => bail!(
                "{}: `dataset_type = \"parquet\"`, but the split `{split}` is an image folder",
                dir.display()
            ),
            _ => {}
        }
        s.augment = augment;
        if let Some(n) = max {
            s.truncate(n);
        }
        Ok(Arc::new(s))
    };
    let train = read(
        &ds.train_split,
        Augment {
            resize: true,
            random_crop: !ds.center_crop,
            random_flip: ds.random_flip,
        },
        ds.max_train_samples,
    )?;
    let eval_augment = Augment {
        resize: true,
        random_crop: false,
        random_flip: false,
    };
    let val = match &ds.val_split {
        Some(v) => Some(read(v, eval_augment, ds.max_eval_samples)?),
        None => None,
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

    let objective = Objective::parse(&cfg.prediction_type);
    let spec = SampleSpec {
        shape: *shape,
        objective: cfg.prediction_type.clone(),
        scheduler: cfg.objective_scheduler.clone(),
        timesteps: cfg.num_timesteps,
        sampler: cfg.sampler.clone(),
        denoising_steps: cfg.denoising_steps,
        cfg_scale: cfg.cfg_scale,
        guidance: cfg.guidance.clone(),
        columns: tasks.iter().map(|t| t.column.to_string()).collect(),
        output_type: resolved.output_type.clone(),
        source_width: match cfg.dataset_is_timeseries {
            true => 0,
            false => source_width(&train)?,
        },
        n_eeg_channels: ds.n_eeg_channels,
        timeseries: cfg.dataset_is_timeseries,
    };
    let ctx = Ctx {
        cfg,
        shape,
        device: &device,
        input: compiled.input_shape.to_vec(),
        path: spec.path(),
        objective,
        spec,
        run_dir: run_dir.clone(),
    };

    // Model, optimizer, EMA.
    let mut params = Params::new(t.seed, &device);
    let model = Dit::new(shape, &mut params, &device)?;
    if let Some(dir) = &cfg.model.pretrained {
        load_pretrained(Path::new(dir), &params.trainable, &device)?;
    }
    let all_vars: Vec<(String, Var)> = params
        .trainable
        .iter()
        .chain(&params.buffers)
        .cloned()
        .collect();
    let mut opt = Optimizer::new(&cfg.optimizer, params.trainable.clone())?;
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
        config_hash: format!("{:016x}", fnv(resolved.to_json().as_bytes())),
        target_norm: vec![],
        swa_n: 0,
        loss_scaler: LossScaler::for_dtype(amp),
    };
    if let Some(ck) = &resume {
        let loaded = checkpoint::load(ck, &device)?;
        checkpoint::restore(&all_vars, &loaded.model)?;
        let skipped = loaded.state.loss_scaler.map_or(0, |s| s.skipped);
        opt.load_state(&loaded.optimizer, loaded.state.step - skipped)?;
        if let (Some(e), Some(saved)) = (&mut ema, loaded.extras.get("ema.safetensors")) {
            e.tensors = named(&params.trainable, saved)?;
        }
        state = loaded.state;
        println!(
            "resumed from {} at update {} (epoch {}, batch {})",
            ck.display(),
            state.step,
            state.epoch,
            state.batch_in_epoch
        );
    }

    let mut log = Logger::for_run(&run_dir, cfg.tensorboard, cfg.log_dir.as_ref())?;
    // Reference features for KID/MMD, once per run: the validation split, else the training
    // split without its random augmentations.
    let reference = match (t.eval_mmd_samples >= 2, t.eval_strategy.as_str()) {
        (true, "steps" | "epoch") => {
            let split = match &val {
                Some(v) => v.clone(),
                None => read(&ds.train_split, eval_augment, ds.max_train_samples)?,
            };
            Some(reference_features(&ctx, &split)?)
        }
        _ => None,
    };
    let cond_source = val.clone().unwrap_or_else(|| train.clone());
    let mut eval = Evaluator {
        ctx: &ctx,
        model: &model,
        trainable: &params.trainable,
        all_vars: &all_vars,
        val: val.as_ref(),
        cond_source: &cond_source,
        reference: reference.as_ref(),
    };

    if t.initial_eval && resume.is_none() && t.eval_strategy != "none" {
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
    let cond_kind = shape.conditioning;
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
            ctx.input.clone(),
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
            drop_conditions(&mut cond, cond_kind, cfg.model.cfg_dropout, &mut rng);
            let mut x = ctx.tensor(&batch.inputs, batch.size)?;
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
            if t.eval_strategy == "steps" && step.is_multiple_of(t.eval_num_steps as u64) {
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
        if t.eval_strategy == "epoch" && last_eval != state.step {
            eval.run(&mut state, ema.as_ref(), &mut log)?;
            last_eval = state.step;
        }
    }
    log.finish_progress();
    if t.eval_strategy != "none" && last_eval != state.step {
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
    save_diffusers(&final_dir, &ctx, &all_vars, &tensors(&all_vars))?;
    if let Some(e) = &ema {
        // The EMA of the trainable tensors, then the buffers as they are.
        let values: Vec<Tensor> = e
            .tensors
            .iter()
            .cloned()
            .chain(tensors(&params.buffers))
            .collect();
        save_diffusers(&final_dir.join("ema"), &ctx, &all_vars, &values)?;
    }
    log.flush()?;
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
        "done: {} updates in {:.1} s; weights in {} (diffusers layout), checkpoints in {}",
        state.step,
        started.elapsed().as_secs_f64(),
        final_dir.display(),
        ckpt_dir.display()
    );
    Ok(())
}

fn tensors(vars: &[(String, Var)]) -> Vec<Tensor> {
    vars.iter().map(|(_, v)| v.as_tensor().clone()).collect()
}

/// `ema.safetensors`: the EMA of every trainable tensor and the buffers as they are, by name
/// (`vars` lists the trainable tensors first, as the EMA does).
fn ema_tensors(vars: &[(String, Var)], ema: &Ema) -> HashMap<String, Tensor> {
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
    let (_, _, _, width) = match &split.samples {
        Samples::Files(files) => crate::io::read_png(&files[0])?,
        Samples::Encoded { table, images } => {
            crate::io::decode_png(&images[0], &format!("{} row 0", table.display()))?
        }
        Samples::Signals { table, .. } => bail!(
            "{}: a time-series table, but this trainer was compiled for spectrograms (set `data_type = \"timeseries\"`)",
            table.display()
        ),
    };
    Ok(width)
}

/// Weights saved by diffusers (`save_pretrained` dir or a safetensors file), by name.
fn load_pretrained(path: &Path, vars: &[(String, Var)], device: &Device) -> Result<()> {
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
    checkpoint::save(dir, vars, &opt.state(), &state, &extras)?;
    std::fs::write(
        dir.join("sampling.json"),
        serde_json::to_string_pretty(&ctx.spec)?,
    )?;
    Ok(())
}

/// Weights in diffusers' `save_pretrained` layout (`diffusion_pytorch_model.safetensors` and a
/// `config.json` that `DiTTransformer2DModel.from_pretrained` reads), plus `sampling.json`.
/// `values` are the tensors to write under the names of `vars` (all of them, buffers included).
fn save_diffusers(dir: &Path, ctx: &Ctx, vars: &[(String, Var)], values: &[Tensor]) -> Result<()> {
    let tmp = crate::io::temp_path_for(dir)?;
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
        "dropout": 0.0,
        "norm_num_groups": 32,
        "attention_bias": true,
        "sample_size": s.height,
        "patch_size": s.patch[0],
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": s.num_embeds,
        "upcast_attention": false,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": false,
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

/// Features of every image of `split` (its dB channel at the model's resolution).
fn reference_features(ctx: &Ctx, split: &Arc<Split>) -> Result<Reference> {
    let mut feats = vec![];
    let loader = Loader::new(
        split.clone(),
        (0..split.len()).collect(),
        64,
        ctx.input.clone(),
        ctx.cfg.dataset.num_workers,
        0,
    );
    for batch in loader {
        let batch = batch?;
        let per: usize = ctx.input.iter().product();
        for k in 0..batch.size {
            feats.push(sample_features(ctx, &batch.inputs[k * per..(k + 1) * per]));
        }
    }
    Ok(Reference::new(&feats))
}

/// The features of one model-shaped sample: of the signal for time series (1, C, T), else of
/// the spectrogram's dB channel (channel 0).
fn sample_features(ctx: &Ctx, sample: &[f32]) -> Vec<f32> {
    let (h, w) = (ctx.input[1], ctx.input[2]);
    if ctx.spec.timeseries {
        return signal_features(sample, h, w);
    }
    let geometry = strips(w, ctx.spec.source_width, ctx.spec.n_eeg_channels);
    spectrogram_features(&sample[..h * w], h, w, &geometry)
}

struct Evaluator<'a> {
    ctx: &'a Ctx<'a>,
    model: &'a Dit,
    trainable: &'a [(String, Var)],
    all_vars: &'a [(String, Var)],
    val: Option<&'a Arc<Split>>,
    /// Where generation takes its conditions from (validation, else training rows).
    cond_source: &'a Arc<Split>,
    reference: Option<&'a Reference>,
}

impl Evaluator<'_> {
    /// Validation loss, a sample grid, KID and MMD², all with the EMA weights when there are
    /// some; keeps the best 3 evaluations by KID in `best_eval/`.
    fn run(&mut self, state: &mut State, ema: Option<&Ema>, log: &mut Logger) -> Result<()> {
        let saved = match ema {
            Some(e) => {
                let current = tensors(self.trainable)
                    .iter()
                    .map(|t| t.copy())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                for ((_, v), t) in self.trainable.iter().zip(&e.tensors) {
                    v.set(t)?;
                }
                Some(current)
            }
            None => None,
        };
        let result = self.evaluate(state, log);
        if let Some(current) = saved {
            for ((_, v), t) in self.trainable.iter().zip(&current) {
                v.set(t)?;
            }
        }
        let kid = result?;
        if let Some(kid) = kid.filter(|k| k.is_finite()) {
            self.keep_best(state, kid, ema)?;
        }
        log.flush()
    }

    fn evaluate(&self, state: &State, log: &mut Logger) -> Result<Option<f64>> {
        let (ctx, t) = (self.ctx, &self.ctx.cfg.training);
        let step = state.step;
        let mut line = format!("eval at update {step}:");
        if let Some(val) = self.val {
            // The same levels and noise at every evaluation (a fixed seed), no CFG dropout.
            let loader = Loader::new(
                (*val).clone(),
                (0..val.len()).collect(),
                t.eval_batch_size,
                ctx.input.clone(),
                ctx.cfg.dataset.num_workers,
                0,
            );
            // In f32: evaluation runs outside autocast, with no gradients to checkpoint.
            let spec = StepSpec {
                path: &ctx.path,
                objective: ctx.objective,
                snr_gamma: t.snr_gamma,
                amp: None,
                checkpointing: false,
            };
            let (mut sum, mut n) = (0f64, 0usize);
            let mut start = 0;
            for (b, batch) in loader.enumerate() {
                let batch = batch?;
                let idx: Vec<usize> = (start..start + batch.size).collect();
                start += batch.size;
                let cond = conditions(ctx.shape.conditioning, &val.targets, &idx);
                let mut rng = ChaCha8Rng::seed_from_u64(t.seed ^ 0x7a1d_0000 ^ b as u64);
                let x = ctx.tensor(&batch.inputs, batch.size)?;
                let loss = diffusion_loss(self.model, &x, &cond, &spec, &mut rng)?;
                sum += loss.to_scalar::<f32>()? as f64 * batch.size as f64;
                n += batch.size;
            }
            let v = sum / n.max(1) as f64;
            log.scalar("val/loss", v, step)?;
            line.push_str(&format!(" val loss {v:.4}"));
        }
        let n = t.eval_num_examples.max(t.eval_mmd_samples);
        let mut kid = None;
        if n > 0 {
            let samples = self.generate(n)?;
            let per: usize = ctx.input.iter().product();
            if t.eval_num_examples > 0 {
                let shown = &samples[..t.eval_num_examples * per];
                let (png, shape) = grid(
                    shown,
                    t.eval_num_examples,
                    &ctx.input,
                    ctx.spec.pixel_range(),
                )?;
                let dir = ctx.run_dir.join("samples");
                std::fs::create_dir_all(&dir)?;
                let path = dir.join(format!("step-{step:06}.png"));
                crate::io::write_atomic(&path, |w| Ok(w.write_all(&png)?))?;
                if ctx.spec.timeseries {
                    // The PNG is a heat map for the eye; the signals themselves, losslessly.
                    let mut dims = vec![t.eval_num_examples];
                    dims.extend(&ctx.input);
                    let npy = dir.join(format!("step-{step:06}.npy"));
                    crate::io::write_npy_f32(&npy, &dims, shown)?;
                }
                log.image("eval/generated_samples", &png, shape, step)?;
            }
            if let (Some(reference), true) = (self.reference, t.eval_mmd_samples >= 2) {
                let feats: Vec<Vec<f32>> = (0..t.eval_mmd_samples)
                    .map(|k| sample_features(ctx, &samples[k * per..(k + 1) * per]))
                    .collect();
                let (k_mean, k_std, mmd) = reference.compare(&feats);
                log.scalar("eval/kid_mean", k_mean, step)?;
                log.scalar("eval/kid_std", k_std, step)?;
                log.scalar("eval/mmd2", mmd, step)?;
                line.push_str(&format!(
                    " KID {k_mean:.4} ± {k_std:.4} MMD² {mmd:.4} ({} samples)",
                    t.eval_mmd_samples
                ));
                kid = Some(k_mean);
            }
        }
        println!("{line}");
        Ok(kid)
    }

    /// `n` samples, conditioned on the reference rows in order (cycled), from a fixed seed.
    fn generate(&self, n: usize) -> Result<Vec<f32>> {
        let (ctx, t) = (self.ctx, &self.ctx.cfg.training);
        let sampler = ctx.spec.sampler(ctx.cfg.denoising_steps, ctx.cfg.cfg_scale);
        let src = self.cond_source;
        let mut out = Vec::with_capacity(n * ctx.input.iter().product::<usize>());
        let mut rng = ChaCha8Rng::seed_from_u64(t.seed ^ 0x5a3b_1e00);
        let mut done = 0;
        while done < n {
            let b = t.eval_batch_size.min(n - done);
            let idx: Vec<usize> = (done..done + b).map(|i| i % src.len()).collect();
            let cond = conditions(ctx.shape.conditioning, &src.targets, &idx);
            let mut dims = vec![b];
            dims.extend(&ctx.input);
            let noise =
                Tensor::from_vec(normals(&mut rng, dims.iter().product()), dims, ctx.device)?;
            let x = sampler.sample(
                self.model,
                noise,
                &cond,
                ctx.shape.conditioning,
                &mut rng,
                |_, _| {},
            )?;
            out.extend(x.flatten_all()?.to_vec1::<f32>()?);
            done += b;
        }
        Ok(out)
    }

    /// Keep this evaluation among the 3 lowest KIDs: `best_eval/checkpoint-{step}` with the
    /// weights, the EMA weights and `metrics.json`; `best_eval/metadata.json` lists them.
    fn keep_best(&self, state: &mut State, kid: f64, ema: Option<&Ema>) -> Result<()> {
        let name = format!("checkpoint-{}", state.step);
        let mut best = state.best.clone();
        best.retain(|(_, s, _)| *s != state.step);
        best.push((kid, state.step, name.clone()));
        best.sort_by(|a, b| a.0.total_cmp(&b.0));
        let dir = self.ctx.run_dir.join("best_eval");
        for (_, _, gone) in best.iter().skip(3) {
            let p = dir.join(gone);
            if p.exists() {
                std::fs::remove_dir_all(&p)?;
            }
        }
        best.truncate(3);
        if best.iter().any(|(_, _, n)| *n == name) {
            let ema_map = ema.map(|e| ema_tensors(self.all_vars, e));
            let extras: Vec<(&str, &HashMap<String, Tensor>)> =
                ema_map.iter().map(|m| ("ema.safetensors", m)).collect();
            let path = dir.join(&name);
            checkpoint::save(&path, self.all_vars, &HashMap::new(), state, &extras)?;
            std::fs::write(
                path.join("sampling.json"),
                serde_json::to_string_pretty(&self.ctx.spec)?,
            )?;
            std::fs::write(
                path.join("metrics.json"),
                serde_json::to_string_pretty(
                    &serde_json::json!({"step": state.step, "kid_mean": kid}),
                )?,
            )?;
        }
        state.best = best;
        std::fs::write(
            dir.join("metadata.json"),
            serde_json::to_string_pretty(&state.best)?,
        )?;
        Ok(())
    }
}

/// Samples in [-range, range] as 8-bit pixels: (x/range + 1)/2 · 255, rounded, clamped (for
/// images, torchvision's save).
pub fn to_pixels(x: &[f32], range: f32) -> Vec<u8> {
    x.iter()
        .map(|v| ((v / range + 1.0) * 0.5 * 255.0 + 0.5).clamp(0.0, 255.0) as u8)
        .collect()
}

/// A lossless PNG grid of `n` samples (C, H, W each), 4 per row with 2-pixel black gaps
/// (torchvision's `make_grid(nrow=4, padding=2)`). Returns the PNG and its (C, H, W).
pub fn grid(
    samples: &[f32],
    n: usize,
    input: &[usize],
    range: f32,
) -> Result<(Vec<u8>, [usize; 3])> {
    let (c, h, w) = (input[0], input[1], input[2]);
    let cols = n.min(4);
    let rows = n.div_ceil(4);
    let (gh, gw) = (rows * (h + 2) + 2, cols * (w + 2) + 2);
    let px = to_pixels(samples, range);
    let mut out = vec![0u8; gh * gw * c];
    for k in 0..n {
        let (r, q) = (k / 4, k % 4);
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let v = px[((k * c + ch) * h + y) * w + x];
                    out[((2 + r * (h + 2) + y) * gw + 2 + q * (w + 2) + x) * c + ch] = v;
                }
            }
        }
    }
    Ok((crate::io::encode_png(&out, c, gh, gw)?, [c, gh, gw]))
}

/// `train --benchmark N`: N optimizer updates (forward, loss, backward, clipped AdamW) on one
/// random batch already on the device; benches/dit_step.py times the same step in diffusers.
fn benchmark(
    compiled: &Compiled,
    shape: &DitShape,
    cfg: &Diffusion,
    device: &Device,
    steps: usize,
) -> Result<()> {
    let t = &cfg.training;
    let bs = compiled.batch_size;
    let mut params = Params::new(t.seed, device);
    let model = Dit::new(shape, &mut params, device)?;
    let mut opt = Optimizer::new(&cfg.optimizer, params.trainable.clone())?;
    let mut rng = ChaCha8Rng::seed_from_u64(t.seed);
    let mut dims = vec![bs];
    dims.extend(compiled.input_shape);
    let x = Tensor::from_vec(normals(&mut rng, dims.iter().product()), dims, device)?;
    let cond = Condition::null(shape.conditioning, bs);
    let path = NoisePath::for_scheduler(&cfg.objective_scheduler, cfg.num_timesteps);
    let objective = Objective::parse(&cfg.prediction_type);
    let amp = precision::dtype_of(&t.mixed_precision);
    let spec = StepSpec {
        path: &path,
        objective,
        snr_gamma: t.snr_gamma,
        amp,
        checkpointing: t.gradient_checkpointing,
    };
    let mut scaler = LossScaler::for_dtype(amp);
    let mut step = |i: u64| -> Result<f64> {
        let mut r = ChaCha8Rng::seed_from_u64(i);
        let loss_scale = scaler.map_or(1.0, |s| s.scale);
        let (loss, mut grads) =
            diffusion_grads(&model, &x, &cond, &spec, (1.0, loss_scale), &mut r)?;
        update(
            &mut opt,
            &mut grads,
            scaler.as_mut(),
            cfg.optimizer.learning_rate,
            t.gradient_clip_norm,
        )?;
        Ok(loss)
    };
    step(0)?;
    device.synchronize()?;
    let started = Instant::now();
    let mut last = 0.0;
    for i in 0..steps {
        last = step(1 + i as u64)?;
    }
    device.synchronize()?;
    let secs = started.elapsed().as_secs_f64();
    let per_s = steps as f64 / secs;
    println!(
        "benchmark {}: {steps} updates of batch {bs} in {secs:.3} s: {:.3} images/s, {:.1} GFLOP/s by the plan's {:.1} GFLOP/update; last loss {last:.4}",
        compiled.name,
        per_s * bs as f64,
        per_s * compiled.flops_per_step as f64 / 1e9,
        compiled.flops_per_step as f64 / 1e9,
    );
    Ok(())
}
