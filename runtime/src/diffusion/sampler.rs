//! The samplers that invert a noise path (flow Euler and Heun, DDIM/DDPM, DPM-Solver++ 2M on
//! either path) with classifier-free guidance. Every sampler converts the network's output, whatever the objective, to what it
//! steps with, so each objective samples correctly under each path it is allowed on (the
//! reference fed ε into its flow Euler step, §7.5).

use candle_core::{Result, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use signal_diffusion_config::choice::{self, NoiseScheduler, Objective, OutputType};

use super::denoiser::{Denoiser, DenoiserShape};
use super::path::{normals, shift_sigma, Betas, Level, Path as NoisePath};
use crate::models::dit::{Condition, Conditioning};

/// The (clean estimate, noise estimate) implied by a model output at level `l`.
pub fn split_prediction(
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
    /// DPM-Solver++ 2M on either path, diffusers' grid (see [`DpmSolver2M`]).
    DpmSolver2M,
}

pub struct Sampler {
    pub path: NoisePath,
    pub objective: Objective,
    pub method: Method,
    pub steps: usize,
    pub guidance: Guidance,
    /// Clamp the clean estimate to [-1, 1] in DDIM (diffusers' `clip_sample`, for pixels).
    pub clip_sample: bool,
}

impl Sampler {
    /// diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(N) with `shift` and
    /// shift_terminal = max(1/T, 1/(2N)) (the reference's): σ = linspace(1, σ_min, N), where
    /// σ_min is the shifted training grid's smallest, shift(1/T); shifted (diffusers shifts
    /// σ_min twice, as here); stretched so that the last equals shift_terminal; 0 appended.
    pub fn flow_sigmas(timesteps: usize, steps: usize, shift: f64) -> Vec<f64> {
        let t = timesteps as f64;
        let terminal = (1.0 / t).max(1.0 / (2.0 * steps as f64));
        let min = shift_sigma(1.0 / t, shift);
        // diffusers computes in float32 from float64 numpy linspace; keep f64.
        let raw: Vec<f64> = (0..steps)
            .map(|i| {
                let sigma = if steps == 1 {
                    1.0
                } else {
                    1.0 + (min - 1.0) * i as f64 / (steps - 1) as f64
                };
                shift_sigma(sigma, shift)
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
        model: &Denoiser,
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
            let t = vec![*l; n];
            match (guided, self.guidance) {
                (true, Guidance::Cfg(w)) if w != 1.0 => {
                    let both = Tensor::cat(&[x, x], 0)?;
                    let tt = vec![*l; 2 * n];
                    let cc = Condition {
                        labels: [null.labels.clone(), cond.labels.clone()].concat(),
                        ages: [null.ages.clone(), cond.ages.clone()].concat(),
                        texts: cond.texts.clone(),
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
            (NoisePath::Flow { shift, .. }, Method::Euler | Method::Heun) => {
                let sig = Self::flow_sigmas(t_count, self.steps, *shift);
                for i in 0..self.steps {
                    let (s0, s1) = (sig[i], sig[i + 1]);
                    let l0 = NoisePath::flow_level(s0, t_count);
                    let v = match self.guidance {
                        Guidance::RectifiedCfgPp(w) if guided => {
                            // Reference (guidance.py): v_c at x; half an Euler step with it; then
                            // v_c + w·(v_c' − v_u') at the midpoint. w = 0 is the conditional
                            // model; 3 passes per step.
                            let vc = self.velocity(model, &x, &l0, cond)?;
                            let xh = (&x + (&vc * (0.5 * (s1 - s0)))?)?;
                            let lh = NoisePath::flow_level(0.5 * (s0 + s1), t_count);
                            let vch = self.velocity(model, &xh, &lh, cond)?;
                            let vuh = self.velocity(model, &xh, &lh, &null)?;
                            (&vc + ((vch - vuh)? * w)?)?
                        }
                        _ => self.to_velocity(&eval(&x, &l0)?, &x, &l0)?,
                    };
                    let euler = (&x + (&v * (s1 - s0))?)?;
                    x = if self.method == Method::Heun && s1 > 0.0 {
                        let l1 = NoisePath::flow_level(s1, t_count);
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
            (NoisePath::Vp { alphas_cumprod }, Method::Ddim { eta_one }) => {
                let ts = Self::ddim_timesteps(t_count, self.steps);
                let ratio = t_count / self.steps;
                for (i, &t) in ts.iter().enumerate() {
                    let l = NoisePath::vp_level(alphas_cumprod, t);
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
            (_, Method::DpmSolver2M) => {
                let mut solver = DpmSolver2M::new(&self.path, self.steps);
                for i in 0..self.steps {
                    let l = solver.levels[i];
                    let (x0, _) = split_prediction(self.objective, &eval(&x, &l)?, &x, &l)?;
                    x = solver.step(i, x0, &x)?.detach();
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

    fn velocity(
        &self,
        model: &Denoiser,
        x: &Tensor,
        l: &Level,
        cond: &Condition,
    ) -> Result<Tensor> {
        let out = model.forward(x, &vec![*l; cond.len()], cond)?;
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

/// DPM-Solver++ 2M (Lu et al. 2022), as diffusers' `DPMSolverMultistepScheduler` runs it with
/// `algorithm_type = "dpmsolver++"`, `solver_order = 2`, `solver_type = "midpoint"`,
/// `lower_order_final`, `final_sigmas_type = "zero"` and no thresholding: a multistep solver of
/// the data-prediction ODE in λ = ln(a/s), first order on the first step and on the last (to
/// s = 0, where it returns the clean estimate), second order between.
///
/// Its grid is diffusers': on the flow path (`use_flow_sigmas`, shift 1) σ = (1 − 1/T)·k/N for
/// k = N..1, fed to the model as t = σ·T (diffusers truncates that to an integer; our models take
/// real times, as in training); on the VP path the "linspace" timesteps round(k·(T − 1)/N).
pub struct DpmSolver2M {
    /// The N levels the model is evaluated at, then the final level (a = 1, s = 0).
    pub levels: Vec<Level>,
    /// The previous step's clean estimate and its λ.
    previous: Option<(Tensor, f64)>,
}

impl DpmSolver2M {
    pub fn new(path: &NoisePath, steps: usize) -> Self {
        let t_count = path.timesteps();
        let t = t_count as f64;
        // numpy's linspace(start, stop, N + 1)[j] = j·((stop − start)/N) + start.
        let linspace =
            |start: f64, stop: f64, j: usize| j as f64 * ((stop - start) / steps as f64) + start;
        let mut levels: Vec<Level> = (0..steps)
            .map(|i| match path {
                NoisePath::Flow { shift, .. } => {
                    // σ = 1 − linspace(1, 1/T, N + 1), reversed, without its final 0; shifted
                    // (`flow_shift`).
                    let sigma = 1.0 - linspace(1.0, 1.0 / t, steps - i);
                    NoisePath::flow_level(shift_sigma(sigma, *shift), t_count)
                }
                NoisePath::Vp { alphas_cumprod } => {
                    let k = linspace(0.0, t - 1.0, steps - i).round_ties_even() as usize;
                    NoisePath::vp_level(alphas_cumprod, k)
                }
            })
            .collect();
        levels.push(Level {
            t: 0.0,
            a: 1.0,
            s: 0.0,
        });
        DpmSolver2M {
            levels,
            previous: None,
        }
    }

    /// λ = ln a − ln s (+∞ at the final level).
    fn lambda(l: &Level) -> f64 {
        l.a.ln() - l.s.ln()
    }

    /// Step `i`: from `x` at level i to level i + 1, given the clean estimate `x0` at level i.
    pub fn step(&mut self, i: usize, x0: Tensor, x: &Tensor) -> Result<Tensor> {
        let (from, to) = (self.levels[i], self.levels[i + 1]);
        let (lambda_s, lambda_t) = (Self::lambda(&from), Self::lambda(&to));
        let h = lambda_t - lambda_s;
        // x_t = (s_t/s_s)·x − a_t·(e^(−h) − 1)·D, with D = x0 on a first-order step and
        // D = x0 + (x0 − x0_prev)/(2·r) (r = h_prev/h) on a second-order midpoint step.
        let decay = to.a * ((-h).exp() - 1.0);
        let last = i + 1 == self.levels.len() - 1;
        let d = match &self.previous {
            Some((x0_prev, lambda_prev)) if !last => {
                let r = (lambda_s - lambda_prev) / h;
                (&x0 + ((&x0 - x0_prev)? * (0.5 / r))?)?
            }
            _ => x0.clone(),
        };
        let next = ((x * (to.s / from.s))? - (d * decay)?)?;
        self.previous = Some((x0, lambda_s));
        Ok(next)
    }
}

/// What rebuilds a trained model and its sampler from a checkpoint directory (`sampling.json`,
/// read by `sigdiff sample`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SampleSpec {
    pub shape: DenoiserShape,
    pub objective: Objective,
    /// The noise path (and η for DDIM sampling: 1 on `ddpm`).
    pub scheduler: NoiseScheduler,
    pub timesteps: usize,
    /// A VP path's β schedule (files written before it was recorded used diffusers' default).
    #[serde(default = "default_betas")]
    pub betas: Betas,
    /// A flow path's timestep shift (1 in files written before it was recorded).
    #[serde(default = "no_shift")]
    pub flow_shift: f64,
    /// SD 3's second text encoder (CLIP-G), with `text_encoder` (CLIP-L).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder_2: Option<signal_diffusion_config::pretrained::ClipText>,
    pub sampler: choice::Sampler,
    pub denoising_steps: usize,
    pub cfg_scale: f64,
    pub guidance: choice::Guidance,
    /// Metadata columns of the conditioning: [class] or [gender, health, age].
    pub columns: Vec<String>,
    /// What the dataset's images are: `db-only` (grey) or a 3-channel type.
    pub output_type: OutputType,
    /// db-polar's layout (absent in files written before it was recorded, and for other types).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polar_layout: Option<choice::PolarLayout>,
    /// Width of the images the model was trained from, before resizing (strip geometry; 0 for
    /// time series).
    pub source_width: usize,
    pub n_eeg_channels: usize,
    /// Time series (z-scored signals: not clipped to [-1, 1], written as `.npy`) rather than
    /// spectrogram images.
    #[serde(default)]
    pub timeseries: bool,
    /// Latent space: the VAE that decodes samples into images (absent in pixel space).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<signal_diffusion_config::pretrained::Vae>,
    /// Decode large latents in blended tiles (`model.vae_tiling`).
    #[serde(default)]
    pub vae_tiling: bool,
    /// Caption conditioning: the text encoder that embeds the captions to sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder: Option<signal_diffusion_config::pretrained::ClipText>,
    /// A LoRA run's checkpoint: the adapters' spec and the weights they adapt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::models::lora::LoraBase>,
}

fn default_betas() -> Betas {
    Betas::DDPM
}

fn no_shift() -> f64 {
    1.0
}

impl SampleSpec {
    pub fn path(&self) -> NoisePath {
        NoisePath::for_scheduler(
            self.scheduler,
            (&self.betas, self.flow_shift),
            self.timesteps,
        )
    }

    /// The values a grid shows as black and white: [-1, 1] for images, ±3 for z-scored series.
    pub fn pixel_range(&self) -> f32 {
        if self.timeseries {
            3.0
        } else {
            1.0
        }
    }

    /// `sampler` (the trained one, or another that fits its path) with `steps` denoising steps
    /// and guidance scale `cfg_scale`.
    pub fn sampler(
        &self,
        sampler: choice::Sampler,
        steps: usize,
        cfg_scale: f64,
    ) -> anyhow::Result<Sampler> {
        let flow = self.scheduler == NoiseScheduler::FlowMatchEuler;
        let method = match sampler {
            choice::Sampler::Euler if flow => Method::Euler,
            choice::Sampler::Heun if flow => Method::Heun,
            choice::Sampler::Ddim if !flow => Method::Ddim {
                eta_one: self.scheduler == NoiseScheduler::Ddpm,
            },
            choice::Sampler::DpmPP2M => Method::DpmSolver2M,
            _ => anyhow::bail!(
                "the `{sampler}` sampler does not fit this model's `{}` noise path: use {}",
                self.scheduler,
                if flow {
                    "euler, heun or dpmpp_2m"
                } else {
                    "ddim or dpmpp_2m"
                }
            ),
        };
        if self.guidance == choice::Guidance::RectifiedCfgPp
            && self.shape.conditioning().is_conditional()
            && sampler != choice::Sampler::Euler
        {
            anyhow::bail!(
                "this model samples with Rectified-CFG++ guidance, a guided Euler step: the `{sampler}` sampler cannot apply it (use euler)"
            );
        }
        Ok(Sampler {
            path: self.path(),
            objective: self.objective,
            method,
            steps,
            guidance: match self.guidance {
                choice::Guidance::Cfg => Guidance::Cfg(cfg_scale),
                choice::Guidance::RectifiedCfgPp => Guidance::RectifiedCfgPp(cfg_scale),
            },
            clip_sample: !self.timeseries,
        })
    }
}

/// The conditions of samples `idx` of a split whose targets are the conditioning columns (for
/// `caption`, the index of each sample's text among the split's texts: the caller sets
/// `texts` to their embeddings).
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
            Conditioning::Caption { .. } => {
                let text = targets[0][i];
                if !text.is_nan() {
                    cond.labels[k] = text as u32 + 1;
                }
            }
        }
    }
    cond
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifted_flow_sigmas_match_diffusers() {
        // diffusers 0.42.1 FlowMatchEulerDiscreteScheduler(1000, shift=3, shift_terminal=0.02)
        // .set_timesteps(25).sigmas at 0, 1, 12, 23, 24, 25 (float32, printed to 7 places).
        let s = Sampler::flow_sigmas(1000, 25, 3.0);
        let want = [1.0, 0.9859174, 0.7539014, 0.1324811, 0.02, 0.0];
        for (i, w) in [0, 1, 12, 23, 24, 25].into_iter().zip(want) {
            assert!((s[i] - w).abs() < 1e-6, "σ[{i}] = {} vs {w}", s[i]);
        }
    }

    #[test]
    fn shifted_dpm_solver_levels_match_diffusers() {
        // diffusers 0.42.1 DPMSolverMultistepScheduler(1000, use_flow_sigmas=True, flow_shift=3,
        // prediction_type="flow_prediction").set_timesteps(10).sigmas (float32, 7 places).
        let want = [
            0.9996665, 0.9639411, 0.9227217, 0.8746352, 0.8178097, 0.7496248, 0.6662961, 0.5621483,
            0.4282652, 0.2497916, 0.0,
        ];
        let path =
            NoisePath::for_scheduler(NoiseScheduler::FlowMatchEuler, (&Betas::DDPM, 3.0), 1000);
        let levels = DpmSolver2M::new(&path, 10).levels;
        assert_eq!(levels.len(), want.len());
        for (l, w) in levels.iter().zip(want) {
            assert!((l.s - w).abs() < 1e-6, "σ {} vs {w}", l.s);
            assert!((l.a - (1.0 - w)).abs() < 1e-6);
        }
    }

    #[test]
    fn flow_sigmas_match_diffusers_with_the_terminal_stretch() {
        // diffusers FlowMatchEulerDiscreteScheduler(1000, shift=1, shift_terminal=0.02)
        // .set_timesteps(25).sigmas: first 1.0, last before 0 = 0.02, evenly spaced.
        let s = Sampler::flow_sigmas(1000, 25, 1.0);
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
}
