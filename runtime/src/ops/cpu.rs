//! CPU helpers the ops' kernels share: dispatch to the widest vector unit the CPU has, work
//! spread over Candle's threads, in-place reads of contiguous storage, a vectorisable e^x, and the
//! counter-based hash that dropout and the data loader draw from. A leaf: it imports no other
//! module of the crate.

use candle_core::{CpuStorage, Layout, Result, Tensor};

/// `SIGNAL_DIFFUSION_MAX_CPU_ISA`: `avx2` runs the AVX2 + FMA kernels (ours, and the GEMM's in
/// the vendored gemm-common, which reads the same variable) on a CPU that has AVX-512, to
/// measure that path; `avx512`, or unset, the widest the CPU has. Any other value is an error
/// naming the variable (the binaries check it at start-up).
pub fn check_max_cpu_isa() -> std::result::Result<(), String> {
    const VAR: &str = "SIGNAL_DIFFUSION_MAX_CPU_ISA";
    match std::env::var(VAR) {
        Err(std::env::VarError::NotPresent) => Ok(()),
        Ok(v) if ["avx2", "avx512"].iter().any(|isa| v.eq_ignore_ascii_case(isa)) => Ok(()),
        Ok(v) => Err(format!(
            "{VAR} is {v:?}: expected `avx2` (cap the CPU kernels at AVX2 + FMA) or `avx512` (the widest the CPU has, as when unset)"
        )),
        Err(e) => Err(format!("{VAR}: {e}")),
    }
}

/// Defines `fn $name(args)` that runs `$body` compiled for the widest vector unit the CPU has:
/// AVX-512 (unless `SIGNAL_DIFFUSION_MAX_CPU_ISA=avx2`), else AVX2 + FMA (checked at run time),
/// else the baseline. The loops inside
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
                    && !gemm_common::avx512_capped()
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

/// Whether `x` runs the fused f32 ops (gelu, pool): f32 on the CPU or on a GPU.
#[inline]
pub(crate) fn fused_f32(x: &Tensor) -> bool {
    x.dtype() == candle_core::DType::F32 && (x.device().is_cpu() || x.device().is_cuda())
}

/// A contiguous CPU tensor's values.
#[inline]
pub(crate) fn contiguous<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("a fused op needs a contiguous input"),
    }
}

/// Runs `f(sample, out)` over the batch on all cores; `out` is that sample's output slice.
pub(crate) fn per_sample<T: Send + Sync + Default + Clone>(
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

pub(crate) trait Real:
    Copy + Into<f64> + Default + Send + Sync + candle_core::WithDType
{
    fn of(v: f64) -> Self;
}
impl Real for f32 {
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
}
impl Real for f64 {
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
}

/// The same function as the kernel's `splitmix64`. Inlined: dropout calls it per element from
/// other modules.
#[inline(always)]
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
    #[inline]
    pub(crate) fn new(buf: &mut [f32]) -> Self {
        Blocks(buf.as_mut_ptr())
    }

    /// The `len` floats at `start`.
    ///
    /// # Safety
    /// In bounds of the buffer, and no other thread uses an overlapping block at the same time.
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    pub(crate) unsafe fn block(&self, start: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }

    /// A raw pointer to the float at `start`, for strided blocks (interleaved with other
    /// threads' blocks, so no slice may cover them).
    #[inline(always)]
    pub(crate) fn at(&self, start: usize) -> *mut f32 {
        self.0.wrapping_add(start)
    }
}

/// An elementwise pass over `len` outputs on Candle's thread count: `fill(start, chunk)` writes
/// the outputs `start..start + chunk.len()`.
pub(crate) fn par_map<T: Default + Clone + Send>(
    len: usize,
    fill: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
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

/// `f(offset, rows)` over `data` cut into one run of whole rows of `n` per thread.
pub(crate) fn on_row_chunks(data: &mut [f32], n: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
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

/// a·b summed in 16 lanes, so it vectorises (a float sum in one chain cannot: its order is
/// fixed). The lanes' order is fixed too, so the result is the same on every vector unit.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Within 3 ulp of the library's e^x over the clamped range, and finite at the ends.
    #[test]
    fn dot_sums_every_element() {
        let a: Vec<f32> = (0..37).map(|x| x as f32).collect();
        assert_eq!(dot(&a, &[1f32; 37]), (0..37).sum::<i32>() as f32);
    }

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
}
