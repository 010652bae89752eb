//! The training loss of a noise path, model-agnostic but for the forward: a clean batch noised at
//! drawn levels, the objective's target, the per-sample weighted MSE (one op,
//! `ops::loss::weighted_mse`), and its gradients under autocast and gradient checkpointing.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use signal_diffusion_config::choice::Objective;

use super::denoiser::Denoiser;
use super::path::{loss_weight, normals, per_sample, target, Level, Path as NoisePath};
use crate::models::dit::Condition;
use crate::ops::loss::weighted_mse;
use crate::ops::precision::Autocast;

/// A clean batch noised for training: the model input x_t = a·x + s·ε at per-sample levels, the
/// objective's target and the per-sample loss weights.
struct Noised {
    xt: Tensor,
    levels: Vec<Level>,
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
            target: target(objective, x, &eps)?,
            weights: Tensor::from_vec(w, b, x.device())?,
            levels,
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
    /// Gradient checkpointing (`Denoiser::loss_and_grads`).
    pub checkpointing: bool,
}

/// The weighted diffusion loss of a clean batch `x` (noise levels and noise from `rng`), in f32.
pub fn diffusion_loss(
    model: &Denoiser,
    x: &Tensor,
    cond: &Condition,
    spec: &StepSpec,
    rng: &mut ChaCha8Rng,
) -> Result<Tensor> {
    let n = Noised::draw(x, spec.path, spec.objective, spec.snr_gamma, rng)?;
    n.loss(&model.forward(&n.xt, &n.levels, cond)?, 1.0)
}

/// The diffusion loss of `x` and the gradients of that loss times `share` (a micro-batch's part
/// of the update) times `loss_scale` (fp16's), under the spec's autocast and checkpointing (the
/// same numbers up to summation order; `Denoiser::loss_and_grads`). Returns the loss times `share`, without the fp16
/// scale.
pub fn diffusion_grads(
    model: &Denoiser,
    x: &Tensor,
    cond: &Condition,
    spec: &StepSpec,
    (share, loss_scale): (f64, f64),
    rng: &mut ChaCha8Rng,
) -> Result<(f64, GradStore)> {
    let _amp = Autocast::enter(spec.amp);
    let n = Noised::draw(x, spec.path, spec.objective, spec.snr_gamma, rng)?;
    let scale = share * loss_scale;
    // Drawn only when the model drops out, so runs without dropout keep their noise draws.
    let seed = model.is_stochastic().then(|| rng.random::<u64>());
    let (loss, grads) =
        model.loss_and_grads(&n.xt, &n.levels, cond, (seed, spec.checkpointing), |out| {
            n.loss(out, scale)
        })?;
    Ok((loss.to_scalar::<f32>()? as f64 / loss_scale, grads))
}
