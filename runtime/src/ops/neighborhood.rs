//! Neighbourhood attention (NATTEN's `na2d`, dilation 1) as one op with its backward: each
//! query of an H×W grid attends to the k×k keys around it, as the hourglass transformer's
//! levels above the middle do (k-diffusion's `image_transformer_v2`, kernel 7).
//!
//! NATTEN's window is never padded: near a border it is shifted inward, so every query sees
//! exactly k×k keys. Along an axis of length n, query i's window starts at
//!   start(i) = clamp(i − ⌊k/2⌋, 0, n − k)
//! (NATTEN's `get_window_start` for dilation 1), and the 2-D window is the product of the two
//! axes' windows. Per query and head, with s_t = scale·q·k_t over its window:
//!   o = Σ_t p_t v_t,  p = softmax(s)
//! and backward, with dP_t = dO·v_t and D = Σ_t p_t dP_t (= dO·o):
//!   dq = scale Σ_t p_t (dP_t − D) k_t,  dk_t += scale p_t (dP_t − D) q,  dv_t += p_t dO
//!
//! The CPU op never materialises the scores of the grid: the forward keeps one window of
//! scores per thread, the backward runs twice over the grid: by query rows (dq, and each
//! query's log-sum-exp and D, H·W·heads floats each), then by key rows, where each key gathers
//! the queries whose window holds it (a rectangle: the queries attending key a along an axis
//! are a contiguous range, since start(i) is monotone), so every thread owns the rows it
//! writes. Threads take rows of (batch, row); the dot products over the head dimension run in
//! 16 lanes on the widest vector unit. Under autocast the operands, output and gradients are
//! rounded to the 16-bit type as the other ops do (precision.rs). On a GPU the same two-pass
//! algorithm runs as runtime/kernels/neighborhood.cu (a thread per query and head), for head
//! sizes and kernels the build lists or within its `_any` limits; other shapes and dtypes use the
//! same semantics written in Candle ops (gathered windows, k²× the memory).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::ops::cpu::{dot, exp_f32, on_threads, vectorised, with_f32, Blocks};
use crate::ops::precision::{gradients, operands, round_in_place, storage_operands};

/// Neighbourhood attention of q, k, v of shape (B, H, W, heads·d) (the heads side by side in the
/// last axis, as a projection writes them) with a `kernel`×`kernel` window (odd, at most H and
/// W) and scores scaled by `scale`. Returns (B, H, W, heads·d).
pub fn neighborhood_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kernel: usize,
    scale: f64,
) -> Result<Tensor> {
    let g = Geometry::of(q.dims(), heads, kernel)?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        candle_core::bail!(
            "neighborhood attention: q {:?}, k {:?}, v {:?} differ",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if q.dtype() == DType::F32 && (q.device().is_cpu() || on_gpu_kernels(&g)) {
        let round = crate::ops::precision::autocast_dtype();
        return q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            Neighborhood { g, scale, round },
        );
    }
    by_gathering(q, k, v, g, scale)
}

/// Whether a GPU op of this shape runs neighborhood.cu's kernels (never in a CPU build).
fn on_gpu_kernels(g: &Geometry) -> bool {
    #[cfg(feature = "cuda")]
    return crate::ops::cuda::NaGeometry::supported(g.d, g.kernel);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = g;
        false
    }
}

/// The op's shape: batch, grid, heads, head size and kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Geometry {
    b: usize,
    h: usize,
    w: usize,
    heads: usize,
    d: usize,
    kernel: usize,
}

impl Geometry {
    fn of(dims: &[usize], heads: usize, kernel: usize) -> Result<Self> {
        let &[b, h, w, c] = dims else {
            candle_core::bail!("neighborhood attention takes (B, H, W, heads·d), got {dims:?}");
        };
        if heads == 0 || c % heads != 0 {
            candle_core::bail!(
                "neighborhood attention: width {c} is not a multiple of {heads} heads"
            );
        }
        if kernel.is_multiple_of(2) || kernel > h || kernel > w {
            candle_core::bail!(
                "neighborhood attention: the kernel ({kernel}) must be odd and at most the grid ({h}×{w})"
            );
        }
        Ok(Geometry {
            b,
            h,
            w,
            heads,
            d: c / heads,
            kernel,
        })
    }

    fn width(&self) -> usize {
        self.heads * self.d
    }

    /// The offset of (sample, row, column) in a (B, H, W, heads·d) tensor.
    fn at(&self, s: usize, i: usize, j: usize) -> usize {
        ((s * self.h + i) * self.w + j) * self.width()
    }
}

/// The first key of query `i`'s window along an axis of `n` (NATTEN's `get_window_start`).
fn window_start(i: usize, n: usize, kernel: usize) -> usize {
    i.saturating_sub(kernel / 2).min(n - kernel)
}

/// For each key along an axis of `n`, the range of queries whose window holds it.
fn attending(n: usize, kernel: usize) -> Vec<std::ops::Range<usize>> {
    (0..n)
        .map(|a| {
            let holds = |i: &usize| {
                let s = window_start(*i, n, kernel);
                s <= a && a < s + kernel
            };
            let lo = (0..n).find(holds).expect("every key is in some window");
            let hi = (lo..n).take_while(holds).count() + lo;
            lo..hi
        })
        .collect()
}

/// y += a·x.
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// The read-only operands of a pass.
struct Inputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    g: Geometry,
    scale: f32,
}

impl Inputs<'_> {
    /// Query (s, i, j)'s window probabilities for `head` into `p` (k² of them), row by row of
    /// the window; returns their log-sum-exp.
    #[inline(always)]
    fn probabilities(&self, s: usize, (i, j): (usize, usize), head: usize, p: &mut [f32]) -> f32 {
        let g = &self.g;
        let (k, d) = (g.kernel, g.d);
        let (r0, c0) = (window_start(i, g.h, k), window_start(j, g.w, k));
        let qv = &self.q[g.at(s, i, j) + head * d..][..d];
        let mut max = f32::NEG_INFINITY;
        for a in 0..k {
            for c in 0..k {
                let kv = &self.k[g.at(s, r0 + a, c0 + c) + head * d..][..d];
                let score = self.scale * dot(qv, kv);
                p[a * k + c] = score;
                max = max.max(score);
            }
        }
        let mut sum = 0f32;
        for x in p.iter_mut() {
            *x = exp_f32(*x - max);
            sum += *x;
        }
        let inv = 1.0 / sum;
        p.iter_mut().for_each(|x| *x *= inv);
        max + sum.ln()
    }
}

vectorised! {
    /// The outputs of query row `i` of sample `s` (W × heads·d floats).
    fn forward_row(x: &Inputs, s: usize, i: usize, out: &mut [f32], p: &mut [f32]) {
        let g = &x.g;
        let (k, d, c) = (g.kernel, g.d, g.width());
        for j in 0..g.w {
            let c0 = window_start(j, g.w, k);
            let r0 = window_start(i, g.h, k);
            for head in 0..g.heads {
                x.probabilities(s, (i, j), head, p);
                let o = &mut out[j * c + head * d..][..d];
                o.fill(0.0);
                for a in 0..k {
                    for cc in 0..k {
                        let vv = &x.v[g.at(s, r0 + a, c0 + cc) + head * d..][..d];
                        axpy(o, p[a * k + cc], vv);
                    }
                }
            }
        }
    }
}

vectorised! {
    /// ∂L/∂q of query row `i` of sample `s`, and each of its queries' log-sum-exp and
    /// D = Σ p·dP (W × heads each). `scratch` holds 2k² floats: p and dP of one window.
    fn query_row_backward(
        x: &Inputs,
        go: &[f32],
        s: usize,
        i: usize,
        dq: &mut [f32],
        lse: &mut [f32],
        big_d: &mut [f32],
        scratch: &mut [f32],
    ) {
        let g = &x.g;
        let (k, d, c) = (g.kernel, g.d, g.width());
        let (p, dp) = scratch.split_at_mut(k * k);
        let r0 = window_start(i, g.h, k);
        for j in 0..g.w {
            let c0 = window_start(j, g.w, k);
            for head in 0..g.heads {
                lse[j * g.heads + head] = x.probabilities(s, (i, j), head, p);
                let gov = &go[g.at(s, i, j) + head * d..][..d];
                let mut sum = 0f32;
                for a in 0..k {
                    for cc in 0..k {
                        let vv = &x.v[g.at(s, r0 + a, c0 + cc) + head * d..][..d];
                        let t = a * k + cc;
                        dp[t] = dot(gov, vv);
                        sum += p[t] * dp[t];
                    }
                }
                big_d[j * g.heads + head] = sum;
                let dqv = &mut dq[j * c + head * d..][..d];
                dqv.fill(0.0);
                for a in 0..k {
                    for cc in 0..k {
                        let t = a * k + cc;
                        let kv = &x.k[g.at(s, r0 + a, c0 + cc) + head * d..][..d];
                        axpy(dqv, x.scale * p[t] * (dp[t] - sum), kv);
                    }
                }
            }
        }
    }
}

vectorised! {
    /// ∂L/∂k and ∂L/∂v of key row `a` of sample `s` (W × heads·d each), from the queries whose
    /// windows hold each key (`rows[a]` × `cols[column]`), with their log-sum-exp and D.
    fn key_row_backward(
        x: &Inputs,
        go: &[f32],
        lse: &[f32],
        big_d: &[f32],
        rows: &[std::ops::Range<usize>],
        cols: &[std::ops::Range<usize>],
        s: usize,
        a: usize,
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let g = &x.g;
        let (d, c) = (g.d, g.width());
        dk.fill(0.0);
        dv.fill(0.0);
        for cc in 0..g.w {
            for head in 0..g.heads {
                let kv = &x.k[g.at(s, a, cc) + head * d..][..d];
                let vv = &x.v[g.at(s, a, cc) + head * d..][..d];
                let (dkv, dvv) = (
                    &mut dk[cc * c + head * d..][..d],
                    &mut dv[cc * c + head * d..][..d],
                );
                for i in rows[a].clone() {
                    for j in cols[cc].clone() {
                        let at = g.at(s, i, j) + head * d;
                        let (qv, gov) = (&x.q[at..][..d], &go[at..][..d]);
                        let stat = ((s * g.h + i) * g.w + j) * g.heads + head;
                        let prob = exp_f32(x.scale * dot(qv, kv) - lse[stat]);
                        axpy(dkv, x.scale * prob * (dot(gov, vv) - big_d[stat]), qv);
                        axpy(dvv, prob, gov);
                    }
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Neighborhood {
    g: Geometry,
    scale: f64,
    /// Autocast's 16-bit type, to which operands, gradients and the output are rounded.
    round: Option<DType>,
}

#[cfg(feature = "cuda")]
impl Neighborhood {
    fn cuda_geometry(&self) -> Result<crate::ops::cuda::NaGeometry> {
        let g = self.g;
        crate::ops::cuda::NaGeometry::new(
            (g.b, g.h, g.w, g.heads, g.d, g.kernel),
            self.scale,
            self.round,
        )
    }
}

/// The GPU backward: [∂q | ∂k | ∂v] from the packed [q | k | v] (a custom op takes at most
/// three inputs) and ∂L/∂o.
#[cfg(feature = "cuda")]
struct NeighborhoodBackward(Neighborhood);

#[cfg(feature = "cuda")]
impl candle_core::CustomOp2 for NeighborhoodBackward {
    fn name(&self) -> &'static str {
        "neighborhood-attention-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the packed neighbourhood backward runs on the GPU only")
    }

    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let packed =
            crate::ops::cuda::neighborhood_backward((xs, xl), (gs, gl), self.0.cuda_geometry()?)?;
        Ok((packed, xl.shape().clone()))
    }
}

impl CustomOp3 for Neighborhood {
    fn name(&self) -> &'static str {
        "neighborhood-attention"
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
        let [q, k, v] = storage_operands([(qs, ql), (ks, kl), (vs, vl)], self.round)?;
        let g = self.g;
        let x = Inputs {
            q: &q,
            k: &k,
            v: &v,
            g,
            scale: self.scale as f32,
        };
        let row = g.w * g.width();
        let mut out = vec![0f32; ql.shape().elem_count()];
        let o = Blocks::new(&mut out);
        on_threads(g.b * g.h, g.kernel * g.kernel, |unit, p| {
            // SAFETY: row `unit` of the output, written by this thread only.
            let out = unsafe { o.block(unit * row, row) };
            forward_row(&x, unit / g.h, unit % g.h, out, p);
        });
        round_in_place(&mut out, self.round);
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let o = crate::ops::cuda::neighborhood_forward(
            (qs, ql),
            (ks, kl),
            (vs, vl),
            self.cuda_geometry()?,
        )?;
        Ok((o, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let qkv = Tensor::cat(&[q.flatten_all()?, k.flatten_all()?, v.flatten_all()?], 0)?;
            let grad = grad.to_dtype(DType::F32)?.contiguous()?;
            let packed =
                qkv.apply_op2_no_bwd(&grad.flatten_all()?, &NeighborhoodBackward(*self))?;
            let len = q.elem_count();
            let part = |i: usize| packed.narrow(0, i * len, len)?.reshape(q.shape());
            return Ok((Some(part(0)?), Some(part(1)?), Some(part(2)?)));
        }
        let g = self.g;
        let shape = q.shape().clone();
        let len = shape.elem_count();
        let row = g.w * g.width();
        let stats = g.b * g.h * g.w * g.heads;
        let (mut dq, mut dk, mut dv) = (vec![0f32; len], vec![0f32; len], vec![0f32; len]);
        let (mut lse, mut big_d) = (vec![0f32; stats], vec![0f32; stats]);
        let (rows, cols) = (attending(g.h, g.kernel), attending(g.w, g.kernel));
        with_f32(&[q, k, v, grad], |t| {
            let [q, k, v, go] = operands([t[0], t[1], t[2], t[3]], self.round);
            let x = Inputs {
                q: &q,
                k: &k,
                v: &v,
                g,
                scale: self.scale as f32,
            };
            let (dqs, lses, ds) = (
                Blocks::new(&mut dq),
                Blocks::new(&mut lse),
                Blocks::new(&mut big_d),
            );
            let stat_row = g.w * g.heads;
            on_threads(g.b * g.h, 2 * g.kernel * g.kernel, |unit, scratch| {
                // SAFETY: row `unit` of dq and of the statistics, written by this thread only.
                let (dq, lse, big_d) = unsafe {
                    (
                        dqs.block(unit * row, row),
                        lses.block(unit * stat_row, stat_row),
                        ds.block(unit * stat_row, stat_row),
                    )
                };
                query_row_backward(&x, &go, unit / g.h, unit % g.h, dq, lse, big_d, scratch);
            });
            let (dks, dvs) = (Blocks::new(&mut dk), Blocks::new(&mut dv));
            let (lse, big_d) = (&lse[..], &big_d[..]);
            on_threads(g.b * g.h, 0, |unit, _| {
                // SAFETY: row `unit` of dk and dv, written by this thread only.
                let (dk, dv) = unsafe { (dks.block(unit * row, row), dvs.block(unit * row, row)) };
                key_row_backward(
                    &x,
                    &go,
                    lse,
                    big_d,
                    &rows,
                    &cols,
                    unit / g.h,
                    unit % g.h,
                    dk,
                    dv,
                );
            });
            Ok(())
        })?;
        let [dq, dk, dv] = gradients([dq, dk, dv], self.round, &shape, grad.device())?;
        Ok((dq, dk, dv))
    }
}

/// The same attention in Candle ops: each query's k×k keys and values gathered into a window
/// axis, then a softmax over it (k² times the memory of k and v; Candle's backward).
fn by_gathering(q: &Tensor, k: &Tensor, v: &Tensor, g: Geometry, scale: f64) -> Result<Tensor> {
    let kk = g.kernel * g.kernel;
    let windows = |n: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..n)
            .flat_map(|i| {
                let s = window_start(i, n, g.kernel);
                (s..s + g.kernel).map(|x| x as u32)
            })
            .collect();
        Tensor::from_vec(idx, n * g.kernel, q.device())
    };
    let (rows, cols) = (windows(g.h)?, windows(g.w)?);
    // (B, H, W, heads·d) → (B, H, W, k·k, heads, d): row window, then column window.
    let gather = |t: &Tensor| -> Result<Tensor> {
        let t = t.index_select(&rows, 1)?; // (B, H·k, W, C)
        let t = t.index_select(&cols, 2)?; // (B, H·k, W·k, C)
        t.reshape((g.b, g.h, g.kernel, g.w, g.kernel, g.width()))?
            .permute((0, 1, 3, 2, 4, 5))?
            .reshape((g.b, g.h, g.w, kk, g.heads, g.d))
    };
    let (kw, vw) = (gather(k)?, gather(v)?);
    let q = q.reshape((g.b, g.h, g.w, 1, g.heads, g.d))?;
    // Scores (B, H, W, heads, k·k), softmax over the window.
    let scores = (q.broadcast_mul(&kw)?.sum(5)? * scale)?.permute((0, 1, 2, 4, 3))?;
    let p = crate::ops::attention::softmax_last(&scores.contiguous()?)?;
    let p = p.permute((0, 1, 2, 4, 3))?.unsqueeze(5)?; // (B, H, W, k·k, heads, 1)
    p.broadcast_mul(&vw)?
        .sum(3)?
        .reshape((g.b, g.h, g.w, g.width()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_shift_inward_at_the_borders() {
        // n = 9, k = 7: queries 0..=3 see keys 0..7, then 1..8 at 4, 2..9 from 5 on.
        let starts: Vec<usize> = (0..9).map(|i| window_start(i, 9, 7)).collect();
        assert_eq!(starts, [0, 0, 0, 0, 1, 2, 2, 2, 2]);
        // Key 0 is seen by queries 0..4; key 4 by all; key 8 by 5..9.
        let by = attending(9, 7);
        assert_eq!(
            (by[0].clone(), by[4].clone(), by[8].clone()),
            (0..4, 0..9, 5..9)
        );
        // Every (query, key) pair agrees between the two views.
        for (a, range) in by.iter().enumerate() {
            for i in 0..9 {
                let s = window_start(i, 9, 7);
                assert_eq!(range.contains(&i), (s..s + 7).contains(&a));
            }
        }
    }
}
