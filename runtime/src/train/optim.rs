//! Optimizers with savable state, learning-rate schedules and global-norm clipping.
//!
//! Candle's AdamW hides its moments, so a run could not resume exactly; these keep them as
//! named tensors that go into `optimizer.safetensors`. Update rules are PyTorch's: AdamW with
//! decoupled weight decay, Adam with L2 decay added to the gradient, SGD with momentum (dampening 0,
//! no Nesterov); 8-bit AdamW is AdamW with block-wise quantised moments (train/adamw_8bit.rs).
//! Parameter groups scale the learning rate and switch weight decay per parameter: the
//! classifiers and the DiT have one group, as the reference; the hourglass-shaped models take
//! the reference's four (their mapping parameters at a third of the learning rate, weight decay
//! only on the weights it tags). Groups follow from parameter names, so a resumed run rebuilds
//! the same ones.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use signal_diffusion_config::choice::{LrSchedule, OptimizerName};
use signal_diffusion_config::schema;

use super::adamw_8bit::{self, Hyper, MIN_8BIT_SIZE};

/// A parameter's group: its learning rate is the schedule's times `lr_scale`, and it decays
/// only when `weight_decay`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Group {
    pub lr_scale: f64,
    pub weight_decay: bool,
}

impl Default for Group {
    fn default() -> Self {
        Group {
            lr_scale: 1.0,
            weight_decay: true,
        }
    }
}

impl From<crate::models::hourglass::ParamGroup> for Group {
    /// The reference's `param_groups` for the hourglass-shaped models: the mapping network and
    /// the AdaRMSNorm projections at a third of the learning rate.
    fn from(g: crate::models::hourglass::ParamGroup) -> Self {
        Group {
            lr_scale: if g.mapping { 1.0 / 3.0 } else { 1.0 },
            weight_decay: g.weight_decay,
        }
    }
}

pub struct Optimizer {
    name: OptimizerName,
    kind: Kind,
    params: Vec<(String, Var)>,
    /// Per parameter, its group.
    groups: Vec<Group>,
    /// Per parameter, its state.
    moments: Vec<Moments>,
    pub step: u64,
    betas: [f64; 2],
    eps: f64,
    weight_decay: f64,
    momentum: f64,
    /// Run Adam/AdamW on a GPU with the fused kernels (the default); off, the same Candle ops as
    /// on the CPU (the reference the kernel tests compare against).
    pub fused: bool,
}

/// The global gradient norm of a step. On a GPU it stays there until read, so a step that does
/// not log never waits for the device.
pub enum GradNorm {
    Host(f64),
    #[cfg(feature = "cuda")]
    /// The squared norm, on the device.
    Device(
        candle_core::CudaDevice,
        candle_core::cuda_backend::cudarc::driver::CudaSlice<f64>,
    ),
}

impl GradNorm {
    pub fn value(&self) -> Result<f64> {
        match self {
            GradNorm::Host(n) => Ok(*n),
            #[cfg(feature = "cuda")]
            GradNorm::Device(dev, sq) => Ok(crate::ops::cuda::read_scalar(dev, sq)?.sqrt()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    AdamW,
    Adam,
    Sgd,
    AdamW8bit,
}

/// A parameter's optimizer state.
enum Moments {
    /// The first moment (Adam) or momentum buffer (SGD), and the second moment (Adam).
    F32 { m: Tensor, v: Tensor },
    /// 8-bit AdamW's, for tensors of at least [`MIN_8BIT_SIZE`] values (in host memory).
    Blockwise(adamw_8bit::Moments),
}

impl Moments {
    /// The f32 moments. Only 8-bit AdamW keeps others, and it never asks.
    #[cfg(feature = "cuda")]
    fn f32(&self) -> (&Tensor, &Tensor) {
        match self {
            Moments::F32 { m, v } => (m, v),
            Moments::Blockwise(_) => unreachable!("only adamw_8bit quantises its moments"),
        }
    }
}

impl Optimizer {
    pub fn new(cfg: &schema::Optimizer, params: Vec<(String, Var)>) -> Result<Self> {
        let kind = match cfg.name {
            OptimizerName::Adam => Kind::Adam,
            OptimizerName::Sgd => Kind::Sgd,
            OptimizerName::AdamW => Kind::AdamW,
            OptimizerName::AdamW8bit => Kind::AdamW8bit,
        };
        let moments = params
            .iter()
            .map(|(_, var)| {
                let n = var.elem_count();
                Ok(match kind == Kind::AdamW8bit && n >= MIN_8BIT_SIZE {
                    true => Moments::Blockwise(adamw_8bit::Moments::zeros(n)),
                    false => Moments::F32 {
                        m: var.as_tensor().zeros_like()?,
                        v: var.as_tensor().zeros_like()?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Optimizer {
            name: cfg.name,
            kind,
            moments,
            groups: vec![Group::default(); params.len()],
            params,
            step: 0,
            betas: cfg.betas,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            momentum: cfg.momentum,
            fused: true,
        })
    }

    /// Puts each parameter in the group `group_of` its name gives.
    pub fn with_groups(mut self, group_of: impl Fn(&str) -> Group) -> Self {
        self.groups = self.params.iter().map(|(name, _)| group_of(name)).collect();
        self
    }

    /// The parameters it updates, by name.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Bytes of optimizer state (both moments, and 8-bit AdamW's block scales).
    pub fn state_bytes(&self) -> usize {
        let f32_bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.moments
            .iter()
            .map(|s| match s {
                Moments::F32 { m, v } => f32_bytes(m) + f32_bytes(v),
                Moments::Blockwise(q) => q.bytes(),
            })
            .sum()
    }

    /// What the run log says of it: its name and the size of its state.
    pub fn describe(&self) -> String {
        let values: usize = self.params.iter().map(|(_, v)| v.elem_count()).sum();
        let bytes = self.state_bytes();
        format!(
            "optimizer {}: {:.1} MiB of state, {:.2} bytes per parameter",
            self.name,
            bytes as f64 / (1 << 20) as f64,
            bytes as f64 / values.max(1) as f64
        )
    }

    /// AdamW's weight decay is decoupled (θ ← θ(1 − lr·wd)); Adam's and SGD's is added to the
    /// gradient.
    fn decoupled(&self) -> bool {
        matches!(self.kind, Kind::AdamW | Kind::AdamW8bit)
    }

    /// Clip the gradients to `max_norm` by their global norm, then update at learning rate `lr`.
    /// Adam and AdamW on a GPU run fused (two kernel launches for all parameters, see
    /// runtime/kernels/optim.cu) unless `fused` was turned off; everything else, and the CPU, runs
    /// [`clip_grad_norm`] then [`Optimizer::update`]. Returns the norm before clipping.
    pub fn step(
        &mut self,
        grads: &mut GradStore,
        lr: f64,
        max_norm: Option<f64>,
    ) -> Result<GradNorm> {
        // The fused kernels take one learning rate and decay for every parameter: with groups,
        // the update runs as Candle ops.
        #[cfg(feature = "cuda")]
        let uniform = self.groups.iter().all(|g| *g == Group::default());
        #[cfg(feature = "cuda")]
        if let (true, true, Kind::AdamW | Kind::Adam, Some((_, first))) =
            (self.fused, uniform, self.kind, self.params.first())
        {
            if let candle_core::Device::Cuda(dev) = first.device() {
                self.step += 1;
                let t = self.step as i32;
                let hp = crate::ops::cuda::AdamStep {
                    lr,
                    betas: self.betas,
                    eps: self.eps,
                    weight_decay: self.weight_decay,
                    bias_corrections: [1.0 - self.betas[0].powi(t), 1.0 - self.betas[1].powi(t)],
                    decoupled: self.kind == Kind::AdamW,
                    max_norm,
                };
                let with_grads: Vec<(usize, Tensor)> = self
                    .params
                    .iter()
                    .enumerate()
                    .filter_map(|(i, (_, v))| grads.get(v).map(|g| (i, g.contiguous())))
                    .map(|(i, g)| g.map(|g| (i, g)))
                    .collect::<Result<_>>()?;
                let slots: Vec<crate::ops::cuda::Slot> = with_grads
                    .iter()
                    .map(|(i, g)| {
                        let (m, v) = self.moments[*i].f32();
                        crate::ops::cuda::Slot {
                            param: self.params[*i].1.as_tensor(),
                            grad: g,
                            m,
                            v,
                        }
                    })
                    .collect();
                let sq = crate::ops::cuda::adam_step(dev, &slots, &hp)?;
                return Ok(GradNorm::Device(dev.clone(), sq));
            }
        }
        let norm = clip_grad_norm(grads, &self.params, max_norm)?;
        self.update(grads, lr)?;
        Ok(GradNorm::Host(norm))
    }

    /// One update at learning rate `lr`. A parameter without a gradient is left as it is.
    pub fn update(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let [b1, b2] = self.betas;
        let decoupled = self.decoupled();
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(var) else { continue };
            let group = self.groups[i];
            let lr = lr * group.lr_scale;
            let weight_decay = if group.weight_decay {
                self.weight_decay
            } else {
                0.0
            };
            // Detached: a tensor computed from a Var keeps its op graph, so a stored moment would
            // otherwise chain every previous step's graph and memory would grow without bound.
            let g = &g.detach();
            let theta = &var.as_tensor().detach();
            match (&mut self.moments[i], self.kind) {
                (Moments::Blockwise(state), _) => {
                    let hyper = Hyper {
                        lr: lr as f32,
                        beta1: b1 as f32,
                        beta2: b2 as f32,
                        eps: self.eps as f32,
                        weight_decay: weight_decay as f32,
                        bc1: (1.0 - b1.powi(t)) as f32,
                        bc2: (1.0 - b2.powi(t)) as f32,
                    };
                    if theta.device().is_cpu() && theta.dtype() == DType::F32 {
                        let g = g.to_dtype(DType::F32)?;
                        crate::ops::adam::update_in_place(var.as_tensor(), &g, |p, g| {
                            state.step(p, g, &hyper)
                        })?;
                        continue;
                    }
                    let host = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1();
                    let mut p: Vec<f32> = host(theta)?;
                    state.step(&mut p, &host(g)?, &hyper);
                    var.set(&Tensor::from_vec(p, theta.shape(), theta.device())?)?;
                }
                (Moments::F32 { m, v }, Kind::AdamW | Kind::Adam | Kind::AdamW8bit) => {
                    let g = if !decoupled && weight_decay > 0.0 {
                        (g + (theta * weight_decay)?)?
                    } else {
                        g.clone()
                    };
                    if theta.device().is_cpu() && theta.dtype() == DType::F32 {
                        let hp = crate::ops::adam::AdamHyper {
                            lr: lr as f32,
                            beta1: b1 as f32,
                            beta2: b2 as f32,
                            eps: self.eps as f32,
                            bc1: (1.0 - b1.powi(t)) as f32,
                            bc2: (1.0 - b2.powi(t)) as f32,
                            decay: match decoupled {
                                true => (1.0 - lr * weight_decay) as f32,
                                false => 1.0,
                            },
                        };
                        crate::ops::adam::adam_update(var.as_tensor(), &g, (m, v), &hp)?;
                        continue;
                    }
                    let m_next = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
                    let v_next = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                    let m_hat = (&m_next / (1.0 - b1.powi(t)))?;
                    let v_hat = (&v_next / (1.0 - b2.powi(t)))?;
                    let decayed = if decoupled {
                        (theta * (1.0 - lr * weight_decay))?
                    } else {
                        theta.clone()
                    };
                    var.set(&(decayed - ((m_hat / (v_hat.sqrt()? + self.eps)?)? * lr)?)?)?;
                    *m = m_next.detach();
                    *v = v_next.detach();
                }
                (Moments::F32 { m, .. }, Kind::Sgd) => {
                    let g = if weight_decay > 0.0 {
                        (g + (theta * weight_decay)?)?
                    } else {
                        g.clone()
                    };
                    let buf = if self.step == 1 {
                        g
                    } else {
                        ((&*m * self.momentum)? + g)?
                    };
                    var.set(&(theta - (&buf * lr)?)?)?;
                    *m = buf.detach();
                }
            }
        }
        Ok(())
    }

    /// Named state tensors for `optimizer.safetensors`: `m.<param>` and `v.<param>`, and for
    /// 8-bit moments (u8 code indices) their block scales `m_absmax.<param>`, `v_absmax.<param>`.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut s = HashMap::new();
        for ((name, _), state) in self.params.iter().zip(&self.moments) {
            match state {
                Moments::F32 { m, v } => {
                    s.insert(format!("m.{name}"), m.clone());
                    s.insert(format!("v.{name}"), v.clone());
                }
                Moments::Blockwise(q) => {
                    let cpu = &Device::Cpu;
                    s.insert(format!("m.{name}"), Tensor::new(q.m.as_slice(), cpu)?);
                    s.insert(format!("v.{name}"), Tensor::new(q.v.as_slice(), cpu)?);
                    let absmax = |a: &[f32]| Tensor::new(a, cpu);
                    s.insert(format!("m_absmax.{name}"), absmax(&q.m_absmax)?);
                    s.insert(format!("v_absmax.{name}"), absmax(&q.v_absmax)?);
                }
            }
        }
        Ok(s)
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> anyhow::Result<()> {
        let get = |key: String| {
            state
                .get(&key)
                .ok_or_else(|| anyhow::anyhow!("optimizer state has no `{key}`"))
                .map(|t| (key, t))
        };
        // The state tensor `key` as `dtype` with the shape `dims`, or why not.
        let check = |(key, t): (String, &Tensor), dtype: DType, dims: &[usize]| {
            if t.dtype() != dtype || t.dims() != dims {
                anyhow::bail!(
                    "optimizer state `{key}` is {:?} {:?}, expected {dtype:?} {dims:?} (a checkpoint of another optimizer? `optimizer.name` must be the one it was written with)",
                    t.dtype(),
                    t.dims(),
                );
            }
            Ok(t.clone())
        };
        for ((name, var), slot) in self.params.iter().zip(&mut self.moments) {
            match slot {
                Moments::F32 { m, v } => {
                    let dims = var.dims();
                    *m = check(get(format!("m.{name}"))?, DType::F32, dims)?;
                    *v = check(get(format!("v.{name}"))?, DType::F32, dims)?;
                }
                Moments::Blockwise(q) => {
                    let (n, blocks) = (q.m.len(), q.m_absmax.len());
                    let codes = |key| -> anyhow::Result<Vec<u8>> {
                        Ok(check(get(key)?, DType::U8, &[n])?.to_vec1()?)
                    };
                    let scales = |key| -> anyhow::Result<Vec<f32>> {
                        Ok(check(get(key)?, DType::F32, &[blocks])?.to_vec1()?)
                    };
                    *q = adamw_8bit::Moments {
                        m: codes(format!("m.{name}"))?,
                        v: codes(format!("v.{name}"))?,
                        m_absmax: scales(format!("m_absmax.{name}"))?,
                        v_absmax: scales(format!("v_absmax.{name}"))?,
                    };
                }
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The learning-rate multiplier at optimizer step `s` (0-based), the reference's LambdaLR rules:
/// linear warm-up from 0, then constant, linear decay to `min_lr_ratio`, or cosine.
pub fn lr_factor(cfg: &schema::Scheduler, s: usize, total: usize) -> f64 {
    let w = cfg.warmup_steps;
    if s < w {
        return s as f64 / w.max(1) as f64;
    }
    let m = cfg.min_lr_ratio;
    let progress = (s - w) as f64 / (total.saturating_sub(w)).max(1) as f64;
    match cfg.name {
        LrSchedule::Linear => m.max((1.0 - progress) * (1.0 - m) + m),
        LrSchedule::Cosine => {
            m + (1.0 - m)
                * 0.5
                * (1.0 + (std::f64::consts::PI * 2.0 * cfg.num_cycles * progress).cos())
        }
        LrSchedule::Polynomial => m + (1.0 - m) * (1.0 - progress.min(1.0)).powf(cfg.power),
        LrSchedule::Constant | LrSchedule::ConstantWithWarmup => 1.0,
    }
}

/// The global L2 norm of all gradients; when above `max_norm`, gradients are scaled down to it
/// (PyTorch's clip_grad_norm_ with its 1e-6 guard). Returns the norm before clipping.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    params: &[(String, Var)],
    max_norm: Option<f64>,
) -> Result<f64> {
    let mut sq = 0f64;
    for (_, v) in params {
        if let Some(g) = grads.get(v) {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = sq.sqrt();
    if let Some(max) = max_norm {
        let coef = max / (norm + 1e-6);
        if coef < 1.0 {
            for (_, v) in params {
                if let Some(g) = grads.get(v) {
                    let scaled = (g * coef)?;
                    grads.insert(v.as_tensor(), scaled);
                }
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(name: &str, warmup: usize, min: f64) -> schema::Scheduler {
        schema::Scheduler {
            name: signal_diffusion_config::choice::from_toml(name).unwrap(),
            warmup_steps: warmup,
            min_lr_ratio: min,
            num_cycles: 0.5,
            power: 1.0,
        }
    }

    #[test]
    fn schedules_follow_the_reference_formulas() {
        let c = sched("cosine", 10, 0.1);
        assert_eq!(lr_factor(&c, 0, 110), 0.0);
        assert!((lr_factor(&c, 5, 110) - 0.5).abs() < 1e-12);
        assert!((lr_factor(&c, 10, 110) - 1.0).abs() < 1e-12);
        assert!((lr_factor(&c, 60, 110) - (0.1 + 0.9 * 0.5)).abs() < 1e-12);
        assert!((lr_factor(&c, 110, 110) - 0.1).abs() < 1e-12);
        let l = sched("linear", 0, 0.0);
        assert!((lr_factor(&l, 25, 100) - 0.75).abs() < 1e-12);
        assert_eq!(lr_factor(&sched("constant", 0, 0.0), 99, 100), 1.0);
    }

    #[test]
    fn adamw_matches_a_hand_computed_step() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let w = Var::new(&[1.0f32, -2.0], &dev)?;
        let cfg = schema::Optimizer {
            name: OptimizerName::AdamW,
            learning_rate: 0.1,
            weight_decay: 0.01,
            betas: [0.9, 0.999],
            eps: 1e-8,
            momentum: 0.9,
        };
        let mut opt = Optimizer::new(&cfg, vec![("w".into(), w.clone())])?;
        let loss = w.as_tensor().sqr()?.sum_all()?; // grad = 2w
        let grads = loss.backward()?;
        opt.update(&grads, 0.1)?;
        // First Adam step moves each weight by lr·sign(g) after decay: w(1 − lr·wd) − lr.
        let got = w.as_tensor().to_vec1::<f32>()?;
        assert!((got[0] - (1.0 * (1.0 - 0.001) - 0.1)).abs() < 1e-6);
        assert!((got[1] - (-2.0 * (1.0 - 0.001) + 0.1)).abs() < 1e-6);
        Ok(())
    }
}
