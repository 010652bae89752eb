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

/// Defines `fn $name(args)` that runs `$body` compiled for the widest vector unit the CPU has:
/// AVX-512, else AVX2 + FMA (checked at run time), else the baseline. The loops inside
/// auto-vectorise to it; the arithmetic and its order are the same on every path (no fast-math),
/// so the results are too.
macro_rules! vectorised {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has these features (checked above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use vectorised;

/// Runs `f` on the values of CPU f32 tensors, read in place (copied only where a tensor is not
/// contiguous): the backward of a fused op reads its saved inputs without a host copy.
pub(crate) fn with_f32<R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<R> {
    let tensors: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<_>>()?;
    let storages: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let slices = storages
        .iter()
        .map(|(s, l)| match &**s {
            candle_core::Storage::Cpu(c) => contiguous::<f32>(c, l),
            _ => candle_core::bail!("a fused CPU op got a tensor on another device"),
        })
        .collect::<Result<Vec<_>>>()?;
    f(&slices)
}

/// A contiguous CPU tensor's values.
pub(crate) fn contiguous<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> Result<&'a [T]> {
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
    let threads = candle_core::utils::get_num_threads().max(1);
    let per = batch.div_ceil(threads).max(1);
    rayon::scope(|scope| {
        for (c, chunk) in out.chunks_mut(per * n).enumerate() {
            let f = &f;
            scope.spawn(move |_| {
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
        // Per channel: y = x·scale + shift.
        for (c, (yc, xc)) in y.chunks_mut(hw).zip(xs.chunks(hw)).enumerate() {
            let scale = rstd * w[c].into();
            let shift = b[c].into() - mean * scale;
            for (y, &v) in yc.iter_mut().zip(xc) {
                *y = T::of(v.into() * scale + shift);
            }
        }
    })
}

/// With g' = g·w[c]: dx = rstd · (g' − mean(g') − x̂ · mean(g'·x̂)); per channel Σ g·x̂ and Σ g.
/// Returns the packed [dx | Σ g·x̂ (B·C) | Σ g (B·C)] the GPU kernel writes. Loops run per
/// channel (no index division per element); samples are split across threads.
fn backward_cpu<T: Real>(x: &[T], w: &[T], g: &[T], batch: usize, n: usize) -> Vec<T> {
    let c = w.len();
    let hw = n / c;
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
                    let (mean, rstd) = moments(xs);
                    // Per channel Σ g and Σ g·x: everything else follows from them.
                    for ch in 0..c {
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
                    for ch in 0..c {
                        let wc: f64 = w[ch].into();
                        gm += wc * sum[c + ch].into();
                        gxm += wc * sum[ch].into();
                    }
                    let (gm, gxm) = (gm / n as f64, gxm / n as f64);
                    for ch in 0..c {
                        // dx = rstd·(g·w − gm − x̂·gxm) = g·a + x·b + d per channel.
                        let a = rstd * w[ch].into();
                        let bx = -rstd * gxm * rstd;
                        let d = -rstd * gm + rstd * gxm * rstd * mean;
                        let (xc, gc) = (&xs[ch * hw..(ch + 1) * hw], &gs[ch * hw..(ch + 1) * hw]);
                        for ((o, &xv), &gv) in dx[ch * hw..(ch + 1) * hw].iter_mut().zip(xc).zip(gc)
                        {
                            *o = T::of(gv.into() * a + xv.into() * bx + d);
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
        let y = crate::cuda::group_norm((xs, xl), (ws, wl), (bs, bl), (batch, c, n), false)?;
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
        let out = crate::cuda::group_norm((xs, xl), (ws, wl), (gs, gl), (batch, c, n), true)?;
        Ok((out, Shape::from(batch * n + 2 * batch * c)))
    }
}

/// Inverted dropout: each element kept with probability 1 − p (and scaled by 1/(1 − p)) by the
/// mask of `seed`; differentiable.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Dropout::new(p, seed))
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
        let y = par_map(x.len(), |start, out: &mut [f32]| {
            for (j, o) in out.iter_mut().enumerate() {
                *o = self.apply(start + j, x[start + j]);
            }
        });
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

/// Run `work(i, scratch)` for every i in 0..count on Candle's threads (i spread round-robin),
/// each thread with its own scratch buffer of `scratch` floats.
pub(crate) fn on_threads(count: usize, scratch: usize, work: impl Fn(usize, &mut [f32]) + Sync) {
    let threads = candle_core::utils::get_num_threads().clamp(1, count.max(1));
    rayon::scope(|s| {
        for t in 0..threads {
            let work = &work;
            s.spawn(move |_| {
                let mut buf = vec![0f32; scratch];
                for i in (t..count).step_by(threads) {
                    work(i, &mut buf);
                }
            });
        }
    });
}

/// An f32 output buffer whose disjoint blocks are written from several threads (each thread
/// writes only the blocks of the items `on_threads` gave it).
#[derive(Clone, Copy)]
pub(crate) struct Blocks(*mut f32);
// SAFETY: threads write disjoint blocks (the callers' contract, see `block`).
unsafe impl Send for Blocks {}
unsafe impl Sync for Blocks {}

impl Blocks {
    pub(crate) fn new(buf: &mut [f32]) -> Self {
        Blocks(buf.as_mut_ptr())
    }

    /// The `len` floats at `start`.
    ///
    /// # Safety
    /// In bounds of the buffer, and no other thread uses an overlapping block at the same time.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn block(&self, start: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }

    /// A raw pointer to the float at `start`, for strided blocks (interleaved with other
    /// threads' blocks, so no slice may cover them).
    pub(crate) fn at(&self, start: usize) -> *mut f32 {
        self.0.wrapping_add(start)
    }
}

/// An elementwise pass over `len` outputs on Candle's thread count: `fill(start, chunk)` writes
/// the outputs `start..start + chunk.len()`.
fn par_map<T: Default + Clone + Send>(len: usize, fill: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    let mut out = vec![T::default(); len];
    let threads = candle_core::utils::get_num_threads().clamp(1, len.div_ceil(1 << 16).max(1));
    let chunk = len.div_ceil(threads).max(1);
    rayon::scope(|scope| {
        for (k, part) in out.chunks_mut(chunk).enumerate() {
            let fill = &fill;
            scope.spawn(move |_| fill(k * chunk, part));
        }
    });
    out
}

/// GELU (erf form), `0.5·x·(1 + erf(x/√2))`, with a one-pass backward
/// `g·(Φ(x) + x·φ(x))`: on the GPU runtime/kernels/gelu.cu, on the CPU the loops below (Candle's
/// `gelu_erf` backward is ten elementwise ops, each a full-size tensor).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F32 | DType::F64 => x.contiguous()?.apply_op1(Gelu { tanh: false }),
        _ => x.gelu_erf(),
    }
}

/// GELU's tanh approximation (PyTorch's `approximate="tanh"`, diffusers' "gelu-approximate"),
/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, one pass each way on the CPU (Candle's own is a
/// chain of library `tanh`/`powf` calls and its backward a dozen tensors).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    match (x.device().is_cpu(), x.dtype()) {
        (true, DType::F32 | DType::F64) => x.contiguous()?.apply_op1(Gelu { tanh: true }),
        // The GPU's kernel takes a bias: zero here, and no rounding.
        (false, DType::F32) => {
            let zero = Tensor::zeros(1, DType::F32, x.device())?;
            x.contiguous()?
                .apply_op2(&zero, BiasGeluTanh { round: None })
        }
        _ => x.gelu(),
    }
}

/// GELU-tanh of `x + bias` (the bias along the last axis): a linear layer's bias add moved into
/// the activation after it (nn::Linear::forward_gelu_tanh), one pass each way on a GPU
/// (dit.cu) and on the CPU. Under autocast the sum is rounded to the 16-bit type, and so is the
/// bias before it, as the 16-bit product's own bias add would round them; the bias gradient is
/// the rounded sum of the rounded ∂L/∂z, as the product op's (precision.rs).
pub fn bias_gelu_tanh(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let round = crate::precision::autocast_dtype();
    if fused_f32(x) {
        return x
            .contiguous()?
            .apply_op2(&bias.contiguous()?, BiasGeluTanh { round });
    }
    let rounded = |t: &Tensor| crate::precision::round_tensor(t, round);
    gelu_tanh(&rounded(&x.broadcast_add(&rounded(bias)?)?)?)
}

/// GELU-tanh of z = x + bias, `round`ed to autocast's 16-bit type (see [`bias_gelu_tanh`]).
struct BiasGeluTanh {
    round: Option<DType>,
}

/// (x, bias, ∂L/∂y) → ∂L/∂z.
struct BiasGeluTanhBackward {
    round: Option<DType>,
}

impl BiasGeluTanh {
    /// z on the CPU.
    fn z(&self, xs: &CpuStorage, xl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<Vec<f32>> {
        let (x, bias) = (contiguous::<f32>(xs, xl)?, contiguous::<f32>(bs, bl)?);
        let bias = crate::precision::operand(bias, self.round);
        let mut z: Vec<f32> = x
            .chunks(bias.len())
            .flat_map(|row| row.iter().zip(bias.iter()).map(|(x, b)| x + b))
            .collect();
        crate::precision::round_in_place(&mut z, self.round);
        Ok(z)
    }
}

impl CustomOp2 for BiasGeluTanh {
    fn name(&self) -> &'static str {
        "bias-gelu-tanh"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let z = self.z(xs, xl, bs, bl)?;
        Ok((
            CpuStorage::F32(gelu_f32(&z, None, true)),
            xl.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda::gelu_tanh((xs, xl), (bs, bl), None, self.round)?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let backward = BiasGeluTanhBackward { round: self.round };
        let dz = x.apply_op3_no_bwd(bias, &dy.contiguous()?, &backward)?;
        let dbias = crate::precision::bias_grad(bias, &dz, self.round)?;
        Ok((Some(dz), Some(dbias)))
    }
}

impl candle_core::CustomOp3 for BiasGeluTanhBackward {
    fn name(&self) -> &'static str {
        "bias-gelu-tanh-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let z = BiasGeluTanh { round: self.round }.z(xs, xl, bs, bl)?;
        let g = contiguous::<f32>(gs, gl)?;
        let dz = gelu_f32(&z, Some(g), true);
        Ok((CpuStorage::F32(dz), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dz = crate::cuda::gelu_tanh((xs, xl), (bs, bl), Some((gs, gl)), self.round)?;
        Ok((dz, xl.shape().clone()))
    }
}

/// (a, b) with GELU(x) = x·a and GELU'(x) = a + x·b: (Φ(x), φ(x)) for the erf form, and for the
/// tanh form a = (1 + t)/2, b = (1 − t²)/2·c·(1 + 3k·x²), t = tanh(c·(x + k·x³)).
fn gelu_parts(x: f64, tanh: bool) -> (f64, f64) {
    if tanh {
        let (c, k) = ((2.0 / std::f64::consts::PI).sqrt(), 0.044715);
        let t = (c * (x + k * x * x * x)).tanh();
        return (
            0.5 * (1.0 + t),
            0.5 * (1.0 - t * t) * c * (1.0 + 3.0 * k * x * x),
        );
    }
    (
        0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2)),
        (-0.5 * x * x).exp()
            * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2),
    )
}

/// e^x for f32 without a library call, so loops over it vectorise: Cephes' `expf` (range
/// reduction by ln 2 in two parts, a degree-6 polynomial; ≈ 2 ulp), inputs clamped to the
/// normal range.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    // n = round(x / ln 2), by the 1.5·2^23 trick (exact for |n| < 2^22): adding 1.5·2^23 puts n
    // in the low bits of the mantissa, so n as an integer is a subtraction of bit patterns (an
    // `as i32` cast saturates, which does not vectorise: one scalar conversion per lane).
    let shifted = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = shifted - 12_582_912.0;
    let n_int = shifted.to_bits() as i32 - 12_582_912f32.to_bits() as i32;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// Φ(x) and φ(x) in f32, vectorisable: erf by Abramowitz & Stegun 7.1.26 (absolute error
/// ≤ 1.5e-7, the formula PyTorch's vectorised CPU erf uses), with exp(−x²/2) computed once
/// (exp(−x²) is its square).
#[inline(always)]
fn gelu_parts_f32(x: f32) -> (f32, f32) {
    let z = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let half_gauss = exp_f32(-0.5 * x * x); // exp(−x²/2) = exp(−z²)
    let erf = (1.0 - poly * half_gauss).copysign(x);
    (
        0.5 * (1.0 + erf),
        half_gauss * (0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2),
    )
}

/// The tanh form's (a, b) (see `gelu_parts`) in f32, vectorisable: tanh(u) = 1 − 2/(e^{2u} + 1).
#[inline(always)]
fn gelu_tanh_parts_f32(x: f32) -> (f32, f32) {
    const C: f32 = 0.797_884_6; // √(2/π)
    const K: f32 = 0.044_715;
    let t = 1.0 - 2.0 / (exp_f32(2.0 * C * (x + K * x * x * x)) + 1.0);
    (
        0.5 * (1.0 + t),
        0.5 * (1.0 - t * t) * C * (1.0 + 3.0 * K * x * x),
    )
}

#[inline(always)]
fn parts_f32(x: f32, tanh: bool) -> (f32, f32) {
    if tanh {
        gelu_tanh_parts_f32(x)
    } else {
        gelu_parts_f32(x)
    }
}

vectorised! {
    /// The f32 GELU loops (forward without `g`, backward with it).
    fn gelu_loop_f32(x: &[f32], g: Option<&[f32]>, out: &mut [f32], tanh: bool) {
        match g {
            None => {
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = v * parts_f32(v, tanh).0;
                }
            }
            Some(g) => {
                for ((o, &v), &d) in out.iter_mut().zip(x).zip(g) {
                    let (a, b) = parts_f32(v, tanh);
                    *o = d * (a + v * b);
                }
            }
        }
    }
}

/// GELU of `x` in f32 on the CPU's threads, or with `g` = ∂L/∂y its backward ∂L/∂x.
fn gelu_f32(x: &[f32], g: Option<&[f32]>, tanh: bool) -> Vec<f32> {
    par_map(x.len(), |start, out: &mut [f32]| {
        let end = start + out.len();
        gelu_loop_f32(&x[start..end], g.map(|g| &g[start..end]), out, tanh)
    })
}

/// GELU in its erf form or (`tanh`) its tanh approximation.
struct Gelu {
    tanh: bool,
}

/// (x, ∂L/∂y) → ∂L/∂x.
struct GeluBackward {
    tanh: bool,
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(gelu_f32(contiguous::<f32>(s, l)?, None, self.tanh))
            }
            CpuStorage::F64(_) => {
                let x = contiguous::<f64>(s, l)?;
                CpuStorage::F64(par_map(x.len(), |start, out: &mut [f64]| {
                    for (o, &v) in out.iter_mut().zip(&x[start..]) {
                        *o = v * gelu_parts(v, self.tanh).0;
                    }
                }))
            }
            _ => candle_core::bail!("gelu runs in f32 or f64"),
        };
        Ok((y, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if self.tanh {
            candle_core::bail!("on a GPU GELU-tanh runs as bias_gelu_tanh's kernel");
        }
        Ok((crate::cuda::gelu_forward(s, l)?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &GeluBackward { tanh: self.tanh },
        )?))
    }
}

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dx = match (xs, gs) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (x, g) = (contiguous::<f32>(xs, xl)?, contiguous::<f32>(gs, gl)?);
                CpuStorage::F32(gelu_f32(x, Some(g), self.tanh))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (x, g) = (contiguous::<f64>(xs, xl)?, contiguous::<f64>(gs, gl)?);
                CpuStorage::F64(par_map(x.len(), |start, out: &mut [f64]| {
                    for ((o, &v), &d) in out.iter_mut().zip(&x[start..]).zip(&g[start..]) {
                        let (a, b) = gelu_parts(v, self.tanh);
                        *o = d * (a + v * b);
                    }
                }))
            }
            _ => candle_core::bail!("gelu's backward runs in f32 or f64, both inputs alike"),
        };
        Ok((dx, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if self.tanh {
            candle_core::bail!("on a GPU GELU-tanh runs as bias_gelu_tanh's kernel");
        }
        Ok((
            crate::cuda::gelu_backward(xs, xl, gs, gl)?,
            xl.shape().clone(),
        ))
    }
}

/// Whether `x` runs the fused f32 ops of this module: on the CPU and on a GPU.
fn fused_f32(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && (x.device().is_cpu() || x.device().is_cuda())
}

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
        let (activated, shape) = Gelu { tanh: false }.cpu_fwd(s, l)?;
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
        let dx = gelu_f32(contiguous::<f32>(xs, xl)?, Some(d), false);
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
            let (a, shape) = Gelu { tanh: false }.cpu_fwd(xs, xl)?;
            GroupNorm.cpu_fwd(&a, &Layout::contiguous(shape), ws, wl, bs, bl)?
        } else {
            GroupNorm.cpu_fwd(xs, xl, ws, wl, bs, bl)?
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
            let a = crate::cuda::gelu_forward(xs, xl)?;
            GroupNorm.cuda_fwd(&a, &Layout::contiguous(xl.shape()), ws, wl, bs, bl)?
        } else {
            GroupNorm.cuda_fwd(xs, xl, ws, wl, bs, bl)?
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
            return GroupNorm.bwd(x, w, b, &d_normed, &d_normed);
        }
        let gelu = Gelu { tanh: false };
        let a = x.apply_op1_no_bwd(&gelu)?;
        let (da, dw, db) = GroupNorm.bwd(&a, w, b, &d_normed, &d_normed)?;
        let da = da.expect("GroupNorm's backward gives the input's gradient");
        Ok((gelu.bwd(x, &da, &da)?, dw, db))
    }
}

impl Dropout {
    fn new(p: f64, seed: u64) -> Self {
        let keep = 1.0 - p;
        Dropout {
            seed,
            // keep·2^24 in 24-bit units; the hash's top 24 bits are compared with it.
            threshold: (keep * (1u64 << 24) as f64).round() as u32,
            scale: (1.0 / keep) as f32,
        }
    }

    /// The kept value of element `i` (`v·scale`, or 0), as the dropout op computes it.
    #[inline(always)]
    fn apply(&self, i: usize, v: f32) -> f32 {
        let r = (splitmix64(self.seed.wrapping_add(i as u64)) >> 40) as u32;
        if r < self.threshold {
            v * self.scale
        } else {
            0.0
        }
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
        let y = crate::cuda::dropout_pool_forward(
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
        let dx = crate::cuda::dropout_pool_backward(g, mask, [p.h, p.w, p.kh, p.kw], gelu_of)?;
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
    use candle_core::{Device, Var, D};

    /// Within 3 ulp of the library's e^x over the clamped range, and finite at the ends.
    #[test]
    fn exp_f32_matches_the_library_exp() {
        let mut worst = 0f64;
        for i in 0..=175_000 {
            let x = -87.3 + i as f32 * 1e-3;
            let want = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64 - want) / want).abs());
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "relative error {worst}");
        assert!(exp_f32(-1e4) > 0.0 && exp_f32(1e4).is_finite());
    }

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

    /// GELU equals Candle's `gelu_erf` (f64, 1e-12); its one-pass gradient equals the central
    /// difference of that forward (h = 1e-5: truncation ≈ 1e-10, tolerance 1e-8). (Candle's
    /// own backward differs from the difference by up to 8e-7.)
    #[test]
    fn gelu_matches_candles_and_its_gradient_the_derivative() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 2.0, 100_001, &dev)?)?;
        let ours = gelu(x.as_tensor())?;
        let max = |t: Tensor| t.abs()?.max_all()?.to_scalar::<f64>();
        assert!(max((&ours - x.as_tensor().gelu_erf()?)?)? < 1e-12);
        let grad = ours.sum_all()?.backward()?;
        let h = 1e-5;
        let central =
            ((x.as_tensor() + h)?.gelu_erf()? - (x.as_tensor() - h)?.gelu_erf()?)? / (2.0 * h);
        let d = max((grad.get(&x).unwrap() - central?)?)?;
        assert!(d < 1e-8, "gradient differs from the derivative by {d}");
        Ok(())
    }

    /// GELU-tanh with a fused bias is GELU-tanh of z = round(x + round(b)) (no rounding outside
    /// autocast): the value and ∂L/∂x exactly; ∂L/∂b is the rounded column sum of the rounded
    /// ∂L/∂z (summed in f64 here), within one 16-bit ulp, and the plain sum to 1e-6 in f32.
    #[test]
    fn bias_gelu_tanh_is_gelu_tanh_of_the_rounded_sum() -> Result<()> {
        use crate::precision::{round_in_place, Autocast};
        let dev = Device::Cpu;
        let (rows, width) = (37, 24);
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (rows, width), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, width, &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (rows, width), &dev)?;
        let host = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        for (round, ulp) in [
            (None, 1e-6),
            (Some(DType::BF16), 2f32.powi(-7)),
            (Some(DType::F16), 2f32.powi(-10)),
        ] {
            let y = {
                let _amp = Autocast::enter(round);
                bias_gelu_tanh(x.as_tensor(), b.as_tensor())?
            };
            let grads = (&y * &probe)?.sum_all()?.backward()?;
            let mut bias = host(b.as_tensor())?;
            round_in_place(&mut bias, round);
            let mut z = host(x.as_tensor())?;
            z.iter_mut()
                .enumerate()
                .for_each(|(i, z)| *z += bias[i % width]);
            round_in_place(&mut z, round);
            let z = Var::from_tensor(&Tensor::from_vec(z, (rows, width), &dev)?)?;
            let want = gelu_tanh(z.as_tensor())?;
            let want_dz = (&want * &probe)?.sum_all()?.backward()?;
            let want_dz = want_dz.get(&z).unwrap();
            assert_eq!(host(&y)?, host(&want)?, "{round:?}: value");
            let dx = grads.get(&x).unwrap();
            assert_eq!(host(dx)?, host(want_dz)?, "{round:?}: ∂x");
            let mut dz = host(want_dz)?;
            round_in_place(&mut dz, round);
            let mut want_db: Vec<f32> = (0..width)
                .map(|c| {
                    dz.iter()
                        .skip(c)
                        .step_by(width)
                        .map(|&v| v as f64)
                        .sum::<f64>() as f32
                })
                .collect();
            round_in_place(&mut want_db, round);
            for (got, want) in host(grads.get(&b).unwrap())?.iter().zip(&want_db) {
                assert!(
                    (got - want).abs() <= ulp * want.abs().max(1.0),
                    "{round:?}: ∂b {got} against {want}"
                );
            }
        }
        Ok(())
    }

    /// The f32 GELU (A&S erf, our exp) against the exact f64 one: value within
    /// 4e-7·max(1, |x|), gradient within 1e-6·max(1, |x|) — f32 resolution.
    #[test]
    fn gelu_f32_is_within_f32_resolution_of_the_exact_one() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 3.0, 200_001, &dev)?;
        // The tanh form in f64 is Candle's own formula.
        let want = x.gelu()?.to_vec1::<f64>()?;
        let got = gelu_tanh(&x)?.to_vec1::<f64>()?;
        assert!(want.iter().zip(&got).all(|(a, b)| (a - b).abs() < 1e-12));
        for f in [gelu as fn(&Tensor) -> Result<Tensor>, gelu_tanh] {
            f32_matches_f64(f, &x)?;
        }
        Ok(())
    }

    /// Values and gradients of `f` in f32 against f64.
    fn f32_matches_f64(f: fn(&Tensor) -> Result<Tensor>, x64: &Tensor) -> Result<()> {
        let x32 = Var::from_tensor(&x64.to_dtype(DType::F32)?)?;
        let x64 = Var::from_tensor(&x32.as_tensor().to_dtype(DType::F64)?)?;
        let y32 = f(x32.as_tensor())?;
        let y64 = f(x64.as_tensor())?;
        let g32 = y32
            .sum_all()?
            .backward()?
            .get(&x32)
            .unwrap()
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let g64 = y64
            .sum_all()?
            .backward()?
            .get(&x64)
            .unwrap()
            .to_vec1::<f64>()?;
        let (y32, y64) = (
            y32.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            y64.to_vec1::<f64>()?,
        );
        for (i, x) in x64.as_tensor().to_vec1::<f64>()?.into_iter().enumerate() {
            let scale = x.abs().max(1.0);
            assert!(
                (y32[i] - y64[i]).abs() <= 4e-7 * scale,
                "gelu({x}): {} vs {}",
                y32[i],
                y64[i]
            );
            assert!(
                (g32[i] - g64[i]).abs() <= 1e-6 * scale,
                "gelu'({x}): {} vs {}",
                g32[i],
                g64[i]
            );
        }
        Ok(())
    }

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
