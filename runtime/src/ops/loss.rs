//! The diffusion loss as one op (runtime/kernels/loss.cu on a GPU).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::cpu::contiguous;

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
        let per_sample = crate::ops::cuda::weighted_mse_forward((os, ol), (ts, tl), (ws, wl))?;
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
        let d = crate::ops::cuda::weighted_mse_backward((os, ol), (ts, tl), (gs, gl))?;
        Ok((d, ol.shape().clone()))
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
}
