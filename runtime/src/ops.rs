//! Fused ops with their own backward, run by our kernels instead of chains of Candle ops.
//!
//! `dropout` draws its mask from a counter-based hash of (seed, element index): no mask tensor is
//! made or kept (Candle ops would make four full-size tensors per call, 11 ms at the baseline's
//! stem on an H100), its backward is the same op on the gradient, and CPU and GPU keep the same
//! elements for the same seed (runtime/kernels/dropout.cu).
//!
//! `group_norm` is GroupNorm with one group and its per-channel affine: per sample,
//! (x − mean) / √(var + 1e-5) over everything but the batch axis, then ·w[c] + b[c]. Built from
//! Candle ops it is ten kernels forward and more backward, each a full pass over the activation,
//! and the affine's gradients are reductions with one GPU block per channel; here it is one pass
//! to gather the statistics and one to write, forward and backward (which also yields the
//! affine's gradients), on the CPU (below) and on CUDA (runtime/kernels/norm.cu, specialised to
//! the model's shapes). Statistics accumulate in f64.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

pub const NORM_EPS: f64 = 1e-5;

/// GroupNorm(1, C) of `x` (B, C, ...) with weight and bias (C); differentiable in all three.
pub fn group_norm(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, GroupNorm)
}

struct GroupNorm;

/// The backward of `GroupNorm`: (x, w, ∂L/∂y) → [∂L/∂x | per-(sample, channel) Σ g·x̂ | Σ g],
/// packed in one tensor so one kernel writes all three.
struct GroupNormBackward;

/// (batch, values per sample) of a contiguous tensor.
fn rows(shape: &Shape) -> Result<(usize, usize)> {
    let dims = shape.dims();
    if dims.len() < 2 {
        candle_core::bail!("group_norm needs (batch, channels, ...), got {dims:?}");
    }
    Ok((dims[0], shape.elem_count() / dims[0]))
}

fn contiguous<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("a fused op needs a contiguous input"),
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

fn forward_cpu<T: Real>(x: &[T], w: &[T], b: &[T], batch: usize, n: usize) -> Vec<T> {
    let hw = n / w.len();
    per_sample(batch, n, |s, y| {
        let xs = &x[s * n..(s + 1) * n];
        let (mean, rstd) = moments(xs);
        for (i, (y, &v)) in y.iter_mut().zip(xs).enumerate() {
            let c = i / hw;
            *y = T::of((v.into() - mean) * rstd * w[c].into() + b[c].into());
        }
    })
}

/// With g' = g·w[c]: dx = rstd · (g' − mean(g') − x̂ · mean(g'·x̂)); per channel Σ g·x̂ and Σ g.
/// Returns the packed [dx | Σ g·x̂ (B·C) | Σ g (B·C)] the GPU kernel writes.
fn backward_cpu<T: Real>(x: &[T], w: &[T], g: &[T], batch: usize, n: usize) -> Vec<T> {
    let c = w.len();
    let hw = n / c;
    // Each sample's slice of the output: its dx (n values), then its 2·C channel sums.
    let rows = per_sample(batch, n + 2 * c, |s, out| {
        let (xs, gs) = (&x[s * n..(s + 1) * n], &g[s * n..(s + 1) * n]);
        let (mean, rstd) = moments(xs);
        let (mut sg, mut sgx) = (0f64, 0f64);
        for (i, (&xv, &gv)) in xs.iter().zip(gs).enumerate() {
            let gp = gv.into() * w[i / hw].into();
            sg += gp;
            sgx += gp * (xv.into() - mean) * rstd;
        }
        let (gm, gxm) = (sg / n as f64, sgx / n as f64);
        let (dx, sums) = out.split_at_mut(n);
        for ch in 0..c {
            let (mut sw, mut sb) = (0f64, 0f64);
            for i in ch * hw..(ch + 1) * hw {
                let xhat = (xs[i].into() - mean) * rstd;
                let gv: f64 = gs[i].into();
                dx[i] = T::of(rstd * (gv * w[ch].into() - gm - xhat * gxm));
                sw += gv * xhat;
                sb += gv;
            }
            sums[ch] = T::of(sw);
            sums[c + ch] = T::of(sb);
        }
    });
    // Re-pack sample-major rows into the kernel's layout.
    let mut packed = vec![T::default(); batch * (n + 2 * c)];
    for s in 0..batch {
        let row = &rows[s * (n + 2 * c)..(s + 1) * (n + 2 * c)];
        packed[s * n..(s + 1) * n].copy_from_slice(&row[..n]);
        packed[batch * n + s * c..batch * n + (s + 1) * c].copy_from_slice(&row[n..n + c]);
        let db = batch * n + batch * c + s * c;
        packed[db..db + c].copy_from_slice(&row[n + c..]);
    }
    packed
}

/// The GroupNorm CPU kernels take (x, w, b or g, batch, n) in f32 or f64.
type CpuKernel<T> = fn(&[T], &[T], &[T], usize, usize) -> Vec<T>;

/// Run the CPU kernel of the inputs' dtype.
fn on_cpu(
    args: [(&CpuStorage, &Layout); 3],
    f32_kernel: CpuKernel<f32>,
    f64_kernel: CpuKernel<f64>,
    batch: usize,
    n: usize,
) -> Result<CpuStorage> {
    let [(a, al), (b, bl), (c, cl)] = args;
    Ok(match a.dtype() {
        DType::F32 => CpuStorage::F32(f32_kernel(
            contiguous(a, al)?,
            contiguous(b, bl)?,
            contiguous(c, cl)?,
            batch,
            n,
        )),
        DType::F64 => CpuStorage::F64(f64_kernel(
            contiguous(a, al)?,
            contiguous(b, bl)?,
            contiguous(c, cl)?,
            batch,
            n,
        )),
        d => candle_core::bail!("group_norm: unsupported dtype {d:?}"),
    })
}

/// (batch, channels, values per sample) of x, checked against the affine's length.
fn norm_dims(xl: &Layout, wl: &Layout) -> Result<(usize, usize, usize)> {
    let (batch, n) = rows(xl.shape())?;
    let c = xl.dims()[1];
    if wl.shape().elem_count() != c {
        candle_core::bail!("group_norm: {c} channels but an affine of {:?}", wl.dims());
    }
    Ok((batch, c, n))
}

impl candle_core::CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, _, n) = norm_dims(xl, wl)?;
        let args = [(xs, xl), (ws, wl), (bs, bl)];
        let out = on_cpu(args, forward_cpu::<f32>, forward_cpu::<f64>, batch, n)?;
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (batch, c, n) = norm_dims(xl, wl)?;
        let y = crate::cuda::group_norm_forward((xs, xl), (ws, wl), (bs, bl), batch, c, n)?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, c) = (x.dim(0)?, x.dim(1)?);
        let n = x.elem_count() / batch;
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &GroupNormBackward)?;
        let dx = packed.narrow(0, 0, batch * n)?.reshape(x.shape())?;
        let sums = |at: usize| packed.narrow(0, at, batch * c)?.reshape((batch, c))?.sum(0);
        let dw = sums(batch * n)?;
        let db = sums(batch * n + batch * c)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl candle_core::CustomOp3 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "group-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, c, n) = norm_dims(xl, wl)?;
        let args = [(xs, xl), (ws, wl), (gs, gl)];
        let out = on_cpu(args, backward_cpu::<f32>, backward_cpu::<f64>, batch, n)?;
        Ok((out, Shape::from(batch * n + 2 * batch * c)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (batch, c, n) = norm_dims(xl, wl)?;
        let out = crate::cuda::group_norm_backward((xs, xl), (ws, wl), (gs, gl), batch, c, n)?;
        Ok((out, Shape::from(batch * n + 2 * batch * c)))
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

    /// The composite this op replaces (what nn::GroupNorm1 was built from before).
    fn composite(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let flat = x.flatten_from(1)?;
        let centered = flat.broadcast_sub(&flat.mean_keepdim(D::Minus1)?)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered
            .broadcast_div(&(var + NORM_EPS)?.sqrt()?)?
            .reshape(dims)?;
        normed
            .broadcast_mul(&w.reshape((1, (), 1, 1))?)?
            .broadcast_add(&b.reshape((1, (), 1, 1))?)
    }

    /// Forward and all three gradients equal the Candle composite's, in f64 to 1e-10.
    #[test]
    fn group_norm_matches_the_composite_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&((Tensor::randn(0f64, 1.0, (5, 3, 7, 4), &dev)? * 3.0)? + 2.0)?)?;
        let w = Var::from_tensor(&(Tensor::randn(0f64, 0.5, 3, &dev)? + 1.0)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f64, 0.5, 3, &dev)?)?;
        let r = Tensor::randn(0f64, 1.0, (5, 3, 7, 4), &dev)?;
        let ours = group_norm(x.as_tensor(), w.as_tensor(), b.as_tensor())?;
        let theirs = composite(x.as_tensor(), w.as_tensor(), b.as_tensor())?;
        let max = |t: Tensor| t.abs()?.max_all()?.to_scalar::<f64>();
        let diff = max((&ours - &theirs)?)?;
        assert!(diff < 1e-10, "forward differs by {diff}");
        let g_ours = (ours * &r)?.sum_all()?.backward()?;
        let g_theirs = (theirs * &r)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
            let (a, t) = (g_ours.get(v).unwrap(), g_theirs.get(v).unwrap());
            let diff = max((a - t)?)?;
            let scale = max(t.clone())?;
            assert!(diff < 1e-10 * scale.max(1.0), "d{name} differs by {diff}");
        }
        Ok(())
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
}
