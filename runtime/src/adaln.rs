//! adaLN modulation, `LayerNorm(x)·(1 + scale) + shift` (no affine of its own), as one op on the
//! CPU with its backward.
//!
//! x is (B, N, D) tokens, scale and shift are (B, D) per sample. Written in Candle ops the norm is
//! seven elementwise passes and a dozen in backward, each a full (B, N, D) tensor; here one pass
//! each way, the row statistics recomputed in the backward. With x̂ = (x − μ)·r, r = 1/√(σ² + ε)
//! and g = ∂L/∂y·(1 + scale):
//!   ∂L/∂x = r·(g − mean(g) − x̂·mean(g·x̂)),  ∂L/∂scale = Σ_tokens ∂L/∂y·x̂,  ∂L/∂shift = Σ_tokens ∂L/∂y.
//! Other devices and dtypes use the composite.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::nn::standardize_last;
use crate::ops::{on_threads, Blocks};

/// `LayerNorm(x, eps)·(1 + scale) + shift` for x (B, N, D), scale and shift (B, D).
pub fn modulate(x: &Tensor, eps: f64, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
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

struct Modulate {
    eps: f64,
}

/// Mean and 1/√(var + eps) of one row, accumulated in f64.
fn row_stats(row: &[f32], eps: f64) -> (f32, f32) {
    let n = row.len() as f64;
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
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
        let x = crate::ops::contiguous::<f32>(xs, xl)?;
        let scale = crate::ops::contiguous::<f32>(ss, sl)?;
        let shift = crate::ops::contiguous::<f32>(hs, hl)?;
        let mut y = vec![0f32; b * n * d];
        let out = Blocks::new(&mut y);
        on_threads(b, 0, |s, _| {
            let (sc, sh) = (&scale[s * d..(s + 1) * d], &shift[s * d..(s + 1) * d]);
            // SAFETY: sample s's block, written by this thread only.
            let y = unsafe { out.block(s * n * d, n * d) };
            for (xr, yr) in x[s * n * d..(s + 1) * n * d].chunks(d).zip(y.chunks_mut(d)) {
                let (mean, r) = row_stats(xr, self.eps);
                for j in 0..d {
                    yr[j] = (xr[j] - mean) * r * (1.0 + sc[j]) + sh[j];
                }
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
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
        let host = |t: &Tensor| t.contiguous()?.flatten_all()?.to_vec1::<f32>();
        let (xv, sc, g) = (host(x)?, host(scale)?, host(grad)?);
        let mut dx = vec![0f32; b * n * d];
        let mut dscale = vec![0f32; b * d];
        let mut dshift = vec![0f32; b * d];
        let (odx, osc, osh) = (
            Blocks::new(&mut dx),
            Blocks::new(&mut dscale),
            Blocks::new(&mut dshift),
        );
        on_threads(b, 2 * d, |s, scratch| {
            let sc = &sc[s * d..(s + 1) * d];
            // SAFETY: sample s's blocks, written by this thread only.
            let (dx, dsc, dsh) = unsafe {
                (
                    odx.block(s * n * d, n * d),
                    osc.block(s * d, d),
                    osh.block(s * d, d),
                )
            };
            let (xhat, gs) = scratch.split_at_mut(d);
            let rows = xv[s * n * d..(s + 1) * n * d]
                .chunks(d)
                .zip(g[s * n * d..(s + 1) * n * d].chunks(d));
            for ((xr, gr), dxr) in rows.zip(dx.chunks_mut(d)) {
                let (mean, r) = row_stats(xr, self.eps);
                let (mut sum_g, mut sum_gx) = (0f32, 0f32);
                for j in 0..d {
                    xhat[j] = (xr[j] - mean) * r;
                    gs[j] = gr[j] * (1.0 + sc[j]);
                    sum_g += gs[j];
                    sum_gx += gs[j] * xhat[j];
                    dsc[j] += gr[j] * xhat[j];
                    dsh[j] += gr[j];
                }
                let (mg, mgx) = (sum_g / d as f32, sum_gx / d as f32);
                for j in 0..d {
                    dxr[j] = r * (gs[j] - mg - xhat[j] * mgx);
                }
            }
        });
        let dev = grad.device();
        Ok((
            Some(Tensor::from_vec(dx, (b, n, d), dev)?),
            Some(Tensor::from_vec(dscale, (b, d), dev)?),
            Some(Tensor::from_vec(dshift, (b, d), dev)?),
        ))
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
}
