//! Exponential moving average of the weights.

use candle_core::{Result, Tensor};

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
            return crate::ops::cuda::ema_update(dev, &pairs, one_minus as f32);
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
