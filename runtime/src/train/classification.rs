//! The multi-task classification trainer, top to bottom: resolve the embedded config, load the
//! splits, build the model, then the loop (forward, weighted loss, backward, clip, update,
//! schedule), evaluation and checkpoints at the step where they are due, and a final test-split
//! evaluation of the best and last weights.
//!
//! Fixed against the reference on purpose (see docs/config.md): evaluation, selection and
//! checkpointing happen at the step where evaluation runs (not at epoch end); step checkpoints
//! are named by step; the selection score treats regression as 1/(1+MAE) instead of maximising
//! the MAE; a full resume state is saved; the test split is evaluated.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use signal_diffusion_config::choice::{CheckpointStrategy, ClassWeights, EvalStrategy};
use signal_diffusion_config::{schema::Classification, Kind};

use super::benchmark::benchmark_classifier;
use super::checkpoint::{self, State};
use super::metrics::{Metrics, Running};
use super::swa::{swa_lr, Swa};
use super::{list_dirs, Compiled, RunOptions};
use crate::data::io::fnv;
use crate::data::loader::{read_split, Loader, Split};
use crate::models::classifier::{Backbone, Classifier};
use crate::models::nn::{Mode, Params};
use crate::ops::precision::Autocast;
use crate::tasks::{TaskKind, TaskSpec};
use crate::track::{Logger, Tracking};
use crate::train::optim::{lr_factor, GradNorm, Optimizer};

/// Entry point of a generated classification trainer.
pub fn main<B: Backbone>(compiled: &Compiled, shape: &B::Shape, options: RunOptions) -> ExitCode {
    match run::<B>(compiled, shape, options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run<B: Backbone>(compiled: &Compiled, shape: &B::Shape, options: RunOptions) -> Result<()> {
    let config = compiled.resolve(&options.sets)?;
    if super::answered(compiled, &config, &options) {
        return Ok(());
    }
    let Kind::Classification(cfg) = &config.kind else {
        bail!("this trainer was compiled for classification")
    };
    let tasks = compiled.tasks;
    let t = &cfg.training;
    let device = super::select_device(t.device, compiled)?;
    if let Some(steps) = options.benchmark {
        return benchmark_classifier::<B>(compiled, shape, cfg, &device, steps);
    }

    // Run directory: a resumed run continues in the run that wrote the checkpoint.
    let resume = options
        .resume
        .clone()
        .or(t.resume.as_ref().map(PathBuf::from));
    let name = t.run_name.clone().unwrap_or_else(|| {
        format!(
            "{}-{}-{}",
            compiled.name,
            cfg.model.backbone,
            cfg.dataset.tasks.join("-")
        )
    });
    let run_dir = super::run_directory(
        compiled,
        &config,
        &options,
        resume.as_deref(),
        (t.output_dir.as_ref(), "runs/classification"),
        name,
    )?;

    // Data.
    let ds = &cfg.dataset;
    let dir = &super::dataset_dir(compiled, &ds.name, &ds.path, ds.named.is_some())?;
    super::check_layout(dir, &config)?;
    let train = Arc::new(read_split(dir, &cfg.dataset.train_split, tasks, None)?);
    let val = if t.eval_strategy == EvalStrategy::None {
        None
    } else {
        Some(Arc::new(read_split(
            dir,
            &cfg.dataset.val_split,
            tasks,
            None,
        )?))
    };
    let test = match crate::data::loader::has_split(dir, &cfg.dataset.test_split) {
        true => Some(Arc::new(read_split(
            dir,
            &cfg.dataset.test_split,
            tasks,
            None,
        )?)),
        false => None,
    };
    let bs = compiled.batch_size;
    let batches_per_epoch = train.len().div_ceil(bs);
    // With SWA, extra epochs follow the main schedule (see train/swa.rs).
    let cap = t.max_steps.unwrap_or(usize::MAX);
    let swa_epochs = if t.swa_enabled {
        ((t.epochs as f64 * t.swa_extra_ratio) as usize).max(1)
    } else {
        0
    };
    let total_epochs = t.epochs + swa_epochs;
    let main_steps = (t.epochs * batches_per_epoch).min(cap);
    let total_steps = (total_epochs * batches_per_epoch).min(cap);
    println!(
        "train {} samples ({} batches of {bs}), val {}, test {}; {} steps; {} parameters",
        train.len(),
        batches_per_epoch,
        val.as_ref().map_or(0, |v| v.len()),
        test.as_ref().map_or(0, |v| v.len()),
        total_steps,
        compiled.parameters
    );

    // Model and optimizer.
    let mut params = Params::new(t.seed, &device);
    let model = Classifier::<B>::new(shape, tasks, &mut params)?;
    let all_vars: Vec<_> = params
        .trainable
        .iter()
        .chain(&params.buffers)
        .cloned()
        .collect();
    let mut opt = Optimizer::new(&cfg.optimizer, params.trainable.clone())?;
    println!("{}", opt.describe());
    let weights: Vec<f64> = cfg.tasks.iter().map(|t| t.weight).collect();
    let config_hash = format!("{:016x}", fnv(config.to_json().as_bytes()));
    let mut state = State {
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        best: vec![],
        evals_without_improvement: 0,
        best_score: None,
        config_hash: config_hash.clone(),
        target_norm: target_norm(tasks, &train),
        swa_n: 0,
        loss_scaler: None,
        config: Some(config.to_value()),
    };
    let mut swa = Swa::new();
    if let Some(ck) = &resume {
        let loaded = checkpoint::load(ck, &device)?;
        checkpoint::check_config(&config, &loaded.state, ck)?;
        checkpoint::restore(&all_vars, &loaded.model)?;
        opt.load_state(&loaded.optimizer, loaded.state.step)?;
        if let Some(avg) = loaded.extras.get("swa.safetensors") {
            swa = Swa::restore(&params.trainable, avg, loaded.state.swa_n)?;
        }
        // Later checkpoints record the config this run continues with.
        state = State {
            config_hash: config_hash.clone(),
            config: Some(config.to_value()),
            ..loaded.state
        };
        println!(
            "resumed from {} at step {} (epoch {}, batch {})",
            ck.display(),
            state.step,
            state.epoch,
            state.batch_in_epoch
        );
    }

    let tracking = Tracking {
        tensorboard: t.tensorboard,
        log_dir: t.log_dir.as_ref(),
        mlflow: t.mlflow,
        wandb_project: t.wandb_project.as_deref(),
        wandb_entity: t.wandb_entity.as_deref(),
        wandb_tags: &t.wandb_tags,
        run_name: t.run_name.as_deref(),
        histogram_every: t.histogram_every_batches as u64,
    };
    let mut log = Logger::open(&run_dir, &tracking, &config, compiled.plan)?;
    let ckpt_dir = run_dir.join("checkpoints");
    let mut periodic: Vec<PathBuf> = list_dirs(&ckpt_dir, "step-");
    let shape_vec = compiled.input_shape.to_vec();
    let class_weights = class_weights(t.class_weights, tasks, &train);
    for (spec, w) in tasks.iter().zip(&class_weights) {
        if let Some(w) = w {
            let w: Vec<String> = w.iter().map(|v| format!("{v:.3}")).collect();
            println!(
                "class weights of {} (balanced): [{}]",
                spec.name,
                w.join(", ")
            );
        }
    }
    let ctx = Ctx {
        class_weights: class_weights
            .into_iter()
            .map(|w| w.map(|w| Tensor::new(w.as_slice(), &device)).transpose())
            .collect::<candle_core::Result<_>>()?,
        norm: state.target_norm.clone(),
        cfg,
        tasks,
        weights: &weights,
        device: &device,
        shape: &shape_vec,
        workers: cfg.dataset.num_workers,
        batch_size: bs,
    };

    let started = Instant::now();
    let first_step = state.step;
    log.start_progress(total_steps as u64, first_step);
    let mut stop = false;
    let mut running = Running::new(tasks.len());
    'epochs: while state.epoch < total_epochs && !stop {
        let mut order: Vec<usize> = (0..train.len()).collect();
        if cfg.dataset.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(
                t.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(state.epoch as u64 + 1)),
            ));
        }
        let skip = state.batch_in_epoch * bs;
        let loader = Loader::new(
            train.clone(),
            order[skip.min(order.len())..].to_vec(),
            bs,
            shape_vec.clone(),
            cfg.dataset.num_workers,
            0,
        );
        for batch in loader {
            if state.step as usize >= total_steps {
                break 'epochs;
            }
            let batch = batch?;
            let x = ctx.tensor(&batch.inputs, batch.size)?;
            // Dropout masks come from (seed, step), so a resumed run draws the same masks.
            let mut mode = Mode::train(
                t.seed
                    .wrapping_add(state.step.wrapping_mul(0x2545_f491_4f6c_dd1d)),
            );
            let base = cfg.optimizer.learning_rate;
            let s = state.step as usize;
            let lr = if s < main_steps {
                base * lr_factor(&cfg.scheduler, s, main_steps)
            } else {
                let anneal = ((0.9 * batches_per_epoch as f64) as usize).max(1);
                swa_lr(
                    base * lr_factor(&cfg.scheduler, main_steps, main_steps),
                    base * t.swa_lr_frac,
                    s - main_steps + 1,
                    anneal,
                )
            };
            let (loss_v, per_task, grad_norm) = train_step(
                &ctx,
                &model,
                &mut opt,
                &x,
                &batch.targets,
                &mut mode,
                lr,
                None,
                log.wants_histograms(state.step + 1)
                    .then_some((&mut log, state.step + 1)),
            )?;
            state.step += 1;
            state.batch_in_epoch += 1;
            if !loss_v.is_finite() {
                bail!("the loss became {loss_v} at step {}; lower `optimizer.learning_rate` or enable `clip_grad_norm`", state.step);
            }
            running.add(loss_v, &per_task, batch.size);
            let step = state.step;
            log.scalar("train/loss_step", loss_v, step)?;
            let mut status = None;
            if step.is_multiple_of(t.log_every_batches as u64) || step as usize == total_steps {
                let avg = running.loss();
                log.scalar("train/loss", avg, step)?;
                for (i, spec) in tasks.iter().enumerate() {
                    log.scalar(&format!("train/loss/{}", spec.name), running.task(i), step)?;
                }
                log.scalar("train/lr", lr, step)?;
                let grad_norm = grad_norm.value()?;
                log.scalar("train/grad_norm", grad_norm, step)?;
                // Steps this process ran (a resumed run starts at a later step); FLOPs from the plan.
                let steps_per_s =
                    (step - first_step) as f64 / started.elapsed().as_secs_f64().max(1e-9);
                let gflops = steps_per_s * compiled.flops_per_step as f64 / 1e9;
                let samples_per_s = steps_per_s * bs as f64;
                log.line(&format!("epoch {} step {step}/{total_steps} loss {avg:.4} lr {lr:.2e} grad_norm {grad_norm:.3} ({samples_per_s:.1} samples/s, {gflops:.1} GFLOP/s)", state.epoch + 1));
                status = Some(format!(
                    "loss {avg:.4} lr {lr:.2e} {samples_per_s:.1} samples/s"
                ));
                running = Running::new(tasks.len());
            }
            log.step(status);
            stop = milestone(
                When::Step,
                &ctx,
                &model,
                val.as_ref(),
                &mut state,
                &all_vars,
                &opt,
                &ckpt_dir,
                &mut periodic,
                &mut log,
                &swa,
                main_steps,
            )?;
            if stop {
                break 'epochs;
            }
        }
        state.epoch += 1;
        state.batch_in_epoch = 0;
        if state.epoch > t.epochs {
            swa.update(&params.trainable)?;
            state.swa_n = swa.n;
        }
        stop = milestone(
            When::Epoch,
            &ctx,
            &model,
            val.as_ref(),
            &mut state,
            &all_vars,
            &opt,
            &ckpt_dir,
            &mut periodic,
            &mut log,
            &swa,
            main_steps,
        )?;
    }
    log.finish_progress();
    if stop {
        println!(
            "early stopping: no improvement in {} evaluations",
            t.early_stopping_patience
        );
    }
    let last = ckpt_dir.join("last");
    checkpoint::save(
        &last,
        &all_vars,
        &opt.state()?,
        &state,
        &swa_file(swa.tensors(&params.trainable).as_ref()),
    )?;
    // The SWA model: averaged weights with BatchNorm statistics recomputed over the train split.
    let swa_dir = ckpt_dir.join("swa");
    if let Some(saved) = swa.swap_in(&params.trainable)? {
        ctx.recompute_batchnorm(&model, &train, &params.buffers, t.seed)?;
        checkpoint::save(&swa_dir, &all_vars, &opt.state()?, &state, &[])?;
        Swa::swap_out(&params.trainable, Some(saved))?;
    }
    log.flush()?;

    // Final evaluation on the test split with the last and the best weights.
    let mut rows = vec![];
    if let Some(test) = &test {
        let mut candidates = vec![("last".to_string(), last.clone())];
        if let Some((_, _, name)) = state.best.first() {
            candidates.push(("best".to_string(), ckpt_dir.join(name)));
        }
        if swa.n > 0 {
            candidates.push(("swa".to_string(), swa_dir.clone()));
        }
        for (label, dir) in candidates {
            if !dir.join("state.json").exists() {
                println!(
                    "note: the {label} checkpoint {} is gone; not evaluated",
                    dir.display()
                );
                continue;
            }
            checkpoint::restore(&all_vars, &checkpoint::load(&dir, ctx.device)?.model)?;
            let m = ctx.evaluate(&model, test)?;
            println!("test ({label}): {}", m.describe(tasks));
            for (k, v) in m.scalars(tasks) {
                log.scalar(&format!("test_{label}/{k}"), v, state.step)?;
                rows.push((label.clone(), k, v));
            }
        }
        log.flush()?;
    }
    let summary = serde_json::json!({
        "run_dir": run_dir,
        "steps": state.step,
        "best": state.best,
        "test": rows.iter().map(|(l, k, v)| serde_json::json!({"weights": l, "metric": k, "value": v})).collect::<Vec<_>>(),
    });
    std::fs::write(
        run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    if let Some(p) = &t.metrics_summary_path {
        let p = PathBuf::from(p);
        crate::data::io::write_atomic(&p, |w| {
            writeln!(w, "weights,metric,value")?;
            for (l, k, v) in &rows {
                writeln!(w, "{l},{k},{v}")?;
            }
            Ok(())
        })?;
    }
    // The best validation selection score (the best checkpoint's), in W&B's summary.
    let best: Vec<(&str, f64)> = state
        .best_score
        .map(|b| ("best/selection_score", b))
        .into_iter()
        .collect();
    log.finish(&best)?;
    println!(
        "done: {} steps in {:.1} s; checkpoints in {}",
        state.step,
        started.elapsed().as_secs_f64(),
        ckpt_dir.display()
    );
    Ok(())
}

/// One optimizer step: forward, weighted task losses, backward, clipped update, then one read of
/// the losses (total and per task) to the host. With `timing` (`--benchmark`) it waits for the
/// device after each phase and adds the forward + loss, backward and update times (ms) to it.
#[allow(clippy::too_many_arguments)]
pub(super) fn train_step<B: Backbone>(
    ctx: &Ctx,
    model: &Classifier<B>,
    opt: &mut Optimizer,
    x: &Tensor,
    targets: &[Vec<f32>],
    mode: &mut Mode,
    lr: f64,
    mut timing: Option<&mut [f64; 3]>,
    histograms: Option<(&mut Logger, u64)>,
) -> Result<(f64, Vec<f64>, GradNorm)> {
    let t = &ctx.cfg.training;
    let mut lap = Instant::now();
    let mut phase_done = |i: usize| -> Result<()> {
        if let Some(times) = timing.as_deref_mut() {
            ctx.device.synchronize()?;
            times[i] += lap.elapsed().as_secs_f64() * 1e3;
            lap = Instant::now();
        }
        Ok(())
    };
    // `use_amp`: bf16 products (precision.rs). The reference autocasts to fp16 with a loss
    // scaler; bf16 keeps f32's exponent range, so no gradient underflows and none is skipped.
    let outputs = {
        let _amp = Autocast::enter(t.use_amp.then_some(DType::BF16));
        model.forward(x, mode)?
    };
    let (loss, per_task) = ctx.loss(&outputs, targets, t.label_smoothing)?;
    phase_done(0)?;
    let mut grads = loss.backward()?;
    phase_done(1)?;
    if let Some((log, step)) = histograms {
        log.parameter_histograms(opt.params(), &grads, 1.0, step)?;
    }
    let grad_norm = opt.step(&mut grads, lr, t.clip_grad_norm)?;
    let (loss_v, per_task) = read_losses(&loss, &per_task)?;
    phase_done(2)?;
    Ok((loss_v, per_task, grad_norm))
}

/// What the step and evaluation code needs, bundled.
pub(super) struct Ctx<'a> {
    /// Regression target standardisation, per task (see `target_norm`).
    pub(super) norm: Vec<Option<(f32, f32)>>,
    /// Per classification task, its classes' weights in the cross-entropy (`class_weights`).
    pub(super) class_weights: Vec<Option<Tensor>>,
    pub(super) cfg: &'a Classification,
    pub(super) tasks: &'a [TaskSpec],
    pub(super) weights: &'a [f64],
    pub(super) device: &'a Device,
    pub(super) shape: &'a [usize],
    pub(super) workers: usize,
    pub(super) batch_size: usize,
}

impl Ctx<'_> {
    pub(super) fn tensor(&self, data: &[f32], n: usize) -> Result<Tensor> {
        let mut dims = vec![n];
        dims.extend_from_slice(self.shape);
        Ok(Tensor::from_slice(data, dims.as_slice(), self.device)?)
    }

    /// Σ w_t · L_t: cross-entropy with label smoothing (with class weights: Σ_i c_{y_i}·l_i /
    /// Σ_i c_{y_i}, PyTorch's weighted mean), or Huber (δ = 2) for regression.
    /// Returns the total and each task's loss, still on the device (see [`read_losses`]).
    fn loss(
        &self,
        outputs: &[Tensor],
        targets: &[Vec<f32>],
        smoothing: f64,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut total: Option<Tensor> = None;
        let mut per_task = vec![];
        for (t, ((out, target), (spec, w))) in outputs
            .iter()
            .zip(targets)
            .zip(self.tasks.iter().zip(self.weights))
            .enumerate()
        {
            let l = match spec.kind {
                TaskKind::Classification => {
                    let y = Tensor::from_iter(target.iter().map(|&v| v as u32), self.device)?;
                    let logp = candle_nn::ops::log_softmax(out, D::Minus1)?;
                    let nll = logp.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
                    let smooth = logp.mean(D::Minus1)?.neg()?;
                    let per_sample = ((nll * (1.0 - smoothing))? + (smooth * smoothing)?)?;
                    match &self.class_weights[t] {
                        // Stays on the device: no read of Σ w in the training step.
                        Some(c) => {
                            let w = c.gather(&y, 0)?;
                            (per_sample * &w)?.sum_all()?.div(&w.sum_all()?)?
                        }
                        None => per_sample.mean_all()?,
                    }
                }
                TaskKind::Regression => {
                    let (mean, std) = self.norm[t].unwrap_or((0.0, 1.0));
                    let y: Vec<f32> = target.iter().map(|v| (v - mean) / std).collect();
                    let y = Tensor::from_slice(&y, y.len(), self.device)?;
                    huber(&out.squeeze(1)?, &y, 2.0)?
                }
            };
            let weighted = (&l * *w)?;
            per_task.push(l);
            total = Some(match total {
                None => weighted,
                Some(t) => (t + weighted)?,
            });
        }
        Ok((total.context("at least one task")?, per_task))
    }

    /// PyTorch's `update_bn`: running statistics reset, then a cumulative average over one pass
    /// of the train split in training mode (no gradient step). A no-op without BatchNorm.
    fn recompute_batchnorm<B: Backbone>(
        &self,
        model: &Classifier<B>,
        train: &Arc<Split>,
        buffers: &[(String, candle_core::Var)],
        seed: u64,
    ) -> Result<()> {
        if buffers.is_empty() {
            return Ok(());
        }
        for (name, v) in buffers {
            let fill = if name.ends_with("running_var") {
                1.0
            } else {
                0.0
            };
            v.set(&(v.as_tensor().ones_like()? * fill)?)?;
        }
        let loader = Loader::new(
            train.clone(),
            (0..train.len()).collect(),
            self.batch_size,
            self.shape.to_vec(),
            self.workers,
            0,
        );
        for (i, batch) in loader.enumerate() {
            let batch = batch?;
            let mut mode = Mode::train(seed ^ 0x5eed_b47c);
            mode.bn_momentum = 1.0 / (i + 1) as f64;
            model.forward(&self.tensor(&batch.inputs, batch.size)?, &mut mode)?;
        }
        Ok(())
    }

    fn evaluate<B: Backbone>(&self, model: &Classifier<B>, split: &Arc<Split>) -> Result<Metrics> {
        let loader = Loader::new(
            split.clone(),
            (0..split.len()).collect(),
            self.batch_size,
            self.shape.to_vec(),
            self.workers,
            0,
        );
        let mut m = Metrics::new(self.tasks);
        let mut mode = Mode::eval();
        for batch in loader {
            let batch = batch?;
            let x = self.tensor(&batch.inputs, batch.size)?;
            let outputs = model.forward(&x, &mut mode)?;
            let (loss, _) = self.loss(&outputs, &batch.targets, 0.0)?;
            m.loss_sum += loss.to_scalar::<f32>()? as f64 * batch.size as f64;
            m.n += batch.size;
            for (i, (out, target)) in outputs.iter().zip(&batch.targets).enumerate() {
                match self.tasks[i].kind {
                    TaskKind::Classification => {
                        let pred = out
                            .argmax(D::Minus1)?
                            .to_dtype(DType::U32)?
                            .to_vec1::<u32>()?;
                        m.preds[i].extend(pred.iter().map(|&p| p as f32));
                    }
                    TaskKind::Regression => {
                        let (mean, std) = self.norm[i].unwrap_or((0.0, 1.0));
                        m.preds[i].extend(
                            out.squeeze(1)?
                                .to_vec1::<f32>()?
                                .into_iter()
                                .map(|p| p * std + mean),
                        );
                    }
                }
                m.targets[i].extend_from_slice(target);
            }
        }
        Ok(m)
    }
}

/// The total and per-task losses of a step on the host, in one copy (one wait for the device).
fn read_losses(total: &Tensor, per_task: &[Tensor]) -> Result<(f64, Vec<f64>)> {
    let mut all = vec![total.clone()];
    all.extend(per_task.iter().cloned());
    let v = Tensor::stack(&all, 0)?.to_vec1::<f32>()?;
    Ok((v[0] as f64, v[1..].iter().map(|&x| x as f64).collect()))
}

/// Regression targets are standardised with the train split's mean and population std (the
/// reference regresses raw years with Huber δ = 2, whose loss then dwarfs the classification
/// terms and swamps the shared features). Metrics are reported back in the column's units.
fn target_norm(tasks: &[TaskSpec], train: &Split) -> Vec<Option<(f32, f32)>> {
    tasks
        .iter()
        .zip(&train.targets)
        .map(|(t, y)| {
            (t.kind == TaskKind::Regression).then(|| {
                let n = y.len().max(1) as f64;
                let mean = y.iter().map(|&v| v as f64).sum::<f64>() / n;
                let std = (y.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
                (mean as f32, if std > 0.0 { std as f32 } else { 1.0 })
            })
        })
        .collect()
}

fn huber(pred: &Tensor, y: &Tensor, delta: f64) -> Result<Tensor> {
    let diff = (pred - y)?;
    let abs = diff.abs()?;
    let quad = (diff.sqr()? * 0.5)?;
    let lin = ((abs.clone() - 0.5 * delta)? * delta)?;
    Ok(abs.le(delta)?.where_cond(&quad, &lin)?.mean_all()?)
}

/// Where in the loop `milestone` is called: after an optimizer step, or at the end of an epoch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum When {
    Step,
    Epoch,
}

/// The evaluation and checkpoint due at this point (`when`). Returns true when early stopping
/// says stop.
#[allow(clippy::too_many_arguments)]
fn milestone<B: Backbone>(
    when: When,
    ctx: &Ctx,
    model: &Classifier<B>,
    val: Option<&Arc<Split>>,
    state: &mut State,
    vars: &[(String, candle_core::Var)],
    opt: &Optimizer,
    ckpt_dir: &Path,
    periodic: &mut Vec<PathBuf>,
    log: &mut Logger,
    swa: &Swa,
    main_steps: usize,
) -> Result<bool> {
    let t = &ctx.cfg.training;
    // A strategy is due at its own point of the loop, and "steps" only every `every` steps.
    let due = |at: Option<When>, every: Option<usize>, step: u64| {
        at == Some(when) && (when == When::Epoch || step.is_multiple_of(every.unwrap_or(1) as u64))
    };
    let eval_at = match t.eval_strategy {
        EvalStrategy::Epoch => Some(When::Epoch),
        EvalStrategy::Steps => Some(When::Step),
        EvalStrategy::None => None,
    };
    let checkpoint_at = match t.checkpoint_strategy {
        CheckpointStrategy::Epoch => When::Epoch,
        CheckpointStrategy::Steps => When::Step,
    };
    let mut stop = false;
    if due(eval_at, t.eval_steps, state.step) {
        // During SWA the averaged weights are the ones evaluated (and kept when best); early
        // stopping is off in that phase, as in the reference.
        let saved = swa.swap_in(vars)?;
        let result = evaluate_and_select(ctx, model, val, state, vars, opt, ckpt_dir, log);
        Swa::swap_out(vars, saved)?;
        stop = result? && state.step as usize <= main_steps;
    }
    if due(Some(checkpoint_at), t.checkpoint_steps, state.step) {
        save_periodic(
            ckpt_dir,
            periodic,
            vars,
            opt,
            state,
            t.checkpoint_total_limit,
            swa,
        )?;
    }
    Ok(stop)
}

/// Evaluate on `val`, log, keep the best checkpoints, track early stopping. Returns `stop`.
#[allow(clippy::too_many_arguments)]
fn evaluate_and_select<B: Backbone>(
    ctx: &Ctx,
    model: &Classifier<B>,
    val: Option<&Arc<Split>>,
    state: &mut State,
    vars: &[(String, candle_core::Var)],
    opt: &Optimizer,
    ckpt_dir: &Path,
    log: &mut Logger,
) -> Result<bool> {
    let Some(val) = val else { return Ok(false) };

    let m = ctx.evaluate(model, val)?;
    let score = m.score(ctx.tasks, ctx.weights);
    for (k, v) in m.scalars(ctx.tasks) {
        log.scalar(&format!("val/{k}"), v, state.step)?;
    }
    log.scalar("val/selection_score", score, state.step)?;
    log.flush()?;
    log.line(&format!(
        "eval step {}: {} score {score:.4}",
        state.step,
        m.describe(ctx.tasks)
    ));

    let t = &ctx.cfg.training;
    let improved = state.best_score.is_none_or(|b| score > b);
    if improved {
        state.best_score = Some(score);
        state.evals_without_improvement = 0;
    } else {
        state.evals_without_improvement += 1;
    }
    // Top-k by score, saved at the step it was measured.
    let qualifies = state.best.len() < t.max_best_checkpoints
        || state.best.last().is_some_and(|(s, _, _)| score > *s);
    if qualifies {
        let name = format!("best-step{:08}", state.step);
        state.best.push((score, state.step, name.clone()));
        state.best.sort_by(|a, b| b.0.total_cmp(&a.0));
        while state.best.len() > t.max_best_checkpoints {
            let (_, _, evicted) = state.best.pop().expect("non-empty");
            let _ = std::fs::remove_dir_all(ckpt_dir.join(evicted));
        }
        checkpoint::save(&ckpt_dir.join(&name), vars, &opt.state()?, state, &[])?;
    }
    Ok(t.early_stopping && state.evals_without_improvement >= t.early_stopping_patience)
}

fn save_periodic(
    dir: &Path,
    periodic: &mut Vec<PathBuf>,
    vars: &[(String, candle_core::Var)],
    opt: &Optimizer,
    state: &State,
    limit: Option<usize>,
    swa: &Swa,
) -> Result<()> {
    let path = dir.join(format!("step-{:08}", state.step));
    checkpoint::save(
        &path,
        vars,
        &opt.state()?,
        state,
        &swa_file(swa.tensors(vars).as_ref()),
    )?;
    if !periodic.contains(&path) {
        periodic.push(path);
    }
    if let Some(k) = limit {
        checkpoint::prune(periodic, k)?;
    }
    Ok(())
}

/// The SWA average as a checkpoint's extra file, when there is one.
fn swa_file(
    avg: Option<&HashMap<String, Tensor>>,
) -> Vec<(&'static str, &HashMap<String, Tensor>)> {
    avg.map(|a| ("swa.safetensors", a)).into_iter().collect()
}

/// `class_weights = "balanced"`: per classification task, n / (k · n_c) for each class c of the
/// k classes present in the training split (scikit-learn's "balanced"), 0 for a class it lacks;
/// `None` for regression tasks and without the option.
fn class_weights(how: ClassWeights, tasks: &[TaskSpec], train: &Split) -> Vec<Option<Vec<f32>>> {
    tasks
        .iter()
        .zip(&train.targets)
        .map(|(spec, targets)| {
            if how == ClassWeights::None || spec.kind != TaskKind::Classification {
                return None;
            }
            let mut counts = vec![0usize; spec.outputs];
            for &v in targets {
                counts[v as usize] += 1;
            }
            let present = counts.iter().filter(|&&c| c > 0).count().max(1);
            let n = targets.len() as f32;
            Some(
                counts
                    .iter()
                    .map(|&c| {
                        if c == 0 {
                            0.0
                        } else {
                            n / (present as f32 * c as f32)
                        }
                    })
                    .collect(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::image::Augment;
    use crate::data::loader::Samples;

    #[test]
    fn balanced_class_weights_are_inverse_frequencies() {
        let task = |name, kind, outputs| TaskSpec {
            name,
            kind,
            outputs,
            column: name,
            encoder: "int",
        };
        let tasks = [
            task("seizure", TaskKind::Classification, 3),
            task("age", TaskKind::Regression, 1),
        ];
        // 6 background, 2 seizure windows; class 2 absent.
        let split = Split {
            name: "train".into(),
            source: PathBuf::new(),
            samples: Samples::Files(vec![PathBuf::new(); 8]),
            targets: vec![vec![0., 0., 0., 0., 0., 0., 1., 1.], vec![30.; 8]],
            augment: Augment::default(),
            texts: vec![],
        };
        let w = class_weights(ClassWeights::Balanced, &tasks, &split);
        // n / (k · n_c) with k = 2 classes present: 8 / (2·6), 8 / (2·2), 0.
        assert_eq!(w[0], Some(vec![8.0 / 12.0, 2.0, 0.0]));
        assert_eq!(w[1], None);
        assert!(class_weights(ClassWeights::None, &tasks, &split)
            .iter()
            .all(Option::is_none));
    }
}
