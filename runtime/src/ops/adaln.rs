//! adaLN modulation, `LayerNorm(x)·(1 + scale) + shift` (no affine of its own), as one op on the
//! CPU with its backward.
//!
//! x is (B, N, D) tokens, scale and shift are (B, D) per sample. Written in Candle ops the norm is
//! seven elementwise passes and a dozen in backward, each a full (B, N, D) tensor; here one pass
//! each way, the row statistics recomputed in the backward. With x̂ = (x − μ)·r, r = 1/√(σ² + ε)
//! and g = ∂L/∂y·(1 + scale):
//!   ∂L/∂x = r·(g − mean(g) − x̂·mean(g·x̂)),  ∂L/∂scale = Σ_tokens ∂L/∂y·x̂,  ∂L/∂shift = Σ_tokens ∂L/∂y.
//! Other devices and dtypes use the composite.
//!
//! The gated residual of adaLN-Zero, `x + y·gate` (gate (B, D) per sample), is one op too: one
//! pass forward; backward ∂L/∂x = ∂L/∂out (passed on, not copied), ∂L/∂y = ∂L/∂out·gate and
//! ∂L/∂gate = Σ_tokens ∂L/∂out·y in one pass (in Candle ops: a broadcast multiply and an add
//! forward, two multiplies and a reduction backward).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::norm::standardize_last;
use crate::ops::cpu::{on_threads, vectorised, with_f32, Blocks};

/// `LayerNorm(x, eps)·(1 + scale) + shift` for x (B, N, D), scale and shift (B, D).
pub fn modulate(x: &Tensor, eps: f64, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    if fused(x) {
        return x.contiguous()?.apply_op3(
            &scale.contiguous()?,
            &shift.contiguous()?,
            Modulate { eps },
        );
    }
    standardize_last(x, eps)?
        .broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// The fused ops run on f32 tensors on the CPU, and with `--features cuda` on a GPU
/// (runtime/kernels/dit.cu).
fn fused(x: &Tensor) -> bool {
    x.dtype() == DType::F32
        && (x.device().is_cpu() || cfg!(feature = "cuda") && x.device().is_cuda())
}

struct Modulate {
    eps: f64,
}

/// Σ f(v) over a row in f64, in 8 lanes so the loop vectorises.
#[inline(always)]
fn lane_sum(row: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v as f64);
        }
    }
    rest.iter()
        .fold(lanes.iter().sum(), |s, &v| s + f(v as f64))
}

/// Mean and 1/√(var + eps) of one row, accumulated in f64.
#[inline(always)]
fn row_stats(row: &[f32], eps: f64) -> (f32, f32) {
    let n = row.len() as f64;
    let mean = lane_sum(row, |v| v) / n;
    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

vectorised! {
    /// One sample's rows (of d) of `LayerNorm(x)·(1 + scale) + shift` into `y`.
    fn modulate_rows(x: &[f32], scale: &[f32], shift: &[f32], eps: f64, y: &mut [f32]) {
        let d = scale.len();
        for (xr, yr) in x.chunks(d).zip(y.chunks_mut(d)) {
            let (mean, r) = row_stats(xr, eps);
            for j in 0..d {
                yr[j] = (xr[j] - mean) * r * (1.0 + scale[j]) + shift[j];
            }
        }
    }
}

vectorised! {
    /// One sample's backward (see the module docs): ∂L/∂x rows into `dx`, ∂L/∂scale and
    /// ∂L/∂shift accumulated into `dscale`, `dshift`; `scratch` holds 2·d floats.
    fn modulate_rows_backward(
        x: &[f32],
        g: &[f32],
        scale: &[f32],
        eps: f64,
        dx: &mut [f32],
        dscale: &mut [f32],
        dshift: &mut [f32],
        scratch: &mut [f32],
    ) {
        let d = scale.len();
        let (xhat, gs) = scratch.split_at_mut(d);
        for ((xr, gr), dxr) in x.chunks(d).zip(g.chunks(d)).zip(dx.chunks_mut(d)) {
            let (mean, r) = row_stats(xr, eps);
            for j in 0..d {
                xhat[j] = (xr[j] - mean) * r;
                gs[j] = gr[j] * (1.0 + scale[j]);
                dscale[j] += gr[j] * xhat[j];
                dshift[j] += gr[j];
            }
            let mg = (lane_sum(gs, |v| v) / d as f64) as f32;
            let mut lanes = [0f32; 8];
            for (c, h) in gs.chunks_exact(8).zip(xhat.chunks_exact(8)) {
                for ((l, a), b) in lanes.iter_mut().zip(c).zip(h) {
                    *l += a * b;
                }
            }
            let tail = (d / 8) * 8..d;
            let sum_gx = tail.fold(lanes.iter().sum::<f32>(), |s, j| s + gs[j] * xhat[j]);
            let mgx = sum_gx / d as f32;
            for j in 0..d {
                dxr[j] = r * (gs[j] - mg - xhat[j] * mgx);
            }
        }
    }
}

impl CustomOp3 for Modulate {
    fn name(&self) -> &'static str {
        "adaln-modulate"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
        hs: &CpuStorage,
        hl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n, d) = xl.shape().dims3()?;
        if sl.dims() != [b, d] || hl.dims() != [b, d] {
            candle_core::bail!(
                "modulate: x {:?} with scale {:?} and shift {:?}",
                xl.dims(),
                sl.dims(),
                hl.dims()
            );
        }
        let x = crate::ops::cpu::contiguous::<f32>(xs, xl)?;
        let scale = crate::ops::cpu::contiguous::<f32>(ss, sl)?;
        let shift = crate::ops::cpu::contiguous::<f32>(hs, hl)?;
        let mut y = vec![0f32; b * n * d];
        let out = Blocks::new(&mut y);
        on_threads(b, 0, |s, _| {
            let (sc, sh) = (&scale[s * d..(s + 1) * d], &shift[s * d..(s + 1) * d]);
            // SAFETY: sample s's block, written by this thread only.
            let y = unsafe { out.block(s * n * d, n * d) };
            modulate_rows(&x[s * n * d..(s + 1) * n * d], sc, sh, self.eps, y);
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
        hs: &candle_core::CudaStorage,
        hl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = xl.shape().dims3()?;
        let y = crate::ops::cuda::modulate_forward(
            (xs, xl),
            (ss, sl),
            (hs, hl),
            dims,
            self.eps as f32,
        )?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _shift: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, n, d) = x.dims3()?;
        #[cfg(feature = "cuda")]
        if grad.device().is_cuda() {
            let packed = x.apply_op3_no_bwd(
                scale,
                &grad.contiguous()?,
                &gpu::Backward::Modulate { eps: self.eps },
            )?;
            let c = crate::ops::cuda::chunks(n);
            return Ok((
                Some(packed.narrow(0, 0, b * n * d)?.reshape((b, n, d))?),
                Some(gpu::sum_partials(&packed, b * n * d, (b, c, d))?),
                Some(gpu::sum_partials(
                    &packed,
                    b * n * d + b * c * d,
                    (b, c, d),
                )?),
            ));
        }
        let mut dx = vec![0f32; b * n * d];
        let mut dscale = vec![0f32; b * d];
        let mut dshift = vec![0f32; b * d];
        let (odx, osc, osh) = (
            Blocks::new(&mut dx),
            Blocks::new(&mut dscale),
            Blocks::new(&mut dshift),
        );
        with_f32(&[x, scale, grad], |t| {
            let (xv, sc, g) = (t[0], t[1], t[2]);
            on_threads(b, 2 * d, |s, scratch| {
                let rows = s * n * d..(s + 1) * n * d;
                // SAFETY: sample s's blocks, written by this thread only.
                let (dx, dsc, dsh) = unsafe {
                    (
                        odx.block(s * n * d, n * d),
                        osc.block(s * d, d),
                        osh.block(s * d, d),
                    )
                };
                let sc = &sc[s * d..(s + 1) * d];
                modulate_rows_backward(
                    &xv[rows.clone()],
                    &g[rows],
                    sc,
                    self.eps,
                    dx,
                    dsc,
                    dsh,
                    scratch,
                );
            });
            Ok(())
        })?;
        let dev = grad.device();
        Ok((
            Some(Tensor::from_vec(dx, (b, n, d), dev)?),
            Some(Tensor::from_vec(dscale, (b, d), dev)?),
            Some(Tensor::from_vec(dshift, (b, d), dev)?),
        ))
    }
}

/// `x + y·gate` for x and y (B, N, D) and a per-sample gate (B, D).
pub fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if fused(x) {
        return x
            .contiguous()?
            .apply_op3(&y.contiguous()?, &gate.contiguous()?, GatedResidual);
    }
    x + y.broadcast_mul(&gate.unsqueeze(1)?)?
}

struct GatedResidual;

vectorised! {
    /// One sample's rows (of d) of `x + y·gate` into `out`.
    fn gated_rows(x: &[f32], y: &[f32], gate: &[f32], out: &mut [f32]) {
        let d = gate.len();
        for ((o, x), y) in out.chunks_mut(d).zip(x.chunks(d)).zip(y.chunks(d)) {
            for j in 0..d {
                o[j] = x[j] + y[j] * gate[j];
            }
        }
    }
}

vectorised! {
    /// One sample's ∂L/∂y = g·gate into `dy`, and ∂L/∂gate = Σ_rows g·y into `dgate`.
    fn gated_rows_backward(g: &[f32], y: &[f32], gate: &[f32], dy: &mut [f32], dgate: &mut [f32]) {
        let d = gate.len();
        for ((dyr, gr), yr) in dy.chunks_mut(d).zip(g.chunks(d)).zip(y.chunks(d)) {
            for j in 0..d {
                dyr[j] = gr[j] * gate[j];
                dgate[j] += gr[j] * yr[j];
            }
        }
    }
}

impl CustomOp3 for GatedResidual {
    fn name(&self) -> &'static str {
        "gated-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n, d) = xl.shape().dims3()?;
        if yl.dims() != xl.dims() || gl.dims() != [b, d] {
            candle_core::bail!(
                "gated residual: x {:?}, y {:?}, gate {:?}",
                xl.dims(),
                yl.dims(),
                gl.dims()
            );
        }
        let x = crate::ops::cpu::contiguous::<f32>(xs, xl)?;
        let y = crate::ops::cpu::contiguous::<f32>(ys, yl)?;
        let gate = crate::ops::cpu::contiguous::<f32>(gs, gl)?;
        let mut out = vec![0f32; b * n * d];
        let o = Blocks::new(&mut out);
        on_threads(b, 0, |s, _| {
            let rows = s * n * d..(s + 1) * n * d;
            // SAFETY: sample s's block, written by this thread only.
            let o = unsafe { o.block(s * n * d, n * d) };
            gated_rows(&x[rows.clone()], &y[rows], &gate[s * d..(s + 1) * d], o);
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (_, n, d) = xl.shape().dims3()?;
        let out = crate::ops::cuda::gated_residual_forward((xs, xl), (ys, yl), (gs, gl), (n, d))?;
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        y: &Tensor,
        gate: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, n, d) = y.dims3()?;
        #[cfg(feature = "cuda")]
        if grad.device().is_cuda() {
            let packed =
                grad.contiguous()?
                    .apply_op3_no_bwd(y, gate, &gpu::Backward::GatedResidual)?;
            let c = crate::ops::cuda::chunks(n);
            return Ok((
                Some(grad.clone()),
                Some(packed.narrow(0, 0, b * n * d)?.reshape((b, n, d))?),
                Some(gpu::sum_partials(&packed, b * n * d, (b, c, d))?),
            ));
        }
        let mut dy = vec![0f32; b * n * d];
        let mut dgate = vec![0f32; b * d];
        let (ody, odg) = (Blocks::new(&mut dy), Blocks::new(&mut dgate));
        with_f32(&[grad, y, gate], |t| {
            let (g, y, gate) = (t[0], t[1], t[2]);
            on_threads(b, 0, |s, _| {
                let rows = s * n * d..(s + 1) * n * d;
                // SAFETY: sample s's blocks, written by this thread only.
                let (dy, dg) = unsafe { (ody.block(s * n * d, n * d), odg.block(s * d, d)) };
                gated_rows_backward(
                    &g[rows.clone()],
                    &y[rows],
                    &gate[s * d..(s + 1) * d],
                    dy,
                    dg,
                );
            });
            Ok(())
        })?;
        let dev = grad.device();
        Ok((
            Some(grad.clone()),
            Some(Tensor::from_vec(dy, (b, n, d), dev)?),
            Some(Tensor::from_vec(dgate, (b, d), dev)?),
        ))
    }
}

/// The GPU halves of the backwards (runtime/kernels/dit.cu); on the CPU they run inside `bwd`.
#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

    /// The backward kernels (dit.cu), each packing its outputs into one buffer.
    pub(super) enum Backward {
        /// (x, scale, ∂L/∂y) → [∂L/∂x | ∂scale partials | ∂shift partials].
        Modulate { eps: f64 },
        /// (∂L/∂out, y, gate) → [∂L/∂y | ∂gate partials].
        GatedResidual,
    }

    /// Per-sample (B, d) sums of the kernel's (B, chunks, d) partial rows stored from `offset` of a
    /// packed output.
    pub(super) fn sum_partials(
        packed: &Tensor,
        offset: usize,
        (b, chunks, d): (usize, usize, usize),
    ) -> Result<Tensor> {
        packed
            .narrow(0, offset, b * chunks * d)?
            .reshape((b, chunks, d))?
            .sum(1)
    }

    impl CustomOp3 for Backward {
        fn name(&self) -> &'static str {
            match self {
                Backward::Modulate { .. } => "adaln-modulate-backward",
                Backward::GatedResidual => "gated-residual-backward",
            }
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!(
                "{} runs on a GPU; the CPU backward is computed in the forward op's bwd",
                self.name()
            )
        }

        fn cuda_fwd(
            &self,
            s1: &candle_core::CudaStorage,
            l1: &Layout,
            s2: &candle_core::CudaStorage,
            l2: &Layout,
            s3: &candle_core::CudaStorage,
            l3: &Layout,
        ) -> Result<(candle_core::CudaStorage, Shape)> {
            let (b, n, d) = l1.shape().dims3()?;
            let partials = b * crate::ops::cuda::chunks(n) * d;
            let (out, len) = match self {
                Backward::Modulate { eps } => (
                    crate::ops::cuda::modulate_backward(
                        (s1, l1),
                        (s2, l2),
                        (s3, l3),
                        (b, n, d),
                        *eps as f32,
                    )?,
                    b * n * d + 2 * partials,
                ),
                Backward::GatedResidual => (
                    crate::ops::cuda::gated_residual_backward(
                        (s1, l1),
                        (s2, l2),
                        (s3, l3),
                        (b, n, d),
                    )?,
                    b * n * d + partials,
                ),
            };
            Ok((out, Shape::from(len)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Output and gradients equal the composite of Candle ops.
    #[test]
    fn fused_modulate_equals_the_composite_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (3, 11, 24), &dev)? + 0.5)?)?;
        let scale = Var::from_tensor(&Tensor::randn(0f32, 0.5, (3, 24), &dev)?)?;
        let shift = Var::from_tensor(&Tensor::randn(0f32, 0.5, (3, 24), &dev)?)?;
        let r = Tensor::randn(0f32, 1.0, (3, 11, 24), &dev)?;
        let fused = modulate(x.as_tensor(), 1e-6, shift.as_tensor(), scale.as_tensor())?;
        let plain = standardize_last(x.as_tensor(), 1e-6)?
            .broadcast_mul(&(scale.as_tensor().unsqueeze(1)? + 1.0)?)?
            .broadcast_add(&shift.as_tensor().unsqueeze(1)?)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert!(diff(&fused, &plain)? < 1e-5);
        let gf = (&fused * &r)?.sum_all()?.backward()?;
        let gp = (&plain * &r)?.sum_all()?.backward()?;
        for (name, var) in [("x", &x), ("scale", &scale), ("shift", &shift)] {
            let e = diff(gf.get(var).unwrap(), gp.get(var).unwrap())?;
            assert!(e < 1e-4, "d{name}: {e}");
        }
        Ok(())
    }

    /// `x + y·gate` and its gradients equal the broadcast Candle ops.
    #[test]
    fn fused_gated_residual_equals_the_composite_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 11, 24), &dev)?)?;
        let y = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 11, 24), &dev)?)?;
        let gate = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 24), &dev)?)?;
        let r = Tensor::randn(0f32, 1.0, (3, 11, 24), &dev)?;
        let fused = gated_residual(x.as_tensor(), y.as_tensor(), gate.as_tensor())?;
        let plain = (x.as_tensor()
            + y.as_tensor()
                .broadcast_mul(&gate.as_tensor().unsqueeze(1)?)?)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert!(diff(&fused, &plain)? < 1e-6);
        let gf = (&fused * &r)?.sum_all()?.backward()?;
        let gp = (&plain * &r)?.sum_all()?.backward()?;
        for (name, var) in [("x", &x), ("y", &y), ("gate", &gate)] {
            let e = diff(gf.get(var).unwrap(), gp.get(var).unwrap())?;
            assert!(e < 1e-5, "d{name}: {e}");
        }
        Ok(())
    }
}
