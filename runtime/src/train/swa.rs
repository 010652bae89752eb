//! Stochastic weight averaging, as the reference's `torch.optim.swa_utils` use with its bugs
//! fixed: the average starts at the first SWA epoch (the reference averages from the untrained
//! model), and BatchNorm statistics are recomputed for the averaged weights at the end (the
//! reference's `update_bn` fails on its dict batches and leaves reset statistics).
//!
//! Schedule: `epochs` normal epochs, then `max(1, ⌊epochs · swa_extra_ratio⌋)` SWA epochs whose
//! learning rate anneals linearly from where the main schedule ended to
//! `learning_rate · swa_lr_frac` over `max(1, ⌊0.9 · batches per epoch⌋)` steps, then stays there
//! (SWALR, linear). The average takes the weights at the end of every SWA epoch.

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var};

/// The running mean of the trainable weights.
pub struct Swa {
    pub avg: Option<Vec<Tensor>>,
    pub n: u64,
}

impl Swa {
    pub fn new() -> Self {
        Swa { avg: None, n: 0 }
    }

    /// Add the current weights: avg ← avg + (w − avg)/(n + 1).
    pub fn update(&mut self, vars: &[(String, Var)]) -> Result<()> {
        let next = match &self.avg {
            None => vars
                .iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<Result<Vec<_>>>()?,
            Some(avg) => {
                let k = 1.0 / (self.n + 1) as f64;
                avg.iter()
                    .zip(vars)
                    .map(|(a, (_, v))| (a + ((v.as_tensor() - a)? * k)?)?.detach().copy())
                    .collect::<Result<Vec<_>>>()?
            }
        };
        self.avg = Some(next);
        self.n += 1;
        Ok(())
    }

    /// The average by parameter name (for `swa.safetensors`).
    pub fn tensors(&self, vars: &[(String, Var)]) -> Option<HashMap<String, Tensor>> {
        let avg = self.avg.as_ref()?;
        Some(
            vars.iter()
                .zip(avg)
                .map(|((n, _), a)| (n.clone(), a.clone()))
                .collect(),
        )
    }

    pub fn restore(
        vars: &[(String, Var)],
        saved: &HashMap<String, Tensor>,
        n: u64,
    ) -> anyhow::Result<Self> {
        let avg = vars
            .iter()
            .map(|(name, v)| {
                let t = saved
                    .get(name)
                    .ok_or_else(|| anyhow::anyhow!("swa.safetensors has no `{name}`"))?;
                anyhow::ensure!(
                    t.dims() == v.dims(),
                    "swa tensor `{name}` has shape {:?}, expected {:?}",
                    t.dims(),
                    v.dims()
                );
                Ok(t.clone())
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Swa { avg: Some(avg), n })
    }

    /// Put the averaged weights into `vars`, returning what was there.
    pub fn swap_in(&self, vars: &[(String, Var)]) -> Result<Option<Vec<Tensor>>> {
        let Some(avg) = &self.avg else {
            return Ok(None);
        };
        let saved = vars
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<Result<Vec<_>>>()?;
        for ((_, v), a) in vars.iter().zip(avg) {
            v.set(a)?;
        }
        Ok(Some(saved))
    }

    pub fn swap_out(vars: &[(String, Var)], saved: Option<Vec<Tensor>>) -> Result<()> {
        for ((_, v), s) in vars.iter().zip(saved.into_iter().flatten()) {
            v.set(&s)?;
        }
        Ok(())
    }
}

impl Default for Swa {
    fn default() -> Self {
        Self::new()
    }
}

/// The SWA phase's learning rate, `k` steps into it (k ≥ 1).
pub fn swa_lr(start_lr: f64, swa_lr: f64, k: usize, anneal_steps: usize) -> f64 {
    let alpha = (k as f64 / anneal_steps.max(1) as f64).min(1.0);
    start_lr * (1.0 - alpha) + swa_lr * alpha
}
