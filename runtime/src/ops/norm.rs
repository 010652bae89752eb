//! Normalisation ops with their own backward.
//!
//! `group_norm` is GroupNorm with one group and its per-channel affine: per sample,
//! (x − mean) / √(var + 1e-5) over everything but the batch axis, then ·w[c] + b[c]. Built from
//! Candle ops it is ten kernels forward and more backward, each a full pass over the activation,
//! and the affine's gradients are reductions with one GPU block per channel; here it is one pass
//! to gather the statistics and one to write, forward and backward (which also yields the
//! affine's gradients), on the CPU (below) and on CUDA (runtime/kernels/norm.cu, specialised to
//! the model's shapes). Statistics accumulate in f64. `group_norm_grouped` is the same op with
//! any number of groups (consecutive channels, each group's own statistics) and any eps, the SD
//! UNet's norms; the GPU kernel has one group and eps 1e-5, so other settings use Candle's ops
//! there.
//!
//! `standardize_last` is the parameter-free normalisation over the last axis (LayerNorm without
//! its affine) built from Candle ops that all have a backward: Candle's fused `layer_norm` and
//! `rms_norm` have none.
//!
//! `rms_normalize_last` is x / √(mean(x²) + eps) over the last axis (RMSNorm without its scale:
//! the hourglass's norms, and its cosine-similarity q and k), one pass each way on the CPU in
//! f32: y = x·r with r = (mean(x²) + eps)^−½ per row, and ∂x = r·(g − y·mean(g·y)). Other
//! devices and dtypes use the composite of Candle ops.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor, D};

use super::cpu::{contiguous, per_sample, Real};

pub const NORM_EPS: f64 = 1e-5;

/// GroupNorm(1, C) of `x` (B, C, ...) with weight and bias (C); differentiable in all three.
pub fn group_norm(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, GroupNorm::ONE)
}

/// GroupNorm(`groups`, C) of `x` (B, C, ...) with weight and bias (C) and `eps`: each sample's
/// channels normalised in `groups` consecutive groups, then the per-channel affine. One op on
/// the CPU; on a GPU the kernel is the one-group, eps-1e-5 one, so other settings use Candle's
/// ops there.
pub fn group_norm_grouped(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let op = GroupNorm { groups, eps };
    if x.device().is_cpu() || op.is_one() {
        return x
            .contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op);
    }
    let dims = x.dims();
    let affine: Vec<usize> = (0..dims.len())
        .map(|i| if i == 1 { dims[1] } else { 1 })
        .collect();
    standardize_last(&x.reshape((dims[0], groups, ()))?, eps)?
        .reshape(dims)?
        .broadcast_mul(&weight.reshape(affine.as_slice())?)?
        .broadcast_add(&bias.reshape(affine.as_slice())?)
}

/// `groups` consecutive groups of channels per sample, each normalised with `eps`.
#[derive(Clone, Copy)]
pub(crate) struct GroupNorm {
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// One group, eps 1e-5: what the GPU kernels compute.
    pub(crate) const ONE: GroupNorm = GroupNorm {
        groups: 1,
        eps: NORM_EPS,
    };

    fn is_one(self) -> bool {
        self.groups == 1 && self.eps == NORM_EPS
    }
}

/// The backward of `GroupNorm`: (x, w, ∂L/∂y) → [∂L/∂x | per-(sample, channel) Σ g·x̂ | Σ g],
/// packed in one tensor so one kernel writes all three.
struct GroupNormBackward(GroupNorm);

/// (batch, values per sample) of a contiguous tensor.
fn rows(shape: &Shape) -> Result<(usize, usize)> {
    let dims = shape.dims();
    if dims.len() < 2 {
        candle_core::bail!("group_norm needs (batch, channels, ...), got {dims:?}");
    }
    Ok((dims[0], shape.elem_count() / dims[0]))
}

/// Mean and 1/√(var + eps) of one group of a sample, accumulated in f64.
fn moments<T: Copy + Into<f64>>(x: &[T], eps: f64) -> (f64, f64) {
    let (mut s, mut ss) = (0f64, 0f64);
    for &v in x {
        let v: f64 = v.into();
        s += v;
        ss += v * v;
    }
    let n = x.len() as f64;
    let mean = s / n;
    (mean, 1.0 / ((ss / n - mean * mean).max(0.0) + eps).sqrt())
}

fn forward_cpu<T: Real>(
    x: &[T],
    w: &[T],
    b: &[T],
    batch: usize,
    n: usize,
    op: GroupNorm,
) -> Vec<T> {
    let hw = n / w.len();
    let per_group = w.len() / op.groups;
    per_sample(batch, n, |s, y| {
        let xs = &x[s * n..(s + 1) * n];
        for (g, (yg, xg)) in y
            .chunks_mut(per_group * hw)
            .zip(xs.chunks(per_group * hw))
            .enumerate()
        {
            let (mean, rstd) = moments(xg, op.eps);
            // Per channel: y = x·scale + shift.
            for (k, (yc, xc)) in yg.chunks_mut(hw).zip(xg.chunks(hw)).enumerate() {
                let c = g * per_group + k;
                let scale = rstd * w[c].into();
                let shift = b[c].into() - mean * scale;
                for (y, &v) in yc.iter_mut().zip(xc) {
                    *y = T::of(v.into() * scale + shift);
                }
            }
        }
    })
}

/// With g' = g·w[c]: dx = rstd · (g' − mean(g') − x̂ · mean(g'·x̂)); per channel Σ g·x̂ and Σ g.
/// Returns the packed [dx | Σ g·x̂ (B·C) | Σ g (B·C)] the GPU kernel writes. Loops run per
/// channel (no index division per element); samples are split across threads.
fn backward_cpu<T: Real>(
    x: &[T],
    w: &[T],
    g: &[T],
    batch: usize,
    n: usize,
    op: GroupNorm,
) -> Vec<T> {
    let c = w.len();
    let hw = n / c;
    let per_group = c / op.groups;
    let mut packed = vec![T::default(); batch * (n + 2 * c)];
    let (dx_all, sums_all) = packed.split_at_mut(batch * n);
    // Per sample: its C values of Σ g·x̂, then its C values of Σ g.
    let mut sums = vec![T::default(); batch * 2 * c];
    // Candle's thread count, as every CPU op here (RAYON_NUM_THREADS bounds them all).
    let threads = candle_core::utils::get_num_threads().clamp(1, batch.max(1));
    let per = batch.div_ceil(threads).max(1);
    rayon::scope(|scope| {
        for (k, (dxs, ss)) in dx_all
            .chunks_mut(per * n)
            .zip(sums.chunks_mut(per * 2 * c))
            .enumerate()
        {
            scope.spawn(move |_| {
                for (i, (dx, sum)) in dxs.chunks_mut(n).zip(ss.chunks_mut(2 * c)).enumerate() {
                    let s = k * per + i;
                    let (xs, gs) = (&x[s * n..(s + 1) * n], &g[s * n..(s + 1) * n]);
                    for group in 0..op.groups {
                        let channels = group * per_group..(group + 1) * per_group;
                        let span = channels.start * hw..channels.end * hw;
                        let (mean, rstd) = moments(&xs[span], op.eps);
                        // Per channel Σ g and Σ g·x: everything else follows from them.
                        for ch in channels.clone() {
                            let (mut sg, mut sgx) = (0f64, 0f64);
                            for (&xv, &gv) in xs[ch * hw..(ch + 1) * hw]
                                .iter()
                                .zip(&gs[ch * hw..(ch + 1) * hw])
                            {
                                let gv: f64 = gv.into();
                                sg += gv;
                                sgx += gv * xv.into();
                            }
                            // Σ g·x̂ = rstd·(Σ g·x − mean·Σ g)
                            sum[ch] = T::of(rstd * (sgx - mean * sg));
                            sum[c + ch] = T::of(sg);
                        }
                        let (mut gm, mut gxm) = (0f64, 0f64);
                        for ch in channels.clone() {
                            let wc: f64 = w[ch].into();
                            gm += wc * sum[c + ch].into();
                            gxm += wc * sum[ch].into();
                        }
                        let count = (per_group * hw) as f64;
                        let (gm, gxm) = (gm / count, gxm / count);
                        for ch in channels {
                            // dx = rstd·(g·w − gm − x̂·gxm) = g·a + x·b + d per channel.
                            let a = rstd * w[ch].into();
                            let bx = -rstd * gxm * rstd;
                            let d = -rstd * gm + rstd * gxm * rstd * mean;
                            let (xc, gc) =
                                (&xs[ch * hw..(ch + 1) * hw], &gs[ch * hw..(ch + 1) * hw]);
                            for ((o, &xv), &gv) in
                                dx[ch * hw..(ch + 1) * hw].iter_mut().zip(xc).zip(gc)
                            {
                                *o = T::of(gv.into() * a + xv.into() * bx + d);
                            }
                        }
                    }
                }
            });
        }
    });
    for s in 0..batch {
        let row = &sums[s * 2 * c..(s + 1) * 2 * c];
        sums_all[s * c..(s + 1) * c].copy_from_slice(&row[..c]);
        sums_all[batch * c + s * c..batch * c + (s + 1) * c].copy_from_slice(&row[c..]);
    }
    packed
}

/// The GroupNorm CPU kernels take (x, w, b or g, batch, n, the op) in f32 or f64.
type CpuKernel<T> = fn(&[T], &[T], &[T], usize, usize, GroupNorm) -> Vec<T>;

/// Run the CPU kernel of the inputs' dtype.
fn on_cpu(
    args: [(&CpuStorage, &Layout); 3],
    f32_kernel: CpuKernel<f32>,
    f64_kernel: CpuKernel<f64>,
    (batch, n, op): (usize, usize, GroupNorm),
) -> Result<CpuStorage> {
    let [(a, al), (b, bl), (c, cl)] = args;
    Ok(match a.dtype() {
        DType::F32 => CpuStorage::F32(f32_kernel(
            contiguous(a, al)?,
            contiguous(b, bl)?,
            contiguous(c, cl)?,
            batch,
            n,
            op,
        )),
        DType::F64 => CpuStorage::F64(f64_kernel(
            contiguous(a, al)?,
            contiguous(b, bl)?,
            contiguous(c, cl)?,
            batch,
            n,
            op,
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
        let out = on_cpu(
            args,
            forward_cpu::<f32>,
            forward_cpu::<f64>,
            (batch, n, *self),
        )?;
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
        if !self.is_one() {
            candle_core::bail!("group_norm: the GPU kernel has one group and eps 1e-5");
        }
        let (batch, c, n) = norm_dims(xl, wl)?;
        let y = crate::ops::cuda::group_norm((xs, xl), (ws, wl), (bs, bl), (batch, c, n), false)?;
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
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &GroupNormBackward(*self))?;
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
        let out = on_cpu(
            args,
            backward_cpu::<f32>,
            backward_cpu::<f64>,
            (batch, n, self.0),
        )?;
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
        if !self.0.is_one() {
            candle_core::bail!("group_norm: the GPU kernel has one group and eps 1e-5");
        }
        let (batch, c, n) = norm_dims(xl, wl)?;
        let out = crate::ops::cuda::group_norm((xs, xl), (ws, wl), (gs, gl), (batch, c, n), true)?;
        Ok((out, Shape::from(batch * n + 2 * batch * c)))
    }
}

/// (x − mean) / √(var + eps) over the last axis (population variance), from differentiable ops:
/// a LayerNorm without affine.
pub fn standardize_last(x: &Tensor, eps: f64) -> Result<Tensor> {
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}

/// x / √(mean(x²) + eps) over the last axis, differentiable in x.
pub fn rms_normalize_last(x: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        return x.broadcast_div(&(ms + eps)?.sqrt()?);
    }
    x.contiguous()?.apply_op1(RmsNormalize { eps })
}

struct RmsNormalize {
    eps: f64,
}

/// 1 / √(mean(x²) + eps) of one row.
#[inline(always)]
fn inverse_rms(row: &[f32], eps: f64) -> f32 {
    (1.0 / ((crate::ops::cpu::dot(row, row) / row.len() as f32) as f64 + eps).sqrt()) as f32
}

impl candle_core::CustomOp1 for RmsNormalize {
    fn name(&self) -> &'static str {
        "rms-normalize-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = l.dims().last().copied().unwrap_or(1).max(1);
        let mut y = contiguous::<f32>(s, l)?.to_vec();
        crate::ops::cpu::on_row_chunks(&mut y, n, |_, rows| {
            for row in rows.chunks_exact_mut(n) {
                let r = inverse_rms(row, self.eps);
                row.iter_mut().for_each(|v| *v *= r);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let n = x.dim(D::Minus1)?;
        let eps = self.eps;
        let dx = crate::ops::cpu::with_f32(&[x, y, &grad.contiguous()?], |t| {
            let (x, y) = (t[0], t[1]);
            let mut dx = t[2].to_vec();
            crate::ops::cpu::on_row_chunks(&mut dx, n, |start, rows| {
                for (i, g) in rows.chunks_exact_mut(n).enumerate() {
                    let at = start + i * n;
                    let (xr, yr) = (&x[at..at + n], &y[at..at + n]);
                    let r = inverse_rms(xr, eps);
                    let mean_gy = crate::ops::cpu::dot(g, yr) / n as f32;
                    for (gv, yv) in g.iter_mut().zip(yr) {
                        *gv = r * (*gv - yv * mean_gy);
                    }
                }
            });
            Ok(dx)
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The op equals the composite (per group: standardise, then the per-channel affine) in
    /// f64 within 1e-10, values and the gradients of x, w and b: one group at eps 1e-5 (the
    /// classifier's and the GPU's) and three groups at eps 1e-6 (the SD UNet's kind).
    #[test]
    fn group_norm_matches_the_composite_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (channels, groups, eps) in [(3, 1, NORM_EPS), (6, 3, 1e-6)] {
            let shape = (5, channels, 7, 4);
            let x = Var::from_tensor(&((Tensor::randn(0f64, 1.0, shape, &dev)? * 3.0)? + 2.0)?)?;
            let w = Var::from_tensor(&(Tensor::randn(0f64, 0.5, channels, &dev)? + 1.0)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f64, 0.5, channels, &dev)?)?;
            let r = Tensor::randn(0f64, 1.0, shape, &dev)?;
            let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
            let ours = match groups {
                1 => group_norm(xt, wt, bt)?,
                g => group_norm_grouped(xt, wt, bt, g, eps)?,
            };
            let affine = |t: &Tensor| t.reshape((1, channels, 1, 1));
            let theirs = standardize_last(&xt.reshape((5, groups, ()))?, eps)?
                .reshape(shape)?
                .broadcast_mul(&affine(wt)?)?
                .broadcast_add(&affine(bt)?)?;
            let max = |t: Tensor| t.abs()?.max_all()?.to_scalar::<f64>();
            let diff = max((&ours - &theirs)?)?;
            assert!(diff < 1e-10, "{groups} groups: forward differs by {diff}");
            let g_ours = (ours * &r)?.sum_all()?.backward()?;
            let g_theirs = (theirs * &r)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                let (a, t) = (g_ours.get(v).unwrap(), g_theirs.get(v).unwrap());
                let diff = max((a - t)?)?;
                let scale = max(t.clone())?;
                assert!(
                    diff < 1e-10 * scale.max(1.0),
                    "{groups} groups: d{name} differs by {diff}"
                );
            }
        }
        Ok(())
    }

    /// The fused RMS normalisation equals its composite, values and gradient, in f32 within
    /// 1e-5 of the largest (row lengths around the 16-lane blocks, eps 1e-6 as the hourglass's).
    #[test]
    fn rms_normalize_matches_the_composite_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        for n in [8, 17, 64] {
            let x = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (6, 5, n), &dev)? * 2.0)?)?;
            let r = Tensor::randn(0f32, 1.0, (6, 5, n), &dev)?;
            let ours = rms_normalize_last(x.as_tensor(), 1e-6)?;
            let ms = x.as_tensor().sqr()?.mean_keepdim(D::Minus1)?;
            let theirs = x.as_tensor().broadcast_div(&(ms + 1e-6)?.sqrt()?)?;
            let max = |t: Tensor| t.abs()?.max_all()?.to_scalar::<f32>();
            assert!(max((&ours - &theirs)?)? < 1e-5);
            let (a, b) = (
                (ours * &r)?.sum_all()?.backward()?,
                (theirs * &r)?.sum_all()?.backward()?,
            );
            let (a, b) = (a.get(&x).unwrap(), b.get(&x).unwrap());
            let diff = max((a - b)?)?;
            assert!(
                diff < 1e-5 * max(b.clone())?,
                "n = {n}: ∂x differs by {diff}"
            );
        }
        Ok(())
    }
}
