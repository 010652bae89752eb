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

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};

use crate::linear::{gemm, gemm_strided};
use crate::ops::{exp_f32, on_threads, vectorised, with_f32, Blocks};
use crate::precision::{operands, round_in_place};

/// softmax(q·kᵀ/√d)·v per head for q, k, v of shape (B, N, H·d): the heads side by side in the
/// last axis, as the projections write them (the op reads and writes each head in place, with a
/// row stride of H·d, so no head split or merge is copied). Returns (B, N, H·d).
///
/// Under autocast q, k, v and the output are rounded to the 16-bit type: by the op itself on the
/// CPU; on a GPU inside the two 16-bit products, with the softmax in f32 between them, as flash
/// attention's does (precision.rs).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, width) = q.dims3()?;
    let d = width / heads;
    let scale = 1.0 / (d as f64).sqrt();
    if q.device().is_cpu() && q.dtype() == DType::F32 {
        let round = crate::precision::autocast_dtype();
        return q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            Attention {
                scale,
                heads,
                round,
            },
        );
    }
    let split = |t: &Tensor| t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous();
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let scores = (crate::precision::matmul(&q, &k.t()?)? * scale)?;
    crate::precision::matmul(&softmax_last(&scores)?, &v)?
        .transpose(1, 2)?
        .reshape((b, n, width))
}

struct Attention {
    scale: f64,
    heads: usize,
    /// Autocast's 16-bit type, to which operands, gradients and the output are rounded.
    round: Option<DType>,
}

/// Softmax over the last axis as one op each way (f32 on the CPU or a GPU, dit.cu's kernels
/// there): for attention written as two products around it. In Candle ops it is five passes
/// forward and more backward; other dtypes use them.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let gpu = cfg!(feature = "cuda") && x.device().is_cuda();
    if x.dtype() != DType::F32 || !(x.device().is_cpu() || gpu) {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

/// (p, ∂L/∂p) → ∂L/∂s.
struct SoftmaxBackward;

fn row_len(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

/// `f(offset, rows)` over `data` cut into one run of whole rows of `n` per thread.
fn on_row_chunks(data: &mut [f32], n: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = data.len() / n;
    let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
    let chunk = rows.div_ceil(threads).max(1) * n;
    rayon::scope(|scope| {
        for (k, part) in data.chunks_mut(chunk).enumerate() {
            let f = &f;
            scope.spawn(move |_| f(k * chunk, part));
        }
    });
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = row_len(l);
        let mut p = crate::ops::contiguous::<f32>(s, l)?.to_vec();
        on_row_chunks(&mut p, n, |_, rows| softmax_rows(rows, n));
        Ok((CpuStorage::F32(p), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let p = crate::cuda::softmax_rows_forward(s, l, row_len(l))?;
        Ok((p, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, p: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            p.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?,
        ))
    }
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-last-backward"
    }

    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = row_len(pl);
        let p = crate::ops::contiguous::<f32>(ps, pl)?;
        let mut ds = crate::ops::contiguous::<f32>(gs, gl)?.to_vec();
        on_row_chunks(&mut ds, n, |start, rows| {
            softmax_backward_rows(&p[start..start + rows.len()], rows, n)
        });
        Ok((CpuStorage::F32(ds), pl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let ds = crate::cuda::softmax_rows_backward((ps, pl), (gs, gl), row_len(pl))?;
        Ok((ds, pl.shape().clone()))
    }
}

/// Where the (batch, head) pairs lie in a (B, N, H·d) buffer.
#[derive(Clone, Copy)]
struct Geometry {
    pairs: usize,
    n: usize,
    d: usize,
    width: usize,
    heads: usize,
}

impl Geometry {
    fn of(l: &Layout, heads: usize) -> Result<Self> {
        let &[b, n, width] = l.dims() else {
            candle_core::bail!("attention takes (B, N, H·d) tensors, not {:?}", l.dims())
        };
        if heads == 0 || width % heads != 0 {
            candle_core::bail!("attention: width {width} is not a multiple of {heads} heads");
        }
        Ok(Geometry {
            pairs: b * heads,
            n,
            d: width / heads,
            width,
            heads,
        })
    }

    /// The offset of a pair's first element (row 0 of its head's columns).
    fn offset(&self, pair: usize) -> usize {
        (pair / self.heads) * self.n * self.width + (pair % self.heads) * self.d
    }
}

/// P = softmax(q·kᵀ·scale) row by row into `p` (N×N); q and k start at the head's first element
/// with row stride `width`.
fn probabilities(q: &[f32], k: &[f32], g: Geometry, scale: f32, p: &mut [f32]) {
    let (n, d, w) = (g.n, g.d, g.width);
    gemm((n, n, d), p, false, (q, w, 1), (k, 1, w), scale, 1);
    softmax_rows(p, n);
}

vectorised! {
    /// Each row of `p` (rows of n) replaced by its softmax.
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
}

vectorised! {
    /// The softmax backward in place, row by row: dS = P ∘ (dP − rowsum(P ∘ dP)).
    fn softmax_backward_rows(p: &[f32], dp: &mut [f32], n: usize) {
        for (prow, dprow) in p.chunks(n).zip(dp.chunks_mut(n)) {
            let mut lanes = [0f32; 8];
            let (pc, dc) = (prow.chunks_exact(8), dprow.chunks_exact(8));
            let (pr, dr) = (pc.remainder(), dc.remainder());
            for (a, b) in pc.zip(dc) {
                for ((l, x), y) in lanes.iter_mut().zip(a).zip(b) {
                    *l += x * y;
                }
            }
            let dot = pr
                .iter()
                .zip(dr)
                .fold(lanes.iter().sum::<f32>(), |s, (x, y)| s + x * y);
            for (x, &pv) in dprow.iter_mut().zip(prow) {
                *x = pv * (*x - dot);
            }
        }
    }
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
        let g = Geometry::of(ql, self.heads)?;
        if kl.dims() != ql.dims() || vl.dims() != ql.dims() {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} differ",
                ql.dims(),
                kl.dims(),
                vl.dims()
            );
        }
        let [q, k, v] = operands(
            [
                crate::ops::contiguous::<f32>(qs, ql)?,
                crate::ops::contiguous::<f32>(ks, kl)?,
                crate::ops::contiguous::<f32>(vs, vl)?,
            ],
            self.round,
        );
        let mut out = vec![0f32; ql.shape().elem_count()];
        let o = Blocks::new(&mut out);
        let scale = self.scale as f32;
        let (n, d, w) = (g.n, g.d, g.width);
        on_threads(g.pairs, n * n, |pair, p| {
            let at = g.offset(pair);
            probabilities(&q[at..], &k[at..], g, scale, p);
            // SAFETY: this pair's head columns of its sample's rows, written by this thread only.
            unsafe {
                gemm_strided(
                    (n, d, n),
                    o.at(at),
                    w,
                    false,
                    (p, n, 1),
                    (&v[at..], w, 1),
                    1.0,
                    1,
                )
            };
        });
        round_in_place(&mut out, self.round);
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
        let g = Geometry::of(q.layout(), self.heads)?;
        let (n, d, w) = (g.n, g.d, g.width);
        let scale = self.scale as f32;
        let len = shape.elem_count();
        let (mut dq, mut dk, mut dv) = (vec![0f32; len], vec![0f32; len], vec![0f32; len]);
        let (dqs, dks, dvs) = (
            Blocks::new(&mut dq),
            Blocks::new(&mut dk),
            Blocks::new(&mut dv),
        );
        with_f32(&[q, k, v, grad], |t| {
            let [q, k, v, go] = operands([t[0], t[1], t[2], t[3]], self.round);
            let (q, k, v, go) = (&*q, &*k, &*v, &*go);
            on_threads(g.pairs, 2 * n * n, |pair, buf| {
                let at = g.offset(pair);
                let (q, k, v, go) = (&q[at..], &k[at..], &v[at..], &go[at..]);
                let (p, dp) = buf.split_at_mut(n * n);
                probabilities(q, k, g, scale, p);
                // SAFETY: this pair's head columns, written by this thread only.
                unsafe {
                    gemm_strided(
                        (n, d, n),
                        dvs.at(at),
                        w,
                        false,
                        (p, 1, n),
                        (go, w, 1),
                        1.0,
                        1,
                    );
                }
                gemm((n, n, d), dp, false, (go, w, 1), (v, 1, w), 1.0, 1);
                softmax_backward_rows(p, dp, n);
                // SAFETY: as above.
                unsafe {
                    gemm_strided(
                        (n, d, n),
                        dqs.at(at),
                        w,
                        false,
                        (dp, n, 1),
                        (k, w, 1),
                        scale,
                        1,
                    );
                    gemm_strided(
                        (n, d, n),
                        dks.at(at),
                        w,
                        false,
                        (dp, 1, n),
                        (q, w, 1),
                        scale,
                        1,
                    );
                }
            });
            Ok(())
        })?;
        for g in [&mut dq, &mut dk, &mut dv] {
            round_in_place(g, self.round);
        }
        let dev = grad.device();
        let t = |x: Vec<f32>| Tensor::from_vec(x, shape.clone(), dev);
        Ok((Some(t(dq)?), Some(t(dk)?), Some(t(dv)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Rows of 37 (a vector tail) and of 8: forward and gradient equal Candle's softmax.
    #[test]
    fn softmax_last_equals_candles_softmax_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        for n in [37, 8] {
            let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (5, 7, n), &dev)? + 10.0)?)?;
            let r = Tensor::randn(0f32, 1.0, (5, 7, n), &dev)?;
            let ours = softmax_last(x.as_tensor())?;
            let theirs = candle_nn::ops::softmax(x.as_tensor(), D::Minus1)?;
            let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
            };
            assert!(diff(&ours, &theirs)? < 1e-6, "rows of {n}");
            let go = (&ours * &r)?.sum_all()?.backward()?;
            let gt = (&theirs * &r)?.sum_all()?.backward()?;
            let e = diff(go.get(&x).unwrap(), gt.get(&x).unwrap())?;
            assert!(e < 1e-6, "rows of {n}: gradient {e}");
        }
        Ok(())
    }

    /// Output and all three gradients equal the composite of Candle ops.
    #[test]
    fn fused_attention_equals_the_composite_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let mk = || Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 37, 24), &dev)?);
        let (q, k, v) = (mk()?, mk()?, mk()?);
        let r = Tensor::randn(0f32, 1.0, (2, 37, 24), &dev)?;
        let fused = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), 3)?;
        // Three heads of 8, split and merged in Candle ops.
        let split = |t: &Var| {
            t.as_tensor()
                .reshape((2, 37, 3, 8))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scores = (split(&q)?.matmul(&split(&k)?.t()?)? * (1.0 / 8f64.sqrt()))?;
        let plain = candle_nn::ops::softmax(&scores, D::Minus1)?
            .matmul(&split(&v)?)?
            .transpose(1, 2)?
            .reshape((2, 37, 24))?;
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
