//! Rotary position embedding as one op each way: rotates the first 2·n channels of each head
//! of x (B, H, W, heads, d) by the angles θ (H, W, heads, n), pair (x₁ᵢ, x₂ᵢ) = (x[i], x[n + i])
//! to (x₁ cos θᵢ − x₂ sin θᵢ, x₂ cos θᵢ + x₁ sin θᵢ), the other channels passed through: the
//! hourglass's axial RoPE (k-diffusion's `apply_rotary_emb_` on half of each head). The
//! backward is the rotation by −θ. θ is a constant (positions times a buffer), so it gets no
//! gradient. Candle's `rope*` ops have no backward; built from its ops the rotation is eight
//! passes forward. On the CPU in f32 one pass each way; elsewhere the composite.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

use super::cpu::contiguous;

/// x (B, H, W, heads, d) rotated by θ (H, W, heads, n), 2·n ≤ d.
pub fn rotate(x: &Tensor, theta: &Tensor) -> Result<Tensor> {
    let (cos, sin) = (theta.cos()?, theta.sin()?);
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return composite(x, &cos, &sin);
    }
    let table = |t: &Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1::<f32>() };
    x.contiguous()?.apply_op1(Rotate {
        cos: table(&cos)?,
        sin: table(&sin)?,
        n: theta.dim(D::Minus1)?,
        sign: 1.0,
    })
}

/// The rotation in Candle ops, with cos θ and sin θ given.
fn composite(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let n = cos.dim(D::Minus1)?;
    let d = x.dim(D::Minus1)?;
    let (cos, sin) = (cos.unsqueeze(0)?, sin.unsqueeze(0)?);
    let x1 = x.narrow(4, 0, n)?;
    let x2 = x.narrow(4, n, n)?;
    let y1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let y2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    if 2 * n == d {
        return Tensor::cat(&[y1, y2], 4);
    }
    Tensor::cat(&[y1, y2, x.narrow(4, 2 * n, d - 2 * n)?], 4)
}

/// The rotation by `sign`·θ, with θ's cos and sin laid out as (H, W, heads, n).
struct Rotate {
    cos: Vec<f32>,
    sin: Vec<f32>,
    n: usize,
    sign: f32,
}

impl CustomOp1 for Rotate {
    fn name(&self) -> &'static str {
        "axial-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.dims().last().copied().unwrap_or(1);
        let n = self.n;
        let mut y = contiguous::<f32>(s, l)?.to_vec();
        // Each head's d channels; head j of the whole batch uses angle row j mod (H·W·heads).
        let rows = self.cos.len() / n;
        crate::ops::cpu::on_row_chunks(&mut y, d, |start, heads| {
            for (i, head) in heads.chunks_exact_mut(d).enumerate() {
                let a = ((start / d + i) % rows) * n;
                let (cos, sin) = (&self.cos[a..a + n], &self.sin[a..a + n]);
                let (x1, rest) = head.split_at_mut(n);
                let x2 = &mut rest[..n];
                for k in 0..n {
                    let (c, s) = (cos[k], self.sign * sin[k]);
                    let (u, v) = (x1[k], x2[k]);
                    x1[k] = u * c - v * s;
                    x2[k] = v * c + u * s;
                }
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rotate {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            n: self.n,
            sign: -self.sign,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused rotation equals the composite, values and gradient (f32, 1e-5), with the
    /// rotated part the whole head and half of it.
    #[test]
    fn rotation_matches_the_composite_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        for (d, n) in [(8, 4), (16, 4)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 4, 2, d), &dev)?)?;
            let theta = (Tensor::randn(0f32, 1.0, (3, 4, 2, n), &dev)? * 3.0)?;
            let r = Tensor::randn(0f32, 1.0, (2, 3, 4, 2, d), &dev)?;
            let ours = rotate(x.as_tensor(), &theta)?;
            let theirs = composite(x.as_tensor(), &theta.cos()?, &theta.sin()?)?;
            let max = |t: Tensor| t.abs()?.max_all()?.to_scalar::<f32>();
            assert!(max((&ours - &theirs)?)? < 1e-5);
            let a = (ours * &r)?.sum_all()?.backward()?;
            let b = (theirs * &r)?.sum_all()?.backward()?;
            let diff = max((a.get(&x).unwrap() - b.get(&x).unwrap())?)?;
            assert!(diff < 1e-5, "d = {d}: ∂x differs by {diff}");
        }
        Ok(())
    }
}
