//! Dropout as one op.
//!
//! `dropout` draws its mask from a counter-based hash of (seed, element index): no mask tensor is
//! made or kept (Candle ops would make four full-size tensors per call, 11 ms at the baseline's
//! stem on an H100), its backward is the same op on the gradient, and CPU and GPU keep the same
//! elements for the same seed (runtime/kernels/dropout.cu).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::cpu::{contiguous, par_map, splitmix64};

/// Inverted dropout: each element kept with probability 1 − p (and scaled by 1/(1 − p)) by the
/// mask of `seed`; differentiable.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Dropout::new(p, seed))
}

#[derive(Clone, Copy)]
pub(crate) struct Dropout {
    pub(crate) seed: u64,
    pub(crate) threshold: u32,
    pub(crate) scale: f32,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(s, l)?;
        let y = par_map(x.len(), |start, out: &mut [f32]| {
            for (j, o) in out.iter_mut().enumerate() {
                *o = self.apply(start + j, x[start + j]);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::ops::cuda::dropout(s, l, self.seed, self.threshold, self.scale)?;
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

impl Dropout {
    pub(crate) fn new(p: f64, seed: u64) -> Self {
        let keep = 1.0 - p;
        Dropout {
            seed,
            // keep·2^24 in 24-bit units; the hash's top 24 bits are compared with it.
            threshold: (keep * (1u64 << 24) as f64).round() as u32,
            scale: (1.0 / keep) as f32,
        }
    }

    /// The kept value of element `i` (`v·scale`, or 0), as the dropout op computes it.
    #[inline(always)]
    pub(crate) fn apply(&self, i: usize, v: f32) -> f32 {
        let r = (splitmix64(self.seed.wrapping_add(i as u64)) >> 40) as u32;
        if r < self.threshold {
            v * self.scale
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// About 1 − p of the elements survive, scaled by 1/(1 − p); the gradient passes exactly the
    /// same elements with the same scale; another seed draws another mask.
    #[test]
    fn dropout_keeps_its_share_and_its_gradient_uses_the_same_mask() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::ones(100_000, DType::F32, &dev)?)?;
        let y = dropout(x.as_tensor(), 0.3, 42)?;
        let v = y.to_vec1::<f32>()?;
        let kept = v.iter().filter(|&&e| e != 0.0).count() as f64 / v.len() as f64;
        assert!((kept - 0.7).abs() < 0.01, "kept {kept}");
        assert!(v.iter().all(|&e| e == 0.0 || (e - 1.0 / 0.7).abs() < 1e-6));
        let g = y.sum_all()?.backward()?;
        assert_eq!(g.get(&x).unwrap().to_vec1::<f32>()?, v);
        let other = dropout(x.as_tensor(), 0.3, 43)?.to_vec1::<f32>()?;
        assert_ne!(other, v);
        Ok(())
    }
}
