//! The diffusion math, top to bottom: noise paths (rectified flow, VP/DDPM), what the model is
//! trained to predict and with which weight, the samplers that invert the path (flow Euler and
//! Heun, DDIM/DDPM), classifier-free guidance, and the EMA of the weights.
//!
//! Conventions. A path gives, per noise level, x_t = a·x + s·ε. Rectified flow: a = 1 − σ,
//! s = σ, σ ∈ {1/T, …, 1} drawn logit-normal and fed to the model as t = σ·T (the reference).
//! VP: a = √ᾱ_t, s = √(1 − ᾱ_t), t uniform in 0..T, β linear 1e-4 → 0.02 (diffusers' DDPM
//! default). SNR = a²/s² on both. The objective says what the network outputs: `vector_field`
//! v = ε − x, `epsilon` ε, `sample` x; every sampler converts any of them to what it steps with,
//! so each objective samples correctly under each path it is allowed on (the reference fed ε into
//! its flow Euler step, §7.5).
//!
//! Soft-min-SNR (HDiT): the x-space weight is w_x = 1 / (1/SNR + 1/γ); the loss of the predicted
//! quantity q gets w_x · (dx/dq)², the exact factor of the path: σ² for v on the flow path
//! (x = x_t − σ·v), 1/SNR for ε (x = (x_t − s·ε)/a), 1 for x. The reference used the VP factor
//! 1/(SNR + 1) for v (§7.7).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::ops::contiguous;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::dit::{Condition, Conditioning, Dit};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    VectorField,
    Epsilon,
    Sample,
}

impl Objective {
    pub fn parse(name: &str) -> Objective {
        match name {
            "vector_field" => Objective::VectorField,
            "sample" => Objective::Sample,
            _ => Objective::Epsilon,
        }
    }
}

/// The forward (noising) process.
#[derive(Debug, Clone)]
pub enum Path {
    /// Rectified flow over `timesteps` discrete levels σ = k/T.
    Flow { timesteps: usize },
    /// Variance preserving with ᾱ per integer timestep.
    Vp { alphas_cumprod: Vec<f64> },
}

/// One sample's noise level: the model's time input and the path's coefficients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Level {
    /// What the model is given as its timestep (σ·T on the flow path, the integer t on VP).
    pub t: f32,
    /// x_t = a·x + s·ε.
    pub a: f64,
    pub s: f64,
}

impl Level {
    pub fn snr(&self) -> f64 {
        (self.a * self.a) / (self.s * self.s)
    }
}

impl Path {
    pub fn flow(timesteps: usize) -> Path {
        Path::Flow { timesteps }
    }

    /// diffusers' DDPMScheduler default: β = linspace(1e-4, 0.02, T) in f32, ᾱ = Π(1 − β).
    pub fn vp_linear(timesteps: usize) -> Path {
        let mut acc = 1f64;
        let alphas_cumprod = (0..timesteps)
            .map(|i| {
                let frac = i as f64 / (timesteps - 1).max(1) as f64;
                let beta = (1e-4 + (0.02 - 1e-4) * frac) as f32 as f64;
                acc *= 1.0 - beta;
                acc
            })
            .collect();
        Path::Vp { alphas_cumprod }
    }

    /// The path `objective.scheduler` names: rectified flow for `flow_match_euler`, VP for
    /// `ddpm` and `ddim`.
    pub fn for_scheduler(scheduler: &str, timesteps: usize) -> Path {
        match scheduler {
            "flow_match_euler" => Path::flow(timesteps),
            _ => Path::vp_linear(timesteps),
        }
    }

    pub fn timesteps(&self) -> usize {
        match self {
            Path::Flow { timesteps } => *timesteps,
            Path::Vp { alphas_cumprod } => alphas_cumprod.len(),
        }
    }

    /// The level at flow σ (any value in (0, 1]); the model time is σ·T.
    pub fn flow_level(sigma: f64, timesteps: usize) -> Level {
        Level {
            t: (sigma * timesteps as f64) as f32,
            a: 1.0 - sigma,
            s: sigma,
        }
    }

    fn vp_level(alphas_cumprod: &[f64], t: usize) -> Level {
        let ab = alphas_cumprod[t];
        Level {
            t: t as f32,
            a: ab.sqrt(),
            s: (1.0 - ab).sqrt(),
        }
    }

    /// A training level: flow σ = ceil(T·sigmoid(z))/T with z ~ N(0, 1) (the reference's
    /// discretised logit-normal); VP t uniform in 0..T.
    pub fn draw(&self, rng: &mut ChaCha8Rng) -> Level {
        match self {
            Path::Flow { timesteps } => {
                let u = 1.0 / (1.0 + (-normal(rng)).exp());
                let k = ((*timesteps as f64 * u).ceil() as usize).clamp(1, *timesteps);
                Path::flow_level(k as f64 / *timesteps as f64, *timesteps)
            }
            Path::Vp { alphas_cumprod } => {
                Path::vp_level(alphas_cumprod, rng.random_range(0..alphas_cumprod.len()))
            }
        }
    }
}

/// The weight of one sample's loss (1 without `snr_gamma`), see the module docs.
pub fn loss_weight(objective: Objective, level: &Level, snr_gamma: Option<f64>) -> f64 {
    let Some(gamma) = snr_gamma else { return 1.0 };
    let snr = level.snr();
    // w_x = SNR·γ/(SNR + γ), written so that SNR = 0 (pure noise) and SNR = ∞ stay finite.
    match objective {
        Objective::Sample => {
            if snr.is_infinite() {
                gamma
            } else {
                snr * gamma / (snr + gamma)
            }
        }
        Objective::Epsilon => gamma / (snr + gamma),
        // σ²·w_x = s²·a²/s²·γ/(SNR + γ) = a²·γ/(SNR + γ).
        Objective::VectorField => level.a * level.a * gamma / (snr + gamma),
    }
}

/// A standard normal draw from the run's seeded stream (Box-Muller).
pub fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// `n` standard normal values in f32.
pub fn normals(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| normal(rng) as f32).collect()
}

/// The training target for a clean batch x and its noise ε.
pub fn target(objective: Objective, x: &Tensor, eps: &Tensor) -> Result<Tensor> {
    match objective {
        Objective::VectorField => eps - x,
        Objective::Epsilon => Ok(eps.clone()),
        Objective::Sample => Ok(x.clone()),
    }
}

/// Per-sample (B, 1, 1, 1) tensor of one coefficient of each level.
pub fn per_sample(levels: &[Level], f: impl Fn(&Level) -> f64, like: &Tensor) -> Result<Tensor> {
    let v: Vec<f32> = levels.iter().map(|l| f(l) as f32).collect();
    Tensor::from_vec(v, (levels.len(), 1, 1, 1), like.device())
}

/// The (clean estimate, noise estimate) implied by a model output at level `l`.
fn split_prediction(
    objective: Objective,
    out: &Tensor,
    xt: &Tensor,
    l: &Level,
) -> Result<(Tensor, Tensor)> {
    match objective {
        // x = x_t − s·v, ε = x_t + a·v (a + s = 1 on the flow path).
        Objective::VectorField => Ok(((xt - (out * l.s)?)?, (xt + (out * l.a)?)?)),
        Objective::Epsilon => {
            let x0 = ((xt - (out * l.s)?)? / l.a)?;
            Ok((x0, out.clone()))
        }
        Objective::Sample => {
            let eps = ((xt - (out * l.a)?)? / l.s)?;
            Ok((out.clone(), eps))
        }
    }
}

/// Which guidance the sampler applies when the run is conditional.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Guidance {
    /// out = out_u + w·(out_c − out_u); w = 1 is the conditional model alone (one pass).
    Cfg(f64),
    /// The reference's Rectified-CFG++ (flow only, 3 passes per step), see [`Sampler::sample`].
    RectifiedCfgPp(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// First-order flow steps on the reference's terminal-stretched σ grid.
    Euler,
    /// Heun's second-order flow steps on the same grid (Euler on the last step to σ = 0).
    Heun,
    /// DDIM on a VP path with "leading" timestep spacing; η = 0 deterministic, η = 1 the DDPM
    /// posterior (ancestral) on the strided schedule.
    Ddim { eta_one: bool },
}

/// Per-sample `w[b]·mean((out − target)²)` of (B, ...) tensors with weights (B): one pass each
/// way, the sums in f64 (in Candle ops: a difference, a square, a mean and a product, each a
/// full tensor, and as many again in the backward). f32 on the CPU or a GPU
/// (runtime/kernels/loss.cu); other dtypes use those ops.
pub fn weighted_mse(out: &Tensor, target: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let gpu = cfg!(feature = "cuda") && out.device().is_cuda();
    if out.dtype() != DType::F32 || !(out.device().is_cpu() || gpu) {
        return (out - target)?.sqr()?.flatten_from(1)?.mean(1)? * weights;
    }
    out.contiguous()?
        .apply_op3(&target.contiguous()?, &weights.contiguous()?, WeightedMse)
}

struct WeightedMse;

/// (out, target, w·∂L/∂loss_b) → ∂L/∂out.
struct WeightedMseBackward;

impl CustomOp3 for WeightedMse {
    fn name(&self) -> &'static str {
        "weighted-mse"
    }

    fn cpu_fwd(
        &self,
        os: &CpuStorage,
        ol: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, target) = (contiguous::<f32>(os, ol)?, contiguous::<f32>(ts, tl)?);
        let w = contiguous::<f32>(ws, wl)?;
        if tl.dims() != ol.dims() || out.len() % w.len().max(1) != 0 {
            candle_core::bail!(
                "weighted MSE: out {:?}, target {:?}, weights {:?}",
                ol.dims(),
                tl.dims(),
                wl.dims()
            );
        }
        let m = out.len() / w.len();
        let per_sample = out
            .chunks(m)
            .zip(target.chunks(m))
            .zip(w)
            .map(|((o, t), &wb)| {
                let sum: f64 = o
                    .iter()
                    .zip(t)
                    .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                    .sum();
                (wb as f64 * sum / m as f64) as f32
            })
            .collect();
        Ok((CpuStorage::F32(per_sample), wl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        os: &candle_core::CudaStorage,
        ol: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let per_sample = crate::cuda::weighted_mse_forward((os, ol), (ts, tl), (ws, wl))?;
        Ok((per_sample, wl.shape().clone()))
    }

    fn bwd(
        &self,
        out: &Tensor,
        target: &Tensor,
        w: &Tensor,
        _per_sample: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let wg = (w * grad)?;
        let d_out = out.apply_op3_no_bwd(target, &wg, &WeightedMseBackward)?;
        Ok((Some(d_out), None, None))
    }
}

impl CustomOp3 for WeightedMseBackward {
    fn name(&self) -> &'static str {
        "weighted-mse-backward"
    }

    fn cpu_fwd(
        &self,
        os: &CpuStorage,
        ol: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, target) = (contiguous::<f32>(os, ol)?, contiguous::<f32>(ts, tl)?);
        let wg = contiguous::<f32>(gs, gl)?;
        let m = out.len() / wg.len().max(1);
        let d = out
            .chunks(m)
            .zip(target.chunks(m))
            .zip(wg)
            .flat_map(|((o, t), &g)| {
                let k = g * 2.0 / m as f32;
                o.iter().zip(t).map(move |(&a, &b)| k * (a - b))
            })
            .collect();
        Ok((CpuStorage::F32(d), ol.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        os: &candle_core::CudaStorage,
        ol: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = crate::cuda::weighted_mse_backward((os, ol), (ts, tl), (gs, gl))?;
        Ok((d, ol.shape().clone()))
    }
}

pub struct Sampler {
    pub path: Path,
    pub objective: Objective,
    pub method: Method,
    pub steps: usize,
    pub guidance: Guidance,
    /// Clamp the clean estimate to [-1, 1] in DDIM (diffusers' `clip_sample`, for pixels).
    pub clip_sample: bool,
}

impl Sampler {
    /// diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(N) with shift 1 and
    /// shift_terminal = max(1/T, 1/(2N)) (the reference): σ = linspace(1, 1/T, N) stretched so
    /// that the last equals shift_terminal, then 0 appended.
    pub fn flow_sigmas(timesteps: usize, steps: usize) -> Vec<f64> {
        let t = timesteps as f64;
        let terminal = (1.0 / t).max(1.0 / (2.0 * steps as f64));
        // diffusers computes in float32 from float64 numpy linspace; keep f64.
        let raw: Vec<f64> = (0..steps)
            .map(|i| {
                if steps == 1 {
                    1.0
                } else {
                    1.0 + (1.0 / t - 1.0) * i as f64 / (steps - 1) as f64
                }
            })
            .collect();
        let scale = (1.0 - raw[steps - 1]) / (1.0 - terminal);
        let mut s: Vec<f64> = raw
            .iter()
            .map(|r| {
                if scale == 0.0 {
                    *r
                } else {
                    1.0 - (1.0 - r) / scale
                }
            })
            .collect();
        s.push(0.0);
        s
    }

    /// DDIM "leading" timesteps: (0..N)·(T / N), descending.
    pub fn ddim_timesteps(timesteps: usize, steps: usize) -> Vec<usize> {
        let ratio = timesteps / steps;
        (0..steps).rev().map(|i| i * ratio).collect()
    }

    /// Draw `cond.len()` samples from noise `x` (B, C, H, W), conditioned on `cond` (guidance
    /// against the null condition when the model is conditional). `rng` feeds DDPM's noise.
    pub fn sample(
        &self,
        model: &Dit,
        x: Tensor,
        cond: &Condition,
        conditioning: Conditioning,
        rng: &mut ChaCha8Rng,
        mut on_step: impl FnMut(usize, usize),
    ) -> Result<Tensor> {
        let n = cond.len();
        let null = Condition::null(conditioning, n);
        let guided = conditioning.is_conditional();
        // One guided model evaluation at level l.
        let eval = |x: &Tensor, l: &Level| -> Result<Tensor> {
            let t = vec![l.t; n];
            match (guided, self.guidance) {
                (true, Guidance::Cfg(w)) if w != 1.0 => {
                    let both = Tensor::cat(&[x, x], 0)?;
                    let mut tt = t.clone();
                    tt.extend_from_slice(&t);
                    let cc = Condition {
                        labels: [null.labels.clone(), cond.labels.clone()].concat(),
                        ages: [null.ages.clone(), cond.ages.clone()].concat(),
                    };
                    let out = model.forward(&both, &tt, &cc)?;
                    let (u, c) = (out.narrow(0, 0, n)?, out.narrow(0, n, n)?);
                    &u + ((&c - &u)? * w)?
                }
                _ => model.forward(x, &t, cond),
            }
        };
        let t_count = self.path.timesteps();
        let mut x = x;
        match (&self.path, self.method) {
            (Path::Flow { .. }, Method::Euler | Method::Heun) => {
                let sig = Self::flow_sigmas(t_count, self.steps);
                for i in 0..self.steps {
                    let (s0, s1) = (sig[i], sig[i + 1]);
                    let l0 = Path::flow_level(s0, t_count);
                    let v = match self.guidance {
                        Guidance::RectifiedCfgPp(w) if guided => {
                            // Reference (guidance.py): v_c at x; half an Euler step with it; then
                            // v_c + w·(v_c' − v_u') at the midpoint. w = 0 is the conditional
                            // model; 3 passes per step.
                            let vc = self.velocity(model, &x, &l0, cond)?;
                            let xh = (&x + (&vc * (0.5 * (s1 - s0)))?)?;
                            let lh = Path::flow_level(0.5 * (s0 + s1), t_count);
                            let vch = self.velocity(model, &xh, &lh, cond)?;
                            let vuh = self.velocity(model, &xh, &lh, &null)?;
                            (&vc + ((vch - vuh)? * w)?)?
                        }
                        _ => self.to_velocity(&eval(&x, &l0)?, &x, &l0)?,
                    };
                    let euler = (&x + (&v * (s1 - s0))?)?;
                    x = if self.method == Method::Heun && s1 > 0.0 {
                        let l1 = Path::flow_level(s1, t_count);
                        let v1 = self.to_velocity(&eval(&euler, &l1)?, &euler, &l1)?;
                        (&x + ((v + v1)? * (0.5 * (s1 - s0)))?)?
                    } else {
                        euler
                    };
                    // The weights are variables: without this, every step's graph would stay
                    // reachable from x, and memory would grow with the step count.
                    x = x.detach();
                    on_step(i + 1, self.steps);
                }
            }
            (Path::Vp { alphas_cumprod }, Method::Ddim { eta_one }) => {
                let ts = Self::ddim_timesteps(t_count, self.steps);
                let ratio = t_count / self.steps;
                for (i, &t) in ts.iter().enumerate() {
                    let l = Path::vp_level(alphas_cumprod, t);
                    let (mut x0, mut eps) =
                        split_prediction(self.objective, &eval(&x, &l)?, &x, &l)?;
                    if self.clip_sample {
                        x0 = x0.clamp(-1f32, 1f32)?;
                        eps = ((&x - (&x0 * l.a)?)? / l.s)?;
                    }
                    let ab = alphas_cumprod[t];
                    let ab_prev = if t >= ratio {
                        alphas_cumprod[t - ratio]
                    } else {
                        1.0
                    };
                    let sigma = if eta_one {
                        ((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev)).sqrt()
                    } else {
                        0.0
                    };
                    let dir = (1.0 - ab_prev - sigma * sigma).max(0.0).sqrt();
                    x = ((x0 * ab_prev.sqrt())? + (eps * dir)?)?;
                    if sigma > 0.0 {
                        let z = normals(rng, x.elem_count());
                        let z = Tensor::from_vec(z, x.shape(), x.device())?;
                        x = (x + (z * sigma)?)?;
                    }
                    // The weights are variables: without this, every step's graph would stay
                    // reachable from x, and memory would grow with the step count.
                    x = x.detach();
                    on_step(i + 1, self.steps);
                }
            }
            _ => candle_core::bail!(
                "sampler {:?} does not fit the {:?} path",
                self.method,
                self.path
            ),
        }
        Ok(x)
    }

    fn velocity(&self, model: &Dit, x: &Tensor, l: &Level, cond: &Condition) -> Result<Tensor> {
        let out = model.forward(x, &vec![l.t; cond.len()], cond)?;
        self.to_velocity(&out, x, l)
    }

    /// The flow velocity dx/dσ = ε − x implied by any objective's output.
    fn to_velocity(&self, out: &Tensor, xt: &Tensor, l: &Level) -> Result<Tensor> {
        if self.objective == Objective::VectorField {
            return Ok(out.clone());
        }
        let (x0, eps) = split_prediction(self.objective, out, xt, l)?;
        eps - x0
    }
}

/// Exponential moving average of the weights, in f32 whatever the model computes in (the
/// reference kept it in bf16, §7.8), with diffusers' EMAModel decay schedule.
pub struct Ema {
    pub tensors: Vec<Tensor>,
    decay: f64,
    power: f64,
    inv_gamma: f64,
    update_after_step: u64,
    warmup: bool,
}

impl Ema {
    pub fn new(
        params: &[Tensor],
        decay: f64,
        power: f64,
        inv_gamma: f64,
        update_after_step: u64,
        warmup: bool,
    ) -> Result<Self> {
        Ok(Ema {
            tensors: params
                .iter()
                .map(|p| p.detach().copy())
                .collect::<Result<_>>()?,
            decay,
            power,
            inv_gamma,
            update_after_step,
            warmup,
        })
    }

    /// diffusers `get_decay` for the `update`-th optimizer update (1-based): 0 (copy the weights)
    /// until `update_after_step` has passed, then the warm-up curve, capped at `ema_decay`.
    pub fn decay_at(&self, update: u64) -> f64 {
        let s = update.saturating_sub(self.update_after_step + 1);
        if s == 0 {
            return 0.0;
        }
        let s = s as f64;
        let cur = if self.warmup {
            1.0 - (1.0 + s / self.inv_gamma).powf(-self.power)
        } else {
            (1.0 + s) / (10.0 + s)
        };
        cur.min(self.decay).max(0.0)
    }

    /// ema ← ema − (1 − decay)·(ema − θ) after optimizer update number `update`.
    pub fn update(&mut self, params: &[Tensor], update: u64) -> Result<()> {
        let one_minus = 1.0 - self.decay_at(update);
        // On a GPU one launch updates every tensor in place (runtime/kernels/optim.cu).
        #[cfg(feature = "cuda")]
        if let Some(candle_core::Device::Cuda(dev)) = self.tensors.first().map(|t| t.device()) {
            let pairs: Vec<(&Tensor, &Tensor)> = self.tensors.iter().zip(params).collect();
            return crate::cuda::ema_update(dev, &pairs, one_minus as f32);
        }
        for (e, p) in self.tensors.iter_mut().zip(params) {
            *e = (&*e - ((&*e - p.detach())? * one_minus)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass loss and its gradient equal the Candle composite (f32, sums in f64 vs f32).
    #[test]
    fn weighted_mse_equals_the_composite() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let out = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 2, 5, 7), &dev)?)?;
        let target = Tensor::randn(0f32, 1.0, (3, 2, 5, 7), &dev)?;
        let w = Tensor::new(&[0.5f32, 2.0, 0.0], &dev)?;
        let r = Tensor::new(&[1.0f32, -3.0, 2.0], &dev)?;
        let fused = weighted_mse(out.as_tensor(), &target, &w)?;
        let plain = ((out.as_tensor() - &target)?
            .sqr()?
            .flatten_from(1)?
            .mean(1)?
            * &w)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(diff(&fused, &plain)? < 1e-6);
        let gf = (&fused * &r)?.sum_all()?.backward()?;
        let gp = (&plain * &r)?.sum_all()?.backward()?;
        assert!(diff(gf.get(&out).unwrap(), gp.get(&out).unwrap())? < 1e-6);
        Ok(())
    }
    use rand::SeedableRng;

    #[test]
    fn flow_sigmas_match_diffusers_with_the_terminal_stretch() {
        // diffusers FlowMatchEulerDiscreteScheduler(1000, shift=1, shift_terminal=0.02)
        // .set_timesteps(25).sigmas: first 1.0, last before 0 = 0.02, evenly spaced.
        let s = Sampler::flow_sigmas(1000, 25);
        assert_eq!(s.len(), 26);
        assert!((s[0] - 1.0).abs() < 1e-12);
        assert!((s[24] - 0.02).abs() < 1e-12);
        assert_eq!(s[25], 0.0);
        let step = s[0] - s[1];
        assert!(s
            .windows(2)
            .take(24)
            .all(|w| ((w[0] - w[1]) - step).abs() < 1e-12));
        assert!((step - 0.98 / 24.0).abs() < 1e-12);
    }

    #[test]
    fn ddim_timesteps_use_leading_spacing() {
        assert_eq!(Sampler::ddim_timesteps(1000, 4), vec![750, 500, 250, 0]);
    }

    #[test]
    fn logit_normal_levels_stay_on_the_grid() {
        let p = Path::flow(1000);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let levels: Vec<Level> = (0..4000).map(|_| p.draw(&mut rng)).collect();
        assert!(levels
            .iter()
            .all(|l| (l.s * 1000.0 - (l.s * 1000.0).round()).abs() < 1e-9
                && l.s > 0.0
                && l.s <= 1.0));
        // Logit-normal(0, 1): median 0.5, about 68 % within sigmoid(±1) = [0.269, 0.731].
        let inside = levels
            .iter()
            .filter(|l| l.s > 0.269 && l.s <= 0.731)
            .count() as f64;
        assert!((inside / 4000.0 - 0.683).abs() < 0.03, "{inside}");
    }

    #[test]
    fn soft_min_snr_weights_use_the_exact_path_factors() {
        let l = Path::flow_level(0.5, 1000); // SNR 1
                                             // w_x = 1/(1 + 1/5) = 5/6; v: σ² w_x = 5/24; ε: w_x/SNR = 5/6; x: 5/6.
        assert!((loss_weight(Objective::VectorField, &l, Some(5.0)) - 5.0 / 24.0).abs() < 1e-12);
        assert!((loss_weight(Objective::Epsilon, &l, Some(5.0)) - 5.0 / 6.0).abs() < 1e-12);
        assert!((loss_weight(Objective::Sample, &l, Some(5.0)) - 5.0 / 6.0).abs() < 1e-12);
        let pure = Path::flow_level(1.0, 1000); // SNR 0: finite weights
        assert_eq!(loss_weight(Objective::VectorField, &pure, Some(5.0)), 0.0);
        assert_eq!(loss_weight(Objective::Epsilon, &pure, Some(5.0)), 1.0);
        assert_eq!(loss_weight(Objective::Epsilon, &l, None), 1.0);
    }

    #[test]
    fn vp_schedule_matches_diffusers_ddpm() {
        // diffusers DDPMScheduler() alphas_cumprod[0] = 0.9999, [999] ≈ 4.035e-5.
        let Path::Vp { alphas_cumprod } = Path::vp_linear(1000) else {
            unreachable!()
        };
        assert!((alphas_cumprod[0] - 0.9999).abs() < 1e-7);
        assert!(
            (alphas_cumprod[999] - 4.035e-5).abs() < 1e-7,
            "{}",
            alphas_cumprod[999]
        );
    }

    #[test]
    fn ema_decay_follows_diffusers() {
        let e = Ema::new(&[], 0.999, 0.75, 1.0, 10, true).unwrap();
        assert_eq!(e.decay_at(11), 0.0);
        // s = 20 − 11 = 9: 1 − 10^−0.75.
        assert!((e.decay_at(20) - (1.0 - 10f64.powf(-0.75))).abs() < 1e-12);
        assert_eq!(e.decay_at(1_000_000_000), 0.999);
        let plain = Ema::new(&[], 0.999, 0.75, 1.0, 0, false).unwrap();
        assert!((plain.decay_at(5) - 5.0 / 14.0).abs() < 1e-12);
    }
}
