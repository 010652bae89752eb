//! `train --benchmark N`: the training step of a config timed on one random batch already on
//! the device, so the loader and disk are out of the measurement. benches/classification_step.py
//! and benches/dit_step.py time the same steps in PyTorch and diffusers.

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use signal_diffusion_config::schema::{Classification, Diffusion};

use super::classification::{self, train_step};
use super::diffusion::update;
use super::optim::Optimizer;
use super::Compiled;
use crate::diffusion::denoiser::{Denoiser, DenoiserShape};
use crate::diffusion::loss::{diffusion_grads, StepSpec};
use crate::diffusion::path::{normals, Path as NoisePath};
use crate::models::classifier::{Backbone, Classifier};
use crate::models::dit::Condition;
use crate::models::nn::{Mode, Params};
use crate::ops::precision::{self, LossScaler};
use crate::tasks::TaskKind;

/// `train --benchmark N`: the training step of this config (forward, weighted task losses,
/// backward, clipped optimizer step, one read of the losses) on one random batch that stays on
/// the device, so the loader and disk are out of the measurement. benches/classification_step.py
/// times the same step in PyTorch.
pub(super) fn benchmark_classifier<B: Backbone>(
    compiled: &Compiled,
    shape: &B::Shape,
    cfg: &Classification,
    device: &Device,
    steps: usize,
) -> Result<()> {
    let (t, tasks, bs) = (&cfg.training, compiled.tasks, compiled.batch_size);
    let mut params = Params::new(t.seed, device);
    let model = Classifier::<B>::new(shape, tasks, &mut params)?;
    let mut opt = Optimizer::new(&cfg.optimizer, params.trainable.clone())?;
    let weights: Vec<f64> = cfg.tasks.iter().map(|t| t.weight).collect();
    let shape_vec = compiled.input_shape.to_vec();
    // Random inputs and targets: no training split to weigh classes by.
    let ctx = classification::Ctx {
        class_weights: vec![None; tasks.len()],
        norm: vec![None; tasks.len()],
        cfg,
        tasks,
        weights: &weights,
        device,
        shape: &shape_vec,
        workers: 0,
        batch_size: bs,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(t.seed);
    let per_sample: usize = shape_vec.iter().product();
    let x: Vec<f32> = (0..bs * per_sample)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    let x = ctx.tensor(&x, bs)?;
    let targets: Vec<Vec<f32>> = tasks
        .iter()
        .map(|spec| {
            (0..bs)
                .map(|_| match spec.kind {
                    TaskKind::Classification => rng.random_range(0..spec.outputs) as f32,
                    TaskKind::Regression => rng.random::<f32>(),
                })
                .collect()
        })
        .collect();
    let lr = cfg.optimizer.learning_rate;
    let mut step = |i: usize, timing: Option<&mut [f64; 3]>| -> Result<f64> {
        let mut mode = Mode::train(t.seed.wrapping_add(i as u64));
        let out = train_step(
            &ctx, &model, &mut opt, &x, &targets, &mut mode, lr, timing, None,
        )?;
        Ok(out.0)
    };
    // A CPU step of the baseline takes tens of seconds and has nothing to warm up but the
    // allocator: one step before, one for the phase split.
    let (warmup, split) = if device.is_cpu() { (1, 1) } else { (3, 3) };
    for i in 0..warmup {
        step(i, None)?;
    }
    device.synchronize()?;
    let started = Instant::now();
    let mut last = 0.0;
    for i in 0..steps {
        last = step(warmup + i, None)?;
    }
    device.synchronize()?;
    let secs = started.elapsed().as_secs_f64();
    let steps_per_s = steps as f64 / secs;
    // Where a step goes: more steps, waiting for the device after each phase.
    let mut phases = [0f64; 3];
    for i in 0..split {
        step(warmup + steps + i, Some(&mut phases))?;
    }
    let phases = phases.map(|ms| ms / split as f64);
    println!(
        "per step: forward + loss {:.1} ms, backward {:.1} ms, optimizer {:.1} ms",
        phases[0], phases[1], phases[2]
    );
    println!(
        "benchmark {}: {steps} steps of batch {bs} in {secs:.3} s: {steps_per_s:.3} steps/s, {:.1} samples/s, {:.2} TFLOP/s by the plan's {:.1} GFLOP/step; last loss {last:.4}",
        compiled.name,
        steps_per_s * bs as f64,
        steps_per_s * compiled.flops_per_step as f64 / 1e12,
        compiled.flops_per_step as f64 / 1e9,
    );
    Ok(())
}

/// `train --benchmark N`: N optimizer updates (forward, loss, backward, clipped AdamW) on one
/// random batch already on the device; benches/dit_step.py times the same step in diffusers.
pub(super) fn benchmark_diffusion(
    compiled: &Compiled,
    shape: &DenoiserShape,
    cfg: &Diffusion,
    device: &Device,
    steps: usize,
) -> Result<()> {
    let t = &cfg.training;
    let bs = compiled.batch_size;
    // As the trainer builds it: a LoRA config's pretrained weights frozen under adapters.
    let mut params = super::diffusion::model_params(cfg, device);
    let mut model = Denoiser::new(shape, &mut params, device)?;
    if let Some(path) = &cfg.model.pretrained_path {
        super::export::load_pretrained(path, shape, &params, device)?;
    }
    // The batch is unconditioned (random data): a UNet or an MMDiT reads a null caption of
    // zeros (the same work as the empty caption's; no text encoder is loaded).
    model.set_null_caption(&vec![0f32; shape.caption_width()], device)?;
    let mut opt = super::diffusion::optimizer(cfg, shape, &params)?;
    let mut rng = ChaCha8Rng::seed_from_u64(t.seed);
    let mut dims = vec![bs];
    dims.extend(compiled.input_shape);
    let x = Tensor::from_vec(normals(&mut rng, dims.iter().product()), dims, device)?;
    let cond = Condition::null(shape.conditioning(), bs);
    let path = NoisePath::for_scheduler(
        cfg.objective.scheduler,
        (
            &crate::diffusion::path::Betas::of(&cfg.objective),
            cfg.objective.flow_shift,
        ),
        cfg.objective.num_timesteps,
    );
    let objective = cfg.objective.prediction_type;
    let amp = precision::dtype_of(t.mixed_precision);
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
