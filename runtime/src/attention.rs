//! Scaled dot-product attention as one op on the CPU: softmax(q·kᵀ·scale)·v per (batch, head),
//! with its backward, never keeping the N×N probabilities.
//!
//! Written out in Candle ops, attention keeps the scores, their max-shifted copy, the exponentials
//! and the probabilities of every head of every layer for the backward pass: at 1024 tokens,
//! 6 heads and batch 8 that is 200 MB per tensor per layer, and most of a DiT step's memory. Here
//! the forward keeps nothing but its inputs and output; the backward recomputes each head's
//! probabilities (one more q·kᵀ GEMM) in a per-thread scratch buffer, as flash attention does:
//!   P = softmax(S), S = q·kᵀ·scale
//!   dv = Pᵀ·do,  dP = do·vᵀ,  dS = P ∘ (dP − rowsum(P ∘ dP)),  dq = dS·k·scale,  dk = dSᵀ·q·scale
//! Every product is one `gemm` call on one thread; threads take whole (batch, head) pairs. Other
//! devices and dtypes use the composite of Candle ops.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use crate::linear::gemm;
use crate::ops::{exp_f32, on_threads, Blocks};

/// softmax(q·kᵀ/√d)·v for q, k, v of shape (B, H, N, d).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let scale = 1.0 / (d as f64).sqrt();
    if q.device().is_cpu() && q.dtype() == DType::F32 {
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, Attention { scale });
    }
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(v)
}

struct Attention {
    scale: f64,
}

/// P = softmax(q·kᵀ·scale) row by row into `p` (N×N).
fn probabilities(q: &[f32], k: &[f32], n: usize, d: usize, scale: f32, p: &mut [f32]) {
    gemm((n, n, d), p, false, (q, d, 1), (k, 1, d), scale, 1);
    #[inline(always)]
    fn softmax_rows(p: &mut [f32], n: usize) {
        for row in p.chunks_mut(n) {
            // 8 lanes of max and sum, so the reductions vectorise.
            let mut lanes = [f32::NEG_INFINITY; 8];
            let mut chunks = row.chunks_exact(8);
            for c in &mut chunks {
                for (l, &x) in lanes.iter_mut().zip(c) {
                    *l = l.max(x);
                }
            }
            let max = chunks.remainder().iter().fold(
                lanes.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)),
                |m, &x| m.max(x),
            );
            let mut sums = [0f32; 8];
            let mut chunks = row.chunks_exact_mut(8);
            for c in &mut chunks {
                for (s, x) in sums.iter_mut().zip(c.iter_mut()) {
                    *x = exp_f32(*x - max);
                    *s += *x;
                }
            }
            let mut sum: f32 = sums.iter().sum();
            for x in chunks.into_remainder() {
                *x = exp_f32(*x - max);
                sum += *x;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(p: &mut [f32], n: usize) {
            softmax_rows(p, n)
        }
        // SAFETY: the CPU has AVX2 and FMA (both checked).
        return unsafe { avx2(p, n) };
    }
    softmax_rows(p, n)
}

fn dims(l: &Layout) -> Result<(usize, usize, usize)> {
    let &[b, h, n, d] = l.dims() else {
        candle_core::bail!("attention takes (B, H, N, d) tensors, not {:?}", l.dims())
    };
    Ok((b * h, n, d))
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (pairs, n, d) = dims(ql)?;
        if kl.dims() != ql.dims() || vl.dims() != ql.dims() {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} differ",
                ql.dims(),
                kl.dims(),
                vl.dims()
            );
        }
        let q = crate::ops::contiguous::<f32>(qs, ql)?;
        let k = crate::ops::contiguous::<f32>(ks, kl)?;
        let v = crate::ops::contiguous::<f32>(vs, vl)?;
        let mut out = vec![0f32; pairs * n * d];
        let o = Blocks::new(&mut out);
        let scale = self.scale as f32;
        on_threads(pairs, n * n, |pair, p| {
            let at = pair * n * d;
            let (q, k, v) = (&q[at..at + n * d], &k[at..at + n * d], &v[at..at + n * d]);
            probabilities(q, k, n, d, scale, p);
            // SAFETY: this pair's block, written by this thread only.
            let o = unsafe { o.block(at, n * d) };
            gemm((n, d, n), o, false, (p, n, 1), (v, d, 1), 1.0, 1);
        });
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let shape = q.shape().clone();
        let (pairs, n, d) = dims(q.layout())?;
        let host = |t: &Tensor| t.contiguous()?.flatten_all()?.to_vec1::<f32>();
        let (q, k, v, g) = (host(q)?, host(k)?, host(v)?, host(grad)?);
        let mut dq = vec![0f32; pairs * n * d];
        let mut dk = vec![0f32; pairs * n * d];
        let mut dv = vec![0f32; pairs * n * d];
        let (dqs, dks, dvs) = (
            Blocks::new(&mut dq),
            Blocks::new(&mut dk),
            Blocks::new(&mut dv),
        );
        let scale = self.scale as f32;
        on_threads(pairs, 2 * n * n, |pair, buf| {
            let at = pair * n * d;
            let r = at..at + n * d;
            let (q, k, v, g) = (&q[r.clone()], &k[r.clone()], &v[r.clone()], &g[r]);
            let (p, dp) = buf.split_at_mut(n * n);
            probabilities(q, k, n, d, scale, p);
            // SAFETY: this pair's blocks, written by this thread only.
            let (dq, dk, dv) = unsafe {
                (
                    dqs.block(at, n * d),
                    dks.block(at, n * d),
                    dvs.block(at, n * d),
                )
            };
            gemm((n, d, n), dv, false, (p, 1, n), (g, d, 1), 1.0, 1);
            gemm((n, n, d), dp, false, (g, d, 1), (v, 1, d), 1.0, 1);
            for (prow, dprow) in p.chunks(n).zip(dp.chunks_mut(n)) {
                let dot: f32 = prow.iter().zip(dprow.iter()).map(|(a, b)| a * b).sum();
                for (x, &pv) in dprow.iter_mut().zip(prow) {
                    *x = pv * (*x - dot);
                }
            }
            gemm((n, d, n), dq, false, (dp, n, 1), (k, d, 1), scale, 1);
            gemm((n, d, n), dk, false, (dp, 1, n), (q, d, 1), scale, 1);
        });
        let dev = grad.device();
        let t = |x: Vec<f32>| Tensor::from_vec(x, shape.clone(), dev);
        Ok((Some(t(dq)?), Some(t(dk)?), Some(t(dv)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Output and all three gradients equal the composite of Candle ops.
    #[test]
    fn fused_attention_equals_the_composite_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let mk = || Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 37, 8), &dev)?);
        let (q, k, v) = (mk()?, mk()?, mk()?);
        let r = Tensor::randn(0f32, 1.0, (2, 3, 37, 8), &dev)?;
        let fused = attention(q.as_tensor(), k.as_tensor(), v.as_tensor())?;
        let scores = (q.as_tensor().matmul(&k.as_tensor().t()?)? * (1.0 / 8f64.sqrt()))?;
        let plain = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(v.as_tensor())?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert!(diff(&fused, &plain)? < 1e-5);
        let gf = (&fused * &r)?.sum_all()?.backward()?;
        let gp = (&plain * &r)?.sum_all()?.backward()?;
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let e = diff(gf.get(var).unwrap(), gp.get(var).unwrap())?;
            assert!(e < 1e-4, "d{name}: {e}");
        }
        Ok(())
    }
}
