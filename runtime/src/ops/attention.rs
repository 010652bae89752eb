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

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D,
};

use crate::ops::cpu::{exp_f32, on_threads, vectorised, with_f32, Blocks};
use crate::ops::linear::{gemm, gemm_strided};
use crate::ops::precision::{gradients, operands, round_in_place, storage_operands};

/// softmax(q·kᵀ/√d)·v per head for q, k, v of shape (B, N, H·d): the heads side by side in the
/// last axis, as the projections write them (the op reads and writes each head in place, with a
/// row stride of H·d, so no head split or merge is copied). Returns (B, N, H·d).
///
/// Under autocast q, k, v and the output are rounded to the 16-bit type: by the op itself on the
/// CPU; on a GPU inside the two 16-bit products, with the softmax in f32 between them, as flash
/// attention's does (precision.rs).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let d = q.dim(2)? / heads;
    scaled_attention(q, k, v, heads, 1.0 / (d as f64).sqrt())
}

/// [`attention`] with the scores scaled by `scale` instead of 1/√d (1 for cosine-similarity
/// attention, whose q and k carry their own scale).
pub fn scaled_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, n, width) = q.dims3()?;
    let d = width / heads;
    if q.device().is_cpu() && q.dtype() == DType::F32 {
        let round = crate::ops::precision::autocast_dtype();
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
    if cfg!(feature = "cuda") && q.device().is_cuda() && q.dtype() == DType::F32 {
        let op = ByProducts {
            scale,
            heads,
            low: crate::ops::precision::autocast_dtype(),
            chunk_scores: CHUNK_SCORES,
        };
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    let split = |t: &Tensor| t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous();
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let scores = (crate::ops::precision::matmul(&q, &k.t()?)? * scale)?;
    crate::ops::precision::matmul(&softmax_last(&scores)?, &v)?
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

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((s.softmax_rows(l)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((s.softmax_rows(l)?, l.shape().clone()))
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
        Ok((ps.softmax_rows_backward(pl, gs, gl)?, pl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((ps.softmax_rows_backward(pl, gs, gl)?, pl.shape().clone()))
    }
}

/// A device's storage with the row softmax both ways (over the last axis, f32): what
/// [`ByProducts`] needs beyond Candle's own storage ops.
trait RowSoftmax: BackendStorage<Device: BackendDevice<Storage = Self>> {
    fn softmax_rows(&self, l: &Layout) -> Result<Self>;
    /// ∂L/∂s from the probabilities (`self`) and ∂L/∂p.
    fn softmax_rows_backward(&self, pl: &Layout, g: &Self, gl: &Layout) -> Result<Self>;
    /// This device's storage of a tensor.
    fn of(s: &Storage) -> Result<&Self>;
}

impl RowSoftmax for CpuStorage {
    fn softmax_rows(&self, l: &Layout) -> Result<Self> {
        let n = row_len(l);
        let mut p = crate::ops::cpu::contiguous::<f32>(self, l)?.to_vec();
        crate::ops::cpu::on_row_chunks(&mut p, n, |_, rows| softmax_rows(rows, n));
        Ok(CpuStorage::F32(p))
    }

    fn softmax_rows_backward(&self, pl: &Layout, g: &Self, gl: &Layout) -> Result<Self> {
        let n = row_len(pl);
        let p = crate::ops::cpu::contiguous::<f32>(self, pl)?;
        let mut ds = crate::ops::cpu::contiguous::<f32>(g, gl)?.to_vec();
        crate::ops::cpu::on_row_chunks(&mut ds, n, |start, rows| {
            softmax_backward_rows(&p[start..start + rows.len()], rows, n)
        });
        Ok(CpuStorage::F32(ds))
    }

    fn of(s: &Storage) -> Result<&Self> {
        match s {
            Storage::Cpu(c) => Ok(c),
            _ => candle_core::bail!("attention: a gradient on another device than its inputs"),
        }
    }
}

#[cfg(feature = "cuda")]
impl RowSoftmax for candle_core::CudaStorage {
    fn softmax_rows(&self, l: &Layout) -> Result<Self> {
        crate::ops::cuda::softmax_rows_forward(self, l, row_len(l))
    }

    fn softmax_rows_backward(&self, pl: &Layout, g: &Self, gl: &Layout) -> Result<Self> {
        crate::ops::cuda::softmax_rows_backward((self, pl), (g, gl), row_len(pl))
    }

    fn of(s: &Storage) -> Result<&Self> {
        match s {
            Storage::Cuda(c) => Ok(c),
            _ => candle_core::bail!("attention: a gradient on another device than its inputs"),
        }
    }
}

/// Attention on a GPU: per (batch, head) S = q·kᵀ·scale and O = P·v as batched GEMMs (cuBLAS;
/// 16-bit under autocast, with S and O rounded and P cast on the way in, as autocast's products
/// do) around dit.cu's row softmax in f32, as one op whose backward recomputes S and P. The
/// graph keeps q, k, v and the output, never the B·H·N² scores: at the DiT baseline's 1024
/// tokens, 16 heads and batch 32 those are 2 GiB per tensor per layer, and attention written as
/// ops kept three of them. The scores exist for a chunk of (batch, head) pairs at a time
/// ([`CHUNK_SCORES`]). Generic over the storage, so the tests run this code on the CPU.
///   dv = Pᵀ·dO,  dP = dO·vᵀ,  dS = P ∘ (dP − rowsum(P ∘ dP))·scale,  dq = dS·k,  dk = dSᵀ·q
#[derive(Clone, Copy)]
struct ByProducts {
    scale: f64,
    heads: usize,
    /// Autocast's 16-bit type for the products.
    low: Option<DType>,
    /// At most this many scores (f32) at a time: [`CHUNK_SCORES`] (the tests take fewer).
    chunk_scores: usize,
}

/// The backward of [`ByProducts`]: (q, k, v) → ∂L/∂q, ∂L/∂k, ∂L/∂v packed as (3, B, N, H·d).
struct ByProductsBackward {
    forward: ByProducts,
    /// ∂L/∂O.
    grad: Tensor,
}

/// The scores (f32) [`ByProducts`] holds at a time: 256 MiB.
const CHUNK_SCORES: usize = 1 << 26;

/// A storage and the layout it is read through.
type Viewed<S> = (S, Layout);

impl ByProducts {
    /// (B, N, H·d) → (B·H, N, d), contiguous, in the products' type.
    fn split<S: RowSoftmax>(&self, (s, l): (&S, &Layout), g: Geometry) -> Result<Viewed<S>> {
        let Some((start, _)) = l.contiguous_offsets() else {
            candle_core::bail!("attention needs contiguous inputs");
        };
        let b = g.pairs / g.heads;
        let heads_first = Layout::new(
            Shape::from((b, g.heads, g.n, g.d)),
            vec![g.n * g.width, g.d, g.width, 1],
            start,
        );
        let split = match self.low {
            Some(low) => s.to_dtype(&heads_first, low)?,
            None => {
                // SAFETY: every element is written by the copy below.
                let mut dst = unsafe { s.device().alloc_uninit(heads_first.shape(), DType::F32)? };
                s.copy_strided_src(&mut dst, 0, &heads_first)?;
                dst
            }
        };
        Ok((split, Layout::contiguous((g.pairs, g.n, g.d))))
    }

    /// `parts` of (B·H, N, d) each, merged to (B, N, H·d) and packed one after another.
    fn merge<S: RowSoftmax>(&self, parts: &[&S], g: Geometry) -> Result<S> {
        let len = g.pairs * g.n * g.d;
        let b = g.pairs / g.heads;
        let tokens_first = Layout::new(
            Shape::from((b, g.n, g.heads, g.d)),
            vec![g.heads * g.n * g.d, g.d, g.n * g.d, 1],
            0,
        );
        let Some(first) = parts.first() else {
            candle_core::bail!("attention: nothing to merge");
        };
        // SAFETY: every element is written by the copies below.
        let mut dst = unsafe {
            first
                .device()
                .alloc_uninit(&Shape::from(parts.len() * len), DType::F32)?
        };
        for (i, part) in parts.iter().enumerate() {
            part.copy_strided_src(&mut dst, i * len, &tokens_first)?;
        }
        Ok(dst)
    }

    /// An operand of a product: `t` cast to the 16-bit type under autocast, else itself.
    fn operand<S: RowSoftmax>(&self, t: &S, l: &Layout) -> Result<Option<S>> {
        self.low.map(|low| t.to_dtype(l, low)).transpose()
    }

    /// a·b for (pairs, m, k)·(pairs, k, n) views, as f32 (pairs, m, n).
    fn product<S: RowSoftmax>(&self, a: (&S, &Layout), b: (&S, &Layout)) -> Result<S> {
        let (&[pairs, m, k], &[_, _, n]) = (a.1.dims(), b.1.dims()) else {
            candle_core::bail!(
                "attention: products of {:?} and {:?}",
                a.1.dims(),
                b.1.dims()
            );
        };
        let y = a.0.matmul(b.0, (pairs, m, n, k), a.1, b.1)?;
        match self.low {
            Some(_) => y.to_dtype(&Layout::contiguous((pairs, m, n)), DType::F32),
            None => Ok(y),
        }
    }

    /// Pairs `start..start + count` of a (pairs, N, x) tensor.
    fn pairs(l: &Layout, start: usize, count: usize) -> Layout {
        let &[_, n, x] = l.dims() else {
            unreachable!("split tensors are (pairs, N, x)")
        };
        Layout::new(
            Shape::from((count, n, x)),
            l.stride().to_vec(),
            l.start_offset() + start * n * x,
        )
    }

    /// The (pairs, N, N) probabilities of pairs `start..start + count`, and their layout.
    fn probabilities<S: RowSoftmax>(
        &self,
        (q, ql): (&S, &Layout),
        (k, kl): (&S, &Layout),
        (start, count): (usize, usize),
        n: usize,
    ) -> Result<Viewed<S>> {
        let (ql, kl) = (Self::pairs(ql, start, count), Self::pairs(kl, start, count));
        let scores = self.product((q, &ql), (k, &kl.transpose(1, 2)?))?;
        let sl = Layout::contiguous((count, n, n));
        let scores = scores.affine(&sl, self.scale, 0.0)?;
        Ok((scores.softmax_rows(&sl)?, sl))
    }

    /// (start, count) runs of pairs whose scores fit in `chunk_scores`.
    fn chunks(&self, g: Geometry) -> impl Iterator<Item = (usize, usize)> {
        let per = (self.chunk_scores / (g.n * g.n).max(1)).max(1);
        (0..g.pairs)
            .step_by(per)
            .map(move |s| (s, per.min(g.pairs - s)))
    }

    /// `chunk` (count, N, x), written into `whole` (pairs, N, x) at pair `start`.
    fn place<S: RowSoftmax>(chunk: &S, whole: &mut S, start: usize, l: &Layout) -> Result<()> {
        let &[count, n, x] = l.dims() else {
            unreachable!("chunks are (count, N, x)")
        };
        chunk.copy_strided_src(whole, start * n * x, &Layout::contiguous((count, n, x)))
    }

    fn forward<S: RowSoftmax>(
        &self,
        q: (&S, &Layout),
        k: (&S, &Layout),
        v: (&S, &Layout),
    ) -> Result<(S, Shape)> {
        let g = Geometry::of(q.1, self.heads)?;
        if k.1.dims() != q.1.dims() || v.1.dims() != q.1.dims() {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} differ",
                q.1.dims(),
                k.1.dims(),
                v.1.dims()
            );
        }
        let (q, k, v) = (self.split(q, g)?, self.split(k, g)?, self.split(v, g)?);
        let hl = Layout::contiguous((g.pairs, g.n, g.d));
        // SAFETY: every pair is written by one chunk below.
        let mut o = unsafe { q.0.device().alloc_uninit(hl.shape(), DType::F32)? };
        for (start, count) in self.chunks(g) {
            let (p, pl) = self.probabilities((&q.0, &q.1), (&k.0, &k.1), (start, count), g.n)?;
            let p = self.operand(&p, &pl)?.unwrap_or(p);
            let o_chunk = self.product((&p, &pl), (&v.0, &Self::pairs(&v.1, start, count)))?;
            Self::place(&o_chunk, &mut o, start, &Self::pairs(&hl, start, count))?;
        }
        Ok((
            self.merge(&[&o], g)?,
            Shape::from((g.pairs / g.heads, g.n, g.width)),
        ))
    }

    fn backward<S: RowSoftmax>(
        &self,
        q: (&S, &Layout),
        k: (&S, &Layout),
        v: (&S, &Layout),
        dout: (&S, &Layout),
    ) -> Result<(S, Shape)> {
        let g = Geometry::of(q.1, self.heads)?;
        let (q, k, v) = (self.split(q, g)?, self.split(k, g)?, self.split(v, g)?);
        let dout = self.split(dout, g)?;
        let hl = Layout::contiguous((g.pairs, g.n, g.d));
        // SAFETY: every pair of each is written by one chunk below.
        let alloc = || unsafe { q.0.device().alloc_uninit(hl.shape(), DType::F32) };
        let (mut dq, mut dk, mut dv) = (alloc()?, alloc()?, alloc()?);
        for (start, count) in self.chunks(g) {
            let at = |l: &Layout| Self::pairs(l, start, count);
            let (p, pl) = self.probabilities((&q.0, &q.1), (&k.0, &k.1), (start, count), g.n)?;
            let dp = self.product((&dout.0, &at(&dout.1)), (&v.0, &at(&v.1).transpose(1, 2)?))?;
            let ds = p.softmax_rows_backward(&pl, &dp, &pl)?;
            drop(dp);
            let p = self.operand(&p, &pl)?.unwrap_or(p);
            let dv_chunk = self.product((&p, &pl.transpose(1, 2)?), (&dout.0, &at(&dout.1)))?;
            drop(p);
            Self::place(&dv_chunk, &mut dv, start, &at(&hl))?;
            let ds = ds.affine(&pl, self.scale, 0.0)?;
            let ds = self.operand(&ds, &pl)?.unwrap_or(ds);
            let dq_chunk = self.product((&ds, &pl), (&k.0, &at(&k.1)))?;
            Self::place(&dq_chunk, &mut dq, start, &at(&hl))?;
            let dk_chunk = self.product((&ds, &pl.transpose(1, 2)?), (&q.0, &at(&q.1)))?;
            Self::place(&dk_chunk, &mut dk, start, &at(&hl))?;
        }
        let packed = self.merge(&[&dq, &dk, &dv], g)?;
        Ok((packed, Shape::from((3, g.pairs / g.heads, g.n, g.width))))
    }
}

impl CustomOp3 for ByProducts {
    fn name(&self) -> &'static str {
        "attention-by-products"
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
        self.forward((qs, ql), (ks, kl), (vs, vl))
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
        self.forward((qs, ql), (ks, kl), (vs, vl))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let backward = ByProductsBackward {
            forward: *self,
            grad: grad.contiguous()?,
        };
        let packed = q.apply_op3_no_bwd(k, v, &backward)?;
        Ok((
            Some(packed.get(0)?),
            Some(packed.get(1)?),
            Some(packed.get(2)?),
        ))
    }
}

impl ByProductsBackward {
    fn run<S: RowSoftmax>(
        &self,
        q: (&S, &Layout),
        k: (&S, &Layout),
        v: (&S, &Layout),
    ) -> Result<(S, Shape)> {
        let (grad, grad_l) = self.grad.storage_and_layout();
        self.forward.backward(q, k, v, (S::of(&grad)?, grad_l))
    }
}

impl CustomOp3 for ByProductsBackward {
    fn name(&self) -> &'static str {
        "attention-by-products-backward"
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
        self.run((qs, ql), (ks, kl), (vs, vl))
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
        self.run((qs, ql), (ks, kl), (vs, vl))
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
        let [q, k, v] = storage_operands([(qs, ql), (ks, kl), (vs, vl)], self.round)?;
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
        let [dq, dk, dv] = gradients([dq, dk, dv], self.round, &shape, grad.device())?;
        Ok((dq, dk, dv))
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

    /// The GPU's attention op (batched products around the row softmax, S and P recomputed in
    /// the backward, chunk by chunk of (batch, head) pairs), run on the CPU, against attention
    /// written as products around the softmax (what it replaces on the GPU), whole, in uneven
    /// chunks and one pair at a time: output and gradients within 1e-5 of the largest value in
    /// f32, and within a 16-bit ulp of it under bf16 and fp16, where both round the same values.
    #[test]
    fn attention_by_products_equals_the_composite() -> Result<()> {
        use crate::ops::precision::{matmul, Autocast};
        let dev = Device::Cpu;
        let mk = || Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 37, 24), &dev)?);
        let (q, k, v) = (mk()?, mk()?, mk()?);
        let r = Tensor::randn(0f32, 1.0, (2, 37, 24), &dev)?;
        let scale = 1.0 / 8f64.sqrt();
        let split = |t: &Var| {
            t.as_tensor()
                .reshape((2, 37, 3, 8))?
                .transpose(1, 2)?
                .contiguous()
        };
        let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
            let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            Ok(d / b.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        for (low, tolerance) in [
            (None, 1e-5),
            (Some(DType::BF16), 2f32.powi(-8)),
            (Some(DType::F16), 2f32.powi(-11)),
        ] {
            let want = {
                let _amp = Autocast::enter(low);
                let scores = (matmul(&split(&q)?, &split(&k)?.t()?)? * scale)?;
                matmul(&softmax_last(&scores)?, &split(&v)?)?
                    .transpose(1, 2)?
                    .reshape((2, 37, 24))?
            };
            let want_grads = (&want * &r)?.sum_all()?.backward()?;
            for chunk_scores in [CHUNK_SCORES, 4 * 37 * 37, 1] {
                let op = ByProducts {
                    scale,
                    heads: 3,
                    low,
                    chunk_scores,
                };
                let got = q.as_tensor().apply_op3(k.as_tensor(), v.as_tensor(), op)?;
                let grads = (&got * &r)?.sum_all()?.backward()?;
                let mut errors = vec![("output", rel(&got, &want)?)];
                for (name, var) in [("∂q", &q), ("∂k", &k), ("∂v", &v)] {
                    let e = rel(grads.get(var).unwrap(), want_grads.get(var).unwrap())?;
                    errors.push((name, e));
                }
                assert!(
                    errors.iter().all(|(_, e)| *e <= tolerance),
                    "{low:?}, chunks of {chunk_scores} scores: {errors:?}"
                );
            }
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
