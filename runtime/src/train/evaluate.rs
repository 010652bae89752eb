//! The diffusion trainer's evaluation: validation loss, a sample grid, KID and MMD² of generated
//! against real features, and the best-checkpoint selection by KID.

use std::sync::Arc;

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{self, State};
use super::diffusion::{ema_tensors, tensors, Ctx};
use crate::data::image::grid;
use crate::data::loader::{Loader, Split};
use crate::diffusion::denoiser::Denoiser;
use crate::diffusion::ema::Ema;
use crate::diffusion::fidelity::{signal_features, spectrogram_features, strips, Reference};
use crate::diffusion::loss::{diffusion_loss, StepSpec};
use crate::diffusion::path::normals;
use crate::diffusion::sampler::conditions;
use crate::track::Logger;

/// Features of the rows `rows` of `split` (of each image's dB channel at the model's resolution,
/// or of each series); `split` holds images also in latent space.
pub(super) fn reference_features(
    ctx: &Ctx,
    split: &Arc<Split>,
    rows: Vec<usize>,
) -> Result<Reference> {
    let mut feats = vec![];
    let loader = Loader::new(
        split.clone(),
        rows,
        64,
        ctx.image.clone(),
        ctx.cfg.dataset.num_workers,
        0,
    );
    for batch in loader {
        let batch = batch?;
        let per: usize = ctx.image.iter().product();
        for k in 0..batch.size {
            feats.push(sample_features(ctx, &batch.inputs[k * per..(k + 1) * per]));
        }
    }
    Ok(Reference::new(&feats))
}

/// The features of one image-shaped sample: of the signal for time series (1, C, T), else of
/// the spectrogram's dB channel (channel 0).
fn sample_features(ctx: &Ctx, sample: &[f32]) -> Vec<f32> {
    let (h, w) = (ctx.image[1], ctx.image[2]);
    if ctx.spec.timeseries {
        return signal_features(sample, h, w);
    }
    let geometry = strips(w, ctx.spec.source_width, ctx.spec.n_eeg_channels);
    spectrogram_features(&sample[..h * w], h, w, &geometry)
}

pub(super) struct Evaluator<'a> {
    pub(super) ctx: &'a Ctx<'a>,
    pub(super) model: &'a Denoiser,
    pub(super) trainable: &'a [(String, Var)],
    pub(super) all_vars: &'a [(String, Var)],
    pub(super) val: Option<&'a Arc<Split>>,
    /// Where generation takes its conditions from (validation, else training rows).
    pub(super) cond_source: &'a Arc<Split>,
    pub(super) reference: Option<&'a Reference>,
    /// Caption conditioning: the embeddings of the validation split's and the condition
    /// source's distinct captions.
    pub(super) val_texts: Option<Arc<Vec<f32>>>,
    pub(super) cond_texts: Option<Arc<Vec<f32>>>,
}

impl Evaluator<'_> {
    /// Validation loss, a sample grid, KID and MMD², all with the EMA weights when there are
    /// some; keeps the best 3 evaluations by KID in `best_eval/`.
    pub(super) fn run(
        &mut self,
        state: &mut State,
        ema: Option<&Ema>,
        log: &mut Logger,
    ) -> Result<()> {
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
                ctx.loaded(),
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
                let mut cond = conditions(ctx.shape.conditioning(), &val.targets, &idx);
                cond.texts = self.val_texts.clone();
                let mut rng = ChaCha8Rng::seed_from_u64(t.seed ^ 0x7a1d_0000 ^ b as u64);
                let x = ctx.batch_input(&batch.inputs, batch.size, &mut rng)?;
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
            let per: usize = ctx.image.iter().product();
            if t.eval_num_examples > 0 {
                let shown = &samples[..t.eval_num_examples * per];
                let (png, shape) = grid(
                    shown,
                    t.eval_num_examples,
                    &ctx.image,
                    ctx.spec.pixel_range(),
                )?;
                let dir = ctx.run_dir.join("samples");
                std::fs::create_dir_all(&dir)?;
                let path = dir.join(format!("step-{step:06}.png"));
                crate::data::io::write_atomic(&path, |w| Ok(w.write_all(&png)?))?;
                if ctx.spec.timeseries {
                    // The PNG is a heat map for the eye; the signals themselves, losslessly.
                    let mut dims = vec![t.eval_num_examples];
                    dims.extend(&ctx.image);
                    let npy = dir.join(format!("step-{step:06}.npy"));
                    crate::data::io::write_npy_f32(&npy, &dims, shown)?;
                }
                log.image("eval/generated_samples", &png, shape, step)?;
            }
            if let (Some(reference), true) = (self.reference, t.eval_mmd_samples >= 2) {
                let feats: Vec<Vec<f32>> = (0..t.eval_mmd_samples)
                    .map(|k| sample_features(ctx, &samples[k * per..(k + 1) * per]))
                    .collect();
                let f = reference.compare(&feats);
                log.scalar("eval/kid_mean", f.kid_mean, step)?;
                log.scalar("eval/kid_std", f.kid_std, step)?;
                log.scalar("eval/mmd2", f.mmd2, step)?;
                line.push_str(&format!(
                    " KID {:.4} ± {:.4} MMD² {:.4} ({} generated, {} reference; KID subsets of {})",
                    f.kid_mean, f.kid_std, f.mmd2, f.generated, f.reference, f.subset
                ));
                kid = Some(f.kid_mean);
            }
        }
        println!("{line}");
        Ok(kid)
    }

    /// `n` samples as images (decoded in latent space), conditioned on the reference rows in
    /// order (cycled), from a fixed seed.
    fn generate(&self, n: usize) -> Result<Vec<f32>> {
        let (ctx, t) = (self.ctx, &self.ctx.cfg.training);
        let sampler = ctx.spec.sampler(
            ctx.spec.sampler,
            ctx.cfg.inference.denoising_steps,
            ctx.cfg.inference.cfg_scale,
        )?;
        let src = self.cond_source;
        let mut out = Vec::with_capacity(n * ctx.image.iter().product::<usize>());
        let mut rng = ChaCha8Rng::seed_from_u64(t.seed ^ 0x5a3b_1e00);
        let mut done = 0;
        while done < n {
            let b = t.eval_batch_size.min(n - done);
            let idx: Vec<usize> = (done..done + b).map(|i| i % src.len()).collect();
            let mut cond = conditions(ctx.shape.conditioning(), &src.targets, &idx);
            cond.texts = self.cond_texts.clone();
            let mut dims = vec![b];
            dims.extend(&ctx.input);
            let noise =
                Tensor::from_vec(normals(&mut rng, dims.iter().product()), dims, ctx.device)?;
            let x = sampler.sample(
                self.model,
                noise,
                &cond,
                ctx.shape.conditioning(),
                &mut rng,
                |_, _| {},
            )?;
            out.extend(ctx.to_images(x)?.flatten_all()?.to_vec1::<f32>()?);
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
