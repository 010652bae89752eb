//! Noise paths and training objectives: how a clean sample is noised, what the network is
//! trained to predict, and with which weight.
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

use candle_core::{Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use signal_diffusion_config::choice::{BetaSchedule, NoiseScheduler, Objective};

/// The forward (noising) process.
#[derive(Debug, Clone)]
pub enum Path {
    /// Rectified flow over `timesteps` discrete levels σ = k/T, each moved by the timestep
    /// `shift` (1: none; SD 3's 3.0), see [`shift_sigma`].
    Flow { timesteps: usize, shift: f64 },
    /// Variance preserving with ᾱ per integer timestep.
    Vp { alphas_cumprod: Vec<f64> },
}

/// A VP path's β schedule (a pretrained pipeline's `scheduler_config.json`, else diffusers'
/// DDPM default).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Betas {
    pub schedule: BetaSchedule,
    pub start: f64,
    pub end: f64,
}

impl Betas {
    /// The config's: a pretrained pipeline's, else diffusers' DDPM default.
    pub fn of(o: &signal_diffusion_config::schema::DiffObjective) -> Betas {
        Betas {
            schedule: o.beta_schedule,
            start: o.beta_start,
            end: o.beta_end,
        }
    }

    /// diffusers' `DDPMScheduler` default: linear from 1e-4 to 0.02.
    pub const DDPM: Betas = Betas {
        schedule: BetaSchedule::Linear,
        start: 1e-4,
        end: 0.02,
    };
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
        Path::Flow {
            timesteps,
            shift: 1.0,
        }
    }

    /// diffusers' DDPMScheduler default: β = linspace(1e-4, 0.02, T) in f32, ᾱ = Π(1 − β).
    pub fn vp_linear(timesteps: usize) -> Path {
        Path::vp(&Betas::DDPM, timesteps)
    }

    /// A VP path with diffusers' β schedules, each β rounded to f32 as diffusers computes them:
    /// `linear` β = linspace(start, end, T), `scaled_linear` (Stable Diffusion's) β =
    /// linspace(√start, √end, T)²; ᾱ = Π(1 − β).
    pub fn vp(betas: &Betas, timesteps: usize) -> Path {
        let mut acc = 1f64;
        let alphas_cumprod = (0..timesteps)
            .map(|i| {
                let frac = i as f64 / (timesteps - 1).max(1) as f64;
                let lerp = |a: f64, b: f64| a + (b - a) * frac;
                let beta = match betas.schedule {
                    BetaSchedule::Linear => lerp(betas.start, betas.end) as f32,
                    BetaSchedule::ScaledLinear => {
                        (lerp(betas.start.sqrt(), betas.end.sqrt()) as f32).powi(2)
                    }
                };
                acc *= 1.0 - beta as f64;
                acc
            })
            .collect();
        Path::Vp { alphas_cumprod }
    }

    /// The path `objective.scheduler` names: rectified flow (timestep `shift`) for
    /// `flow_match_euler`, VP with `betas` for `ddpm` and `ddim`.
    pub fn for_scheduler(
        scheduler: NoiseScheduler,
        (betas, shift): (&Betas, f64),
        timesteps: usize,
    ) -> Path {
        match scheduler {
            NoiseScheduler::FlowMatchEuler => Path::Flow { timesteps, shift },
            NoiseScheduler::Ddpm | NoiseScheduler::Ddim => Path::vp(betas, timesteps),
        }
    }

    pub fn timesteps(&self) -> usize {
        match self {
            Path::Flow { timesteps, .. } => *timesteps,
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

    pub(crate) fn vp_level(alphas_cumprod: &[f64], t: usize) -> Level {
        let ab = alphas_cumprod[t];
        Level {
            t: t as f32,
            a: ab.sqrt(),
            s: (1.0 - ab).sqrt(),
        }
    }

    /// A training level: flow σ = ceil(T·sigmoid(z))/T with z ~ N(0, 1) (the reference's
    /// discretised logit-normal), shifted (diffusers' SD 3 training script draws the shifted
    /// scheduler's σ at logit-normal indices); VP t uniform in 0..T.
    pub fn draw(&self, rng: &mut ChaCha8Rng) -> Level {
        match self {
            Path::Flow { timesteps, shift } => {
                let u = 1.0 / (1.0 + (-normal(rng)).exp());
                let k = ((*timesteps as f64 * u).ceil() as usize).clamp(1, *timesteps);
                let sigma = shift_sigma(k as f64 / *timesteps as f64, *shift);
                Path::flow_level(sigma, *timesteps)
            }
            Path::Vp { alphas_cumprod } => {
                Path::vp_level(alphas_cumprod, rng.random_range(0..alphas_cumprod.len()))
            }
        }
    }
}

/// diffusers' static timestep shift of a flow σ: s·σ / (1 + (s − 1)·σ) (1 and 0 stay put; s > 1
/// spends more of the levels at high noise, as SD 3 was trained).
pub fn shift_sigma(sigma: f64, shift: f64) -> f64 {
    shift * sigma / (1.0 + (shift - 1.0) * sigma)
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn shifted_levels_are_the_shifted_draws() {
        // SD 3's shift 3 moves σ = 0.5 to 0.75 and keeps the ends.
        assert!((shift_sigma(0.5, 3.0) - 0.75).abs() < 1e-15);
        assert_eq!((shift_sigma(0.0, 3.0), shift_sigma(1.0, 3.0)), (0.0, 1.0));
        let shifted =
            Path::for_scheduler(NoiseScheduler::FlowMatchEuler, (&Betas::DDPM, 3.0), 1000);
        let (mut a, mut b) = (ChaCha8Rng::seed_from_u64(1), ChaCha8Rng::seed_from_u64(1));
        for _ in 0..100 {
            let (l, plain) = (shifted.draw(&mut a), Path::flow(1000).draw(&mut b));
            let sigma = shift_sigma(plain.s, 3.0);
            assert!((l.s - sigma).abs() < 1e-12 && (l.a - (1.0 - sigma)).abs() < 1e-12);
            assert!((l.t as f64 - 1000.0 * sigma).abs() < 1e-3);
        }
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
    fn scaled_linear_schedule_matches_stable_diffusion_15s() {
        // diffusers 0.42.1 DDPMScheduler(beta_start=0.00085, beta_end=0.012,
        // beta_schedule="scaled_linear").alphas_cumprod at 0, 499, 999 (an f32 cumprod: the
        // tolerance is its rounding over 1000 factors).
        let sd15 = Betas {
            schedule: BetaSchedule::ScaledLinear,
            start: 0.00085,
            end: 0.012,
        };
        let Path::Vp { alphas_cumprod } = Path::vp(&sd15, 1000) else {
            unreachable!()
        };
        let want = [
            (0, 0.9991499781608582),
            (499, 0.27766942977905273),
            (999, 0.00466009508818388),
        ];
        for (t, v) in want {
            assert!(
                (alphas_cumprod[t] - v).abs() < 2e-6 * v.max(0.01),
                "ᾱ[{t}] = {} vs {v}",
                alphas_cumprod[t]
            );
        }
    }
}
