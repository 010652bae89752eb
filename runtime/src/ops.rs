//! Fused ops with their own backward, run by our kernels instead of chains of Candle ops.
//!
//! `dropout` draws its mask from a counter-based hash of (seed, element index): no mask tensor is
//! made or kept (Candle ops would make four full-size tensors per call, 11 ms at the baseline's
//! stem on an H100), its backward is the same op on the gradient, and CPU and GPU keep the same
//! elements for the same seed (runtime/kernels/dropout.cu).
//!
//! `standardize` is GroupNorm with one group before its affine: per sample, (x − mean) / √(var +
//! 1e-5) over everything but the batch axis. Built from Candle ops it is eight kernels forward and
//! more backward, each a full pass over the activation; here it is one pass to gather the
//! statistics and one to write, forward and backward, on the CPU (below) and on CUDA
//! (runtime/kernels/norm.cu, specialised to the model's shapes). Statistics accumulate in f64.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

pub const NORM_EPS: f64 = 1e-5;

/// Standardise each sample of `x` (B, ...) over all its values; differentiable.
pub fn standardize(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Standardize)
}

struct Standardize;

/// The backward of `Standardize`: (x, ∂L/∂y) → ∂L/∂x.
struct StandardizeBackward;

/// (batch, values per sample) of a contiguous tensor.
fn rows(shape: &Shape) -> Result<(usize, usize)> {
    let dims = shape.dims();
    if dims.len() < 2 {
        candle_core::bail!("standardize needs (batch, ...), got {dims:?}");
    }
    Ok((dims[0], shape.elem_count() / dims[0]))
}

fn contiguous<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("standardize needs a contiguous input"),
    }
}

/// Mean and 1/√(var + eps) of one sample, accumulated in f64.
fn moments<T: Copy + Into<f64>>(x: &[T]) -> (f64, f64) {
    let (mut s, mut ss) = (0f64, 0f64);
    for &v in x {
        let v: f64 = v.into();
        s += v;
        ss += v * v;
    }
    let n = x.len() as f64;
    let mean = s / n;
    (
        mean,
        1.0 / ((ss / n - mean * mean).max(0.0) + NORM_EPS).sqrt(),
    )
}

/// Runs `f(sample, out)` over the batch on all cores; `out` is that sample's output slice.
fn per_sample<T: Send + Sync + Default + Clone>(
    batch: usize,
    n: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::default(); batch * n];
    if n == 0 {
        return out;
    }
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let per = batch.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (c, chunk) in out.chunks_mut(per * n).enumerate() {
            let f = &f;
            scope.spawn(move || {
                for (i, o) in chunk.chunks_mut(n).enumerate() {
                    f(c * per + i, o);
                }
            });
        }
    });
    out
}

trait Real: Copy + Into<f64> + Default + Send + Sync + candle_core::WithDType {
    fn of(v: f64) -> Self;
}
impl Real for f32 {
    fn of(v: f64) -> Self {
        v as f32
    }
}
impl Real for f64 {
    fn of(v: f64) -> Self {
        v
    }
}

fn forward_cpu<T: Real>(x: &[T], batch: usize, n: usize) -> Vec<T> {
    per_sample(batch, n, |b, y| {
        let xs = &x[b * n..(b + 1) * n];
        let (mean, rstd) = moments(xs);
        for (y, &v) in y.iter_mut().zip(xs) {
            *y = T::of((v.into() - mean) * rstd);
        }
    })
}

/// dx = rstd · (g − mean(g) − x̂ · mean(g · x̂)).
fn backward_cpu<T: Real>(x: &[T], g: &[T], batch: usize, n: usize) -> Vec<T> {
    per_sample(batch, n, |b, dx| {
        let (xs, gs) = (&x[b * n..(b + 1) * n], &g[b * n..(b + 1) * n]);
        let (mean, rstd) = moments(xs);
        let (mut sg, mut sgx) = (0f64, 0f64);
        for (&xv, &gv) in xs.iter().zip(gs) {
            let (xv, gv): (f64, f64) = (xv.into(), gv.into());
            sg += gv;
            sgx += gv * (xv - mean) * rstd;
        }
        let (gm, gxm) = (sg / n as f64, sgx / n as f64);
        for ((d, &xv), &gv) in dx.iter_mut().zip(xs).zip(gs) {
            let xhat = (xv.into() - mean) * rstd;
            *d = T::of(rstd * (gv.into() - gm - xhat * gxm));
        }
    })
}

impl CustomOp1 for Standardize {
    fn name(&self) -> &'static str {
        "standardize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, n) = rows(l.shape())?;
        let out = match s.dtype() {
            DType::F32 => CpuStorage::F32(forward_cpu(contiguous::<f32>(s, l)?, batch, n)),
            DType::F64 => CpuStorage::F64(forward_cpu(contiguous::<f64>(s, l)?, batch, n)),
            d => candle_core::bail!("standardize: unsupported dtype {d:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (batch, n) = rows(l.shape())?;
        let out = crate::cuda::standardize_forward(s, l, batch, n)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &StandardizeBackward,
        )?))
    }
}

impl CustomOp2 for StandardizeBackward {
    fn name(&self) -> &'static str {
        "standardize-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, n) = rows(xl.shape())?;
        let out = match xs.dtype() {
            DType::F32 => CpuStorage::F32(backward_cpu(
                contiguous::<f32>(xs, xl)?,
                contiguous::<f32>(gs, gl)?,
                batch,
                n,
            )),
            DType::F64 => CpuStorage::F64(backward_cpu(
                contiguous::<f64>(xs, xl)?,
                contiguous::<f64>(gs, gl)?,
                batch,
                n,
            )),
            d => candle_core::bail!("standardize: unsupported dtype {d:?}"),
        };
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (batch, n) = rows(xl.shape())?;
        let out = crate::cuda::standardize_backward(xs, xl, gs, gl, batch, n)?;
        Ok((out, xl.shape().clone()))
    }
}

/// Inverted dropout: each element kept with probability 1 − p (and scaled by 1/(1 − p)) by the
/// mask of `seed`; differentiable.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    let keep = 1.0 - p;
    x.contiguous()?.apply_op1(Dropout {
        seed,
        // keep·2^24 in 24-bit units; the hash's top 24 bits are compared with it.
        threshold: (keep * (1u64 << 24) as f64).round() as u32,
        scale: (1.0 / keep) as f32,
    })
}

#[derive(Clone, Copy)]
struct Dropout {
    seed: u64,
    threshold: u32,
    scale: f32,
}

/// The same function as the kernel's `splitmix64`.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(s, l)?;
        let y = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let r = (splitmix64(self.seed.wrapping_add(i as u64)) >> 40) as u32;
                if r < self.threshold {
                    v * self.scale
                } else {
                    0.0
                }
            })
            .collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda::dropout(s, l, self.seed, self.threshold, self.scale)?;
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// GELU (erf form) with a one-kernel backward on the GPU (runtime/kernels/gelu.cu); elsewhere
/// Candle's `gelu_erf`, whose backward is ten elementwise ops.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    match x.device().is_cuda() && x.dtype() == DType::F32 {
        true => x.contiguous()?.apply_op1(Gelu),
        false => x.gelu_erf(),
    }
}

struct Gelu;

/// (x, ∂L/∂y) → ∂L/∂x.
struct GeluBackward;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused GELU runs on CUDA only (the CPU uses gelu_erf)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda::gelu_forward(s, l)?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?,
        ))
    }
}

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused GELU runs on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            crate::cuda::gelu_backward(xs, xl, gs, gl)?,
            xl.shape().clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The composite this op replaces (what nn::GroupNorm1 did before).
    fn composite(x: &Tensor) -> Result<Tensor> {
        let x = x.flatten_from(1)?;
        let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        centered.broadcast_div(&(var + NORM_EPS)?.sqrt()?)
    }

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

    /// Forward and gradients equal the Candle composite's, in f64 to 1e-10.
    #[test]
    fn standardize_matches_the_composite_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&((Tensor::randn(0f64, 1.0, (5, 3, 7, 4), &dev)? * 3.0)? + 2.0)?)?;
        let w = Tensor::randn(0f64, 1.0, (5, 84), &dev)?;
        let ours = standardize(x.as_tensor())?.flatten_from(1)?;
        let theirs = composite(x.as_tensor())?;
        let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-10, "forward differs by {diff}");
        let g_ours = (ours * &w)?.sum_all()?.backward()?;
        let g_theirs = (theirs * &w)?.sum_all()?.backward()?;
        let (a, b) = (g_ours.get(&x).unwrap(), g_theirs.get(&x).unwrap());
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-10 * scale.max(1.0), "gradient differs by {diff}");
        Ok(())
    }
}
