//! Average pooling, and the fused block tails that end in it (dropout + pooling, GroupNorm +
//! dropout + pooling, GELU + dropout + pooling): the intermediate tensors live only inside the
//! op, so the autograd graph keeps the block's input alone (runtime/kernels/pool.cu on a GPU).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::cpu::{contiguous, fused_f32, par_map, Real};
use super::dropout::{dropout, Dropout};
use super::gelu::{gelu, gelu_f32, Gate, SelfGated};
use super::norm::{group_norm, GroupNorm};

/// Average pooling with a `kh × kw` window and the same stride over the last two axes of
/// (B, C, H, W), trailing rows and columns dropped (PyTorch's floor). One pass forward and one
/// backward, on the CPU and (f32) on a GPU (Candle's backward is an upsample and a division,
/// two full-size tensors).
pub fn avg_pool(x: &Tensor, kh: usize, kw: usize) -> Result<Tensor> {
    let f64_on_cpu = x.device().is_cpu() && x.dtype() == DType::F64;
    if !(fused_f32(x) || f64_on_cpu) {
        return x.avg_pool2d((kh, kw));
    }
    let (_, _, h, w) = x.dims4()?;
    x.contiguous()?.apply_op1(AvgPool { kh, kw, h, w })
}

#[derive(Clone, Copy)]
struct AvgPool {
    kh: usize,
    kw: usize,
    /// The input's spatial size (the backward's output).
    h: usize,
    w: usize,
}

/// ∂L/∂x of `AvgPool` from ∂L/∂y.
struct AvgPoolBackward(AvgPool);

impl AvgPool {
    /// This pooling as dropout + pooling with p = 0 (every element kept, scale 1: the same
    /// numbers), which the GPU's pooling kernels run.
    #[cfg(feature = "cuda")]
    fn keeping_all(self) -> DropoutPool {
        DropoutPool(Dropout::new(0.0, 0), self)
    }
}

/// Window means of `value(index)` over the input's elements (the input itself, or a function
/// of it such as its dropped-out value), summed in f64.
fn pool_fwd<T: Real>(value: impl Fn(usize) -> f64 + Sync, p: AvgPool, planes: usize) -> Vec<T> {
    let (ho, wo) = (p.h / p.kh, p.w / p.kw);
    let inv = 1.0 / (p.kh * p.kw) as f64;
    par_map(planes * ho * wo, |start, out: &mut [T]| {
        for (k, o) in out.iter_mut().enumerate() {
            let i = start + k;
            let (plane, oi, oj) = (i / (ho * wo), i / wo % ho, i % wo);
            let base = plane * p.h * p.w;
            let mut acc = 0f64;
            for u in 0..p.kh {
                for v in 0..p.kw {
                    acc += value(base + (oi * p.kh + u) * p.w + oj * p.kw + v);
                }
            }
            *o = T::of(acc * inv);
        }
    })
}

fn pool_bwd<T: Real>(g: &[T], p: AvgPool, planes: usize) -> Vec<T> {
    let (ho, wo) = (p.h / p.kh, p.w / p.kw);
    let inv = 1.0 / (p.kh * p.kw) as f64;
    par_map(planes * p.h * p.w, |start, out: &mut [T]| {
        for (k, o) in out.iter_mut().enumerate() {
            let i = start + k;
            let (plane, r, c) = (i / (p.h * p.w), i / p.w % p.h, i % p.w);
            let (oi, oj) = (r / p.kh, c / p.kw);
            *o = if oi < ho && oj < wo {
                T::of(g[(plane * ho + oi) * wo + oj].into() * inv)
            } else {
                T::default()
            };
        }
    })
}

impl CustomOp1 for AvgPool {
    fn name(&self) -> &'static str {
        "avg-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.dims();
        let planes = d[0] * d[1];
        let y = match s {
            CpuStorage::F32(_) => {
                let x = contiguous::<f32>(s, l)?;
                CpuStorage::F32(pool_fwd(|i| x[i] as f64, *self, planes))
            }
            CpuStorage::F64(_) => {
                let x = contiguous::<f64>(s, l)?;
                CpuStorage::F64(pool_fwd(|i| x[i], *self, planes))
            }
            _ => candle_core::bail!("avg_pool runs in f32 or f64"),
        };
        Ok((
            y,
            Shape::from((d[0], d[1], self.h / self.kh, self.w / self.kw)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.keeping_all().cuda(s, l, false)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?
                .apply_op1_no_bwd(&AvgPoolBackward(*self))?,
        ))
    }
}

impl CustomOp1 for AvgPoolBackward {
    fn name(&self) -> &'static str {
        "avg-pool-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.dims();
        let planes = d[0] * d[1];
        let dx = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(pool_bwd(contiguous::<f32>(s, l)?, self.0, planes))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(pool_bwd(contiguous::<f64>(s, l)?, self.0, planes))
            }
            _ => candle_core::bail!("avg_pool runs in f32 or f64"),
        };
        Ok((dx, Shape::from((d[0], d[1], self.0.h, self.0.w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        DropoutPoolBackward(self.0.keeping_all()).cuda_fwd(s, l)
    }
}

/// `avg_pool(dropout(x, p, seed), kh, kw)` as one op (f32, on the CPU and on a GPU): the same
/// numbers (the same mask, the same sums in the same order), but the dropped tensor is never
/// made or kept for the backward — a full activation less per block, and one pass less each
/// way. Otherwise the two ops.
pub fn dropout_avg_pool(x: &Tensor, p: f64, seed: u64, kh: usize, kw: usize) -> Result<Tensor> {
    if !fused_f32(x) {
        return avg_pool(&dropout(x, p, seed)?, kh, kw);
    }
    x.contiguous()?
        .apply_op1(DropoutPool::new(x, p, seed, kh, kw)?)
}

/// `dropout_avg_pool(group_norm(a, weight, bias), p, seed, kh, kw)` with a = `gelu(x)` when
/// `gelu_first`, else x, as one op (f32, on the CPU and on a GPU): the same numbers, but the
/// activation and the normalised tensor live only inside the op. Candle's graph keeps every op's inputs until the
/// backward ends, so as separate ops those tensors (the largest of cnn_light, at its stem) stay
/// alive, and each gradient is one more full-size tensor (plus the zeros it is accumulated
/// into); here the graph keeps `x` alone. The backward recomputes gelu(x) and runs the ops'
/// backwards in sequence. Otherwise the separate ops.
pub fn group_norm_dropout_avg_pool(
    x: &Tensor,
    gelu_first: bool,
    (weight, bias): (&Tensor, &Tensor),
    (p, seed): (f64, u64),
    (kh, kw): (usize, usize),
) -> Result<Tensor> {
    if !fused_f32(x) {
        let a = if gelu_first { gelu(x)? } else { x.clone() };
        return dropout_avg_pool(&group_norm(&a, weight, bias)?, p, seed, kh, kw);
    }
    let op = NormDropoutPool {
        gelu_first,
        pool: DropoutPool::new(x, p, seed, kh, kw)?,
    };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

/// `dropout_avg_pool(gelu(x), p, seed, kh, kw)` (GELU's erf form) as one op (f32, on the CPU
/// and on a GPU), for the same reason as `group_norm_dropout_avg_pool`: the activation's output,
/// which only the pooling reads, is never a tensor of the graph (the GELU's backward needs x,
/// kept anyway). A block of the CNNs ends this way. Otherwise the two ops.
pub fn gelu_dropout_avg_pool(
    x: &Tensor,
    p: f64,
    seed: u64,
    kh: usize,
    kw: usize,
) -> Result<Tensor> {
    if !fused_f32(x) {
        return dropout_avg_pool(&gelu(x)?, p, seed, kh, kw);
    }
    x.contiguous()?
        .apply_op1(GeluDropoutPool(DropoutPool::new(x, p, seed, kh, kw)?))
}

struct GeluDropoutPool(DropoutPool);

impl CustomOp1 for GeluDropoutPool {
    fn name(&self) -> &'static str {
        "gelu-dropout-avg-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (activated, shape) = SelfGated { gate: Gate::Erf }.cpu_fwd(s, l)?;
        self.0.cpu_fwd(&activated, &Layout::contiguous(shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        // GELU inside the pooling kernel: the activation is never written.
        self.0.cuda(s, l, true)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = GeluDropoutPoolBackward(self.0);
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

/// (x, ∂L/∂y) → ∂L/∂x of `GeluDropoutPool`: the pooling's and dropout's backward, then GELU's,
/// in one pass on a GPU (the gradient at the activation is never written there).
struct GeluDropoutPoolBackward(DropoutPool);

impl CustomOp2 for GeluDropoutPoolBackward {
    fn name(&self) -> &'static str {
        "gelu-dropout-avg-pool-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (d_activated, shape) = DropoutPoolBackward(self.0).cpu_fwd(gs, gl)?;
        let d = contiguous::<f32>(&d_activated, &Layout::contiguous(&shape))?;
        let dx = gelu_f32(contiguous::<f32>(xs, xl)?, Some(d), Gate::Erf);
        Ok((CpuStorage::F32(dx), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.0.cuda_backward((gs, gl), Some((xs, xl)))
    }
}

struct NormDropoutPool {
    gelu_first: bool,
    pool: DropoutPool,
}

impl candle_core::CustomOp3 for NormDropoutPool {
    fn name(&self) -> &'static str {
        "group-norm-dropout-avg-pool"
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
        let (normed, shape) = if self.gelu_first {
            let (a, shape) = SelfGated { gate: Gate::Erf }.cpu_fwd(xs, xl)?;
            GroupNorm::ONE.cpu_fwd(&a, &Layout::contiguous(shape), ws, wl, bs, bl)?
        } else {
            GroupNorm::ONE.cpu_fwd(xs, xl, ws, wl, bs, bl)?
        };
        self.pool.cpu_fwd(&normed, &Layout::contiguous(shape))
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
        // The activation and the normalised tensor are temporaries, freed when this returns.
        let (normed, shape) = if self.gelu_first {
            let a = crate::ops::cuda::gelu_forward(xs, xl)?;
            GroupNorm::ONE.cuda_fwd(&a, &Layout::contiguous(xl.shape()), ws, wl, bs, bl)?
        } else {
            GroupNorm::ONE.cuda_fwd(xs, xl, ws, wl, bs, bl)?
        };
        self.pool.cuda(&normed, &Layout::contiguous(shape), false)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d_normed = grad
            .contiguous()?
            .apply_op1_no_bwd(&DropoutPoolBackward(self.pool))?;
        if !self.gelu_first {
            // GroupNorm's backward reads x, w and the gradient, not its output.
            return GroupNorm::ONE.bwd(x, w, b, &d_normed, &d_normed);
        }
        let gelu = SelfGated { gate: Gate::Erf };
        let a = x.apply_op1_no_bwd(&gelu)?;
        let (da, dw, db) = GroupNorm::ONE.bwd(&a, w, b, &d_normed, &d_normed)?;
        let da = da.expect("GroupNorm's backward gives the input's gradient");
        Ok((gelu.bwd(x, &da, &da)?, dw, db))
    }
}

#[derive(Clone, Copy)]
struct DropoutPool(Dropout, AvgPool);

impl DropoutPool {
    /// Dropout with probability `p` and mask `seed`, then kh × kw average pooling, of x's shape.
    fn new(x: &Tensor, p: f64, seed: u64, kh: usize, kw: usize) -> Result<Self> {
        let (_, _, h, w) = x.dims4()?;
        Ok(DropoutPool(Dropout::new(p, seed), AvgPool { kh, kw, h, w }))
    }

    /// The forward on a GPU (runtime/kernels/pool.cu), of GELU(x) when `gelu`.
    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        gelu: bool,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (d, p) = (self.0, self.1);
        let dims = l.dims();
        let y = crate::ops::cuda::dropout_pool_forward(
            (s, l),
            (d.seed, d.threshold, d.scale),
            [p.h, p.w, p.kh, p.kw],
            gelu,
        )?;
        let shape = Shape::from((dims[0], dims[1], p.h / p.kh, p.w / p.kw));
        Ok((y, shape))
    }

    /// ∂L/∂x on a GPU from ∂L/∂y (`g`), through GELU at `gelu_of` when given.
    #[cfg(feature = "cuda")]
    fn cuda_backward(
        &self,
        g: (&candle_core::CudaStorage, &Layout),
        gelu_of: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (d, p) = (self.0, self.1);
        let dims = g.1.dims();
        let mask = (d.seed, d.threshold, d.scale);
        let dx = crate::ops::cuda::dropout_pool_backward(g, mask, [p.h, p.w, p.kh, p.kw], gelu_of)?;
        Ok((dx, Shape::from((dims[0], dims[1], p.h, p.w))))
    }
}

/// ∂L/∂x of `DropoutPool` from ∂L/∂y.
struct DropoutPoolBackward(DropoutPool);

impl CustomOp1 for DropoutPool {
    fn name(&self) -> &'static str {
        "dropout-avg-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (d, p) = (self.0, self.1);
        let x = contiguous::<f32>(s, l)?;
        let dims = l.dims();
        let y = pool_fwd::<f32>(|i| d.apply(i, x[i]) as f64, p, dims[0] * dims[1]);
        let shape = Shape::from((dims[0], dims[1], p.h / p.kh, p.w / p.kw));
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?
                .apply_op1_no_bwd(&DropoutPoolBackward(*self))?,
        ))
    }
}

impl CustomOp1 for DropoutPoolBackward {
    fn name(&self) -> &'static str {
        "dropout-avg-pool-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (d, p) = (self.0 .0, self.0 .1);
        let g = contiguous::<f32>(s, l)?;
        let dims = l.dims();
        // The pool's gradient, then the dropout's on it: as the two ops' backwards compute it.
        let pooled = pool_bwd(g, p, dims[0] * dims[1]);
        let dx = par_map(pooled.len(), |start, out: &mut [f32]| {
            for (k, o) in out.iter_mut().enumerate() {
                *o = d.apply(start + k, pooled[start + k]);
            }
        });
        Ok((
            CpuStorage::F32(dx),
            Shape::from((dims[0], dims[1], p.h, p.w)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.0.cuda_backward((s, l), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Pooling and its gradient equal Candle's avg_pool2d on even sizes (f64, 1e-12). On odd
    /// sizes the trailing row and column get no gradient (PyTorch's floor; Candle's backward
    /// upsamples into them, which is wrong) and the rest gets ∂L/∂y / (kh·kw).
    #[test]
    fn avg_pool_matches_candles_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let max = |t: Tensor| t.abs()?.max_all()?.to_scalar::<f64>();
        for (kh, kw) in [(2, 2), (1, 2)] {
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 8, 10), &dev)?)?;
            let ours = avg_pool(x.as_tensor(), kh, kw)?;
            let theirs = x.as_tensor().avg_pool2d((kh, kw))?;
            let r = Tensor::randn(0f64, 1.0, theirs.shape(), &dev)?;
            assert!(max((&ours - &theirs)?)? < 1e-12);
            let g1 = (ours * &r)?.sum_all()?.backward()?;
            let g2 = (theirs * &r)?.sum_all()?.backward()?;
            assert!(max((g1.get(&x).unwrap() - g2.get(&x).unwrap())?)? < 1e-12);
        }
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (1, 1, 5, 7), &dev)?)?;
        let y = avg_pool(x.as_tensor(), 2, 2)?;
        assert!(
            max((&y
                - x.as_tensor()
                    .narrow(2, 0, 4)?
                    .narrow(3, 0, 6)?
                    .avg_pool2d(2)?)?)?
                < 1e-12
        );
        let r = Tensor::randn(0f64, 1.0, (1, 1, 2, 3), &dev)?;
        let g = (y * &r)?
            .sum_all()?
            .backward()?
            .get(&x)
            .unwrap()
            .squeeze(0)?
            .squeeze(0)?;
        let (g, r) = (
            g.to_vec2::<f64>()?,
            r.squeeze(0)?.squeeze(0)?.to_vec2::<f64>()?,
        );
        for (i, row) in g.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let want = if i < 4 && j < 6 {
                    r[i / 2][j / 2] / 4.0
                } else {
                    0.0
                };
                assert!((v - want).abs() < 1e-15, "({i}, {j}): {v} vs {want}");
            }
        }
        Ok(())
    }

    /// A fused op's output and the gradients of ⟨output, r⟩ (r random) with respect to `vars`
    /// equal, bit for bit, those of the ops it fuses (`plain`).
    fn assert_fused_equals(fused: Tensor, plain: Tensor, vars: &[&Var]) -> Result<()> {
        let r = Tensor::randn(0f32, 1.0, fused.shape(), fused.device())?;
        let values = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        assert_eq!(values(&fused)?, values(&plain)?);
        let ga = (fused * &r)?.sum_all()?.backward()?;
        let gb = (plain * &r)?.sum_all()?.backward()?;
        for v in vars {
            assert_eq!(values(ga.get(v).unwrap())?, values(gb.get(v).unwrap())?);
        }
        Ok(())
    }

    /// The fused dropout + pooling equals the two ops.
    #[test]
    fn dropout_pool_equals_dropout_then_pool() -> Result<()> {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4, 9, 10), &Device::Cpu)?)?;
        let fused = dropout_avg_pool(x.as_tensor(), 0.3, 77, 2, 2)?;
        let plain = avg_pool(&dropout(x.as_tensor(), 0.3, 77)?, 2, 2)?;
        assert_fused_equals(fused, plain, &[&x])
    }

    /// (GELU +) GroupNorm + dropout + pooling as one op equals the separate ops.
    #[test]
    fn norm_dropout_pool_equals_the_separate_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (3, 4, 8, 10), &dev)? + 0.5)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.2, 4, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, 4, &dev)?)?;
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        for gelu_first in [false, true] {
            let fused = group_norm_dropout_avg_pool(xt, gelu_first, (wt, bt), (0.3, 77), (2, 2))?;
            let a = if gelu_first { gelu(xt)? } else { xt.clone() };
            let plain = dropout_avg_pool(&group_norm(&a, wt, bt)?, 0.3, 77, 2, 2)?;
            assert_fused_equals(fused, plain, &[&x, &w, &b])?;
        }
        Ok(())
    }

    /// GELU + dropout + pooling as one op equals the three ops.
    #[test]
    fn gelu_dropout_pool_equals_the_three_ops() -> Result<()> {
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 4, 8, 10), &Device::Cpu)?)?;
        let fused = gelu_dropout_avg_pool(x.as_tensor(), 0.3, 77, 2, 2)?;
        let plain = dropout_avg_pool(&gelu(x.as_tensor())?, 0.3, 77, 2, 2)?;
        assert_fused_equals(fused, plain, &[&x])
    }
}
