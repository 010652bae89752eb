//! Optimizers with savable state, learning-rate schedules and global-norm clipping.
//!
//! Candle's AdamW hides its moments, so a run could not resume exactly; these keep them as
//! named tensors that go into `optimizer.safetensors`. Update rules are PyTorch's: AdamW with
//! decoupled weight decay, Adam with L2 decay added to the gradient, SGD with momentum (dampening 0,
//! no Nesterov). One parameter group, as the reference.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, Result, Tensor, Var};
use signal_diffusion_config::choice::{LrSchedule, OptimizerName};
use signal_diffusion_config::schema;

pub struct Optimizer {
    kind: Kind,
    params: Vec<(String, Var)>,
    /// First moment (Adam) or momentum buffer (SGD), and second moment (Adam).
    m: Vec<Tensor>,
    v: Vec<Tensor>,
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
}

impl Optimizer {
    pub fn new(cfg: &schema::Optimizer, params: Vec<(String, Var)>) -> Result<Self> {
        let kind = match cfg.name {
            OptimizerName::Adam => Kind::Adam,
            OptimizerName::Sgd => Kind::Sgd,
            // adamw_8bit still trains with f32 moments: its quantised state is issue 18's.
            OptimizerName::AdamW | OptimizerName::AdamW8bit => Kind::AdamW,
        };
        let zeros = |p: &[(String, Var)]| {
            p.iter()
                .map(|(_, v)| v.as_tensor().zeros_like())
                .collect::<Result<Vec<_>>>()
        };
        Ok(Optimizer {
            kind,
            m: zeros(&params)?,
            v: zeros(&params)?,
            params,
            step: 0,
            betas: cfg.betas,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            momentum: cfg.momentum,
            fused: true,
        })
    }

    /// The parameters it updates, by name.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
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
        #[cfg(feature = "cuda")]
        if let (true, Kind::AdamW | Kind::Adam, Some((_, first))) =
            (self.fused, self.kind, self.params.first())
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
                    .map(|(i, g)| crate::ops::cuda::Slot {
                        param: self.params[*i].1.as_tensor(),
                        grad: g,
                        m: &self.m[*i],
                        v: &self.v[*i],
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
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(var) else { continue };
            // Detached: a tensor computed from a Var keeps its op graph, so a stored moment would
            // otherwise chain every previous step's graph and memory would grow without bound.
            let g = &g.detach();
            let theta = &var.as_tensor().detach();
            match self.kind {
                Kind::AdamW | Kind::Adam => {
                    let g = if self.kind == Kind::Adam && self.weight_decay > 0.0 {
                        (g + (theta * self.weight_decay)?)?
                    } else {
                        g.clone()
                    };
                    let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
                    let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                    let m_hat = (&m / (1.0 - b1.powi(t)))?;
                    let v_hat = (&v / (1.0 - b2.powi(t)))?;
                    let decayed = if self.kind == Kind::AdamW {
                        (theta * (1.0 - lr * self.weight_decay))?
                    } else {
                        theta.clone()
                    };
                    var.set(&(decayed - ((m_hat / (v_hat.sqrt()? + self.eps)?)? * lr)?)?)?;
                    self.m[i] = m.detach();
                    self.v[i] = v.detach();
                }
                Kind::Sgd => {
                    let g = if self.weight_decay > 0.0 {
                        (g + (theta * self.weight_decay)?)?
                    } else {
                        g.clone()
                    };
                    let buf = if self.step == 1 {
                        g
                    } else {
                        ((&self.m[i] * self.momentum)? + g)?
                    };
                    var.set(&(theta - (&buf * lr)?)?)?;
                    self.m[i] = buf.detach();
                }
            }
        }
        Ok(())
    }

    /// Named state tensors for `optimizer.safetensors`.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut s = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            s.insert(format!("m.{name}"), self.m[i].clone());
            s.insert(format!("v.{name}"), self.v[i].clone());
        }
        s
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> anyhow::Result<()> {
        for (i, (name, _)) in self.params.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let t = state
                    .get(&format!("{prefix}.{name}"))
                    .ok_or_else(|| anyhow::anyhow!("optimizer state has no `{prefix}.{name}`"))?;
                if t.dims() != slot.dims() {
                    anyhow::bail!(
                        "optimizer state `{prefix}.{name}` has shape {:?}, expected {:?}",
                        t.dims(),
                        slot.dims()
                    );
                }
                *slot = t.clone();
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
