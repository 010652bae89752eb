//! Mixed precision (`mixed_precision = "bf16" | "fp16"`, `use_amp`): matrix products in 16 bits,
//! everything else in f32, and fp16's dynamic loss scale.
//!
//! Autocast, as PyTorch applies it to the ops that carry the FLOPs: a linear layer, a
//! convolution and attention's two products read their operands rounded to the 16-bit type and
//! accumulate in f32; their result is rounded to that type too, then widened to f32 for what
//! follows. Norms, softmax, activations, losses and the optimizer stay in f32, and the weights the
//! optimizer updates are f32 masters: each product casts them on the way in, and the cast's
//! backward brings the 16-bit gradient back to the master. (The reference casts the whole model
//! to bf16, moments and EMA included, so small updates vanish: its bug 8, fixed here on purpose.
//! PyTorch would also run the activations between products in 16 bits; keeping them in f32 costs
//! memory bandwidth, not accuracy.)
//!
//! Where a product has a 16-bit kernel (cuBLAS on CUDA) its operands are real bf16/f16 tensors.
//! Where it has none (Candle's CPU matmul has no bf16, and our CPU and cuDNN convolutions are
//! f32), the operands are rounded to the 16-bit type and kept in f32: the same numbers, since
//! a 16-bit value is exact in f32, at f32 speed plus the rounding passes. Cast ops around the
//! product do that ([`product`]); our fused CPU ops (linear, attention, convolution) round their
//! operands, gradients and results themselves ([`operands`], [`round_in_place`]), so the graph
//! keeps no rounded copy for the backward. So a CPU run has the GPU run's numerics, overflow of
//! fp16 included.
//!
//! The 16-bit type of the current step is a scoped, per-thread setting ([`Autocast::enter`]), as
//! `torch.autocast` is, so the layers need no precision argument; evaluation runs outside it, in
//! f32.

use std::cell::Cell;

use candle_core::{backprop::GradStore, DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

thread_local! {
    static AUTOCAST: Cell<Option<DType>> = const { Cell::new(None) };
}

/// The 16-bit type a config asks for: `mixed_precision` ("no", "bf16", "fp16") or `use_amp`.
pub fn dtype_of(mixed_precision: &str) -> Option<DType> {
    match mixed_precision {
        "bf16" => Some(DType::BF16),
        "fp16" => Some(DType::F16),
        _ => None,
    }
}

/// Products compute in `dtype` (`None`: f32) until this guard drops; then the previous setting
/// returns.
#[must_use = "autocast ends when the guard drops"]
pub struct Autocast {
    previous: Option<DType>,
}

impl Autocast {
    pub fn enter(dtype: Option<DType>) -> Self {
        Autocast {
            previous: AUTOCAST.with(|a| a.replace(dtype)),
        }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        AUTOCAST.with(|a| a.set(self.previous));
    }
}

/// The 16-bit type products compute in now, if any.
pub fn autocast_dtype() -> Option<DType> {
    AUTOCAST.with(Cell::get)
}

/// `f(operands)` under the current autocast: each operand cast to the 16-bit type where
/// `has_16bit_kernel` and the tensors live on a GPU, otherwise rounded to it in f32; the result
/// rounded to the 16-bit type and returned in f32. Outside autocast, `f` of the operands as
/// they are.
pub fn product(
    operands: &[&Tensor],
    has_16bit_kernel: bool,
    f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
) -> Result<Tensor> {
    let Some(low) = autocast_dtype() else {
        return f(&operands.iter().map(|&t| t.clone()).collect::<Vec<_>>());
    };
    let native = has_16bit_kernel && operands.first().is_some_and(|t| t.device().is_cuda());
    let lowered = operands
        .iter()
        .map(|t| match native {
            true => t.to_dtype(low),
            false => round(t, low),
        })
        .collect::<Result<Vec<_>>>()?;
    let y = f(&lowered)?;
    match y.dtype() {
        DType::F32 => round(&y, low),
        _ => y.to_dtype(DType::F32),
    }
}

/// `a·b` under the current autocast (cuBLAS has 16-bit kernels; the CPU rounds).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    product(&[a, b], true, |t| t[0].matmul(&t[1]))
}

/// `t` rounded to `low` and back to f32 (differentiable: the gradient is rounded the same way,
/// as a 16-bit tensor's gradient would be).
fn round(t: &Tensor, low: DType) -> Result<Tensor> {
    t.to_dtype(low)?.to_dtype(DType::F32)
}

/// Each value replaced by the nearest `dtype` (bf16 or fp16) value, ties to even, as a cast
/// there and back would (`None`: left as they are). For our fused CPU ops, which round their
/// operands, gradients and results themselves instead of through cast ops in the graph: the same
/// numbers, with no rounded copy kept alive for the backward.
pub fn round_in_place(v: &mut [f32], dtype: Option<DType>) {
    use rayon::prelude::*;
    match dtype {
        Some(DType::BF16) => v.par_chunks_mut(1 << 16).for_each(round_bf16),
        Some(DType::F16) => v.par_chunks_mut(1 << 16).for_each(|c| {
            use half::slice::HalfFloatSliceExt;
            let mut low = [half::f16::ZERO; 1024];
            for c in c.chunks_mut(1024) {
                let low = &mut low[..c.len()];
                low.convert_from_f32_slice(c);
                low.convert_to_f32_slice(c);
            }
        }),
        _ => {}
    }
}

crate::ops::vectorised! {
    /// bf16 is f32's top 16 bits: add half an ulp of bf16 (minus one when the kept part is even,
    /// so ties go to even) and clear the low bits. NaN stays NaN; overflow rounds to ±∞.
    fn round_bf16(v: &mut [f32]) {
        for x in v.iter_mut() {
            let b = x.to_bits();
            let r = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
            *x = if x.is_nan() { *x } else { f32::from_bits(r) };
        }
    }
}

/// The operands of a fused CPU product under autocast `dtype`: rounded copies (`None`: the
/// slices as they are).
pub fn operands<'a, const N: usize>(
    v: [&'a [f32]; N],
    dtype: Option<DType>,
) -> [std::borrow::Cow<'a, [f32]>; N] {
    v.map(|s| operand(s, dtype))
}

/// One operand of [`operands`].
pub fn operand(s: &[f32], dtype: Option<DType>) -> std::borrow::Cow<'_, [f32]> {
    match dtype {
        None => std::borrow::Cow::Borrowed(s),
        Some(_) => {
            let mut copy = s.to_vec();
            round_in_place(&mut copy, dtype);
            std::borrow::Cow::Owned(copy)
        }
    }
}

/// A tensor rounded to `dtype` and back to f32, by cast ops (`None`: itself).
pub fn round_tensor(t: &Tensor, dtype: Option<DType>) -> Result<Tensor> {
    match dtype {
        Some(low) => round(t, low),
        None => Ok(t.clone()),
    }
}

/// fp16's dynamic loss scale (PyTorch's `GradScaler` with its defaults, which Accelerate uses):
/// the loss is multiplied by `scale` before the backward so that small gradients survive fp16;
/// the gradients are divided by it before clipping and the update. An update whose gradients
/// overflowed is skipped and the scale halved; after 2000 updates in a row without overflow it
/// doubles. bf16 has f32's exponent range and needs none of this.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Updates since the last overflow or growth.
    pub good_steps: u32,
    /// Updates skipped so far: the optimizer has taken this many fewer steps than the run.
    pub skipped: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: 65536.0,
            good_steps: 0,
            skipped: 0,
        }
    }
}

impl LossScaler {
    const GROWTH_INTERVAL: u32 = 2000;

    /// For `mixed_precision`: a scaler for fp16, none otherwise.
    pub fn for_dtype(dtype: Option<DType>) -> Option<Self> {
        (dtype == Some(DType::F16)).then(Self::default)
    }

    /// Divides the gradients of `params` by the scale. Returns false, leaving them as they are,
    /// when any of them is infinite or NaN: that update must be skipped. One read from the
    /// device.
    pub fn unscale(&self, grads: &mut GradStore, params: &[(String, Var)]) -> Result<bool> {
        let with_grads: Vec<&Var> = params
            .iter()
            .map(|(_, v)| v)
            .filter(|v| grads.get(v).is_some())
            .collect();
        let Some(first) = with_grads.first() else {
            return Ok(true);
        };
        let mut total = Tensor::zeros((), DType::F32, first.device())?;
        for v in &with_grads {
            // Σg is NaN exactly when some g is infinite or NaN (or the sum itself overflows f32,
            // which no finite fp16-scaled gradient of a real model reaches).
            total = (total
                + grads
                    .get(v)
                    .expect("filtered")
                    .sum_all()?
                    .to_dtype(DType::F32)?)?;
        }
        if !(total.to_scalar::<f32>()? * 0.0).is_finite() {
            return Ok(false);
        }
        let inv = 1.0 / self.scale;
        for v in with_grads {
            let g = (grads.get(v).expect("filtered") * inv)?;
            grads.insert(v.as_tensor(), g);
        }
        Ok(true)
    }

    /// After an update (or a skipped one): halve on overflow, double after a long run without.
    pub fn update(&mut self, overflowed: bool) {
        if overflowed {
            self.scale *= 0.5;
            self.good_steps = 0;
            self.skipped += 1;
        } else {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn products_round_operands_and_result_to_the_16_bit_type() -> Result<()> {
        let dev = Device::Cpu;
        // 1 + 2⁻¹⁰ is exact in f32 and fp16, and rounds to 1 in bf16 (7 mantissa bits).
        let a = Tensor::new(&[[1.0f32 + 1.0 / 1024.0]], &dev)?;
        let b = Tensor::new(&[[2.0f32]], &dev)?;
        let f32_product = matmul(&a, &b)?.to_vec2::<f32>()?[0][0];
        assert_eq!(f32_product, 2.0 + 2.0 / 1024.0);
        let bf16 = {
            let _g = Autocast::enter(Some(DType::BF16));
            matmul(&a, &b)?
        };
        assert_eq!(bf16.dtype(), DType::F32);
        assert_eq!(bf16.to_vec2::<f32>()?[0][0], 2.0);
        let fp16 = {
            let _g = Autocast::enter(Some(DType::F16));
            matmul(&a, &b)?.to_vec2::<f32>()?[0][0]
        };
        // 2 + 2⁻⁹ is exact in fp16 (10 mantissa bits).
        assert_eq!(fp16, 2.0 + 2.0 / 1024.0);
        // The guard restored f32.
        assert_eq!(autocast_dtype(), None);
        Ok(())
    }

    /// The in-place rounding equals the `half` crate's conversions there and back, on random
    /// values across the whole exponent range, ties, ±0, subnormals, ±∞, overflow and NaN.
    #[test]
    fn in_place_rounding_equals_a_cast_there_and_back() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut values: Vec<f32> = (0..100_000)
            .map(|_| f32::from_bits(rng.random::<u32>()))
            .collect();
        values.extend([
            0.0,
            -0.0,
            1.0 + 1.0 / 256.0,  // a bf16 tie, to even (1)
            1.0 + 3.0 / 256.0,  // a bf16 tie, to even (1 + 2⁻⁶)
            1.0 + 1.0 / 2048.0, // an fp16 tie
            1e-40,
            f32::MAX,
            65520.0, // rounds to ∞ in fp16
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        for (dtype, cast) in [
            (
                DType::BF16,
                (|x: f32| half::bf16::from_f32(x).to_f32()) as fn(f32) -> f32,
            ),
            (DType::F16, |x: f32| half::f16::from_f32(x).to_f32()),
        ] {
            let mut ours = values.clone();
            round_in_place(&mut ours, Some(dtype));
            for (&x, &got) in values.iter().zip(&ours) {
                let want = cast(x);
                assert!(
                    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                    "{dtype:?}: {x:e} ({:#x}) rounds to {got:e}, not {want:e}",
                    x.to_bits()
                );
            }
        }
    }

    #[test]
    fn fp16_products_overflow_beyond_65504() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[300.0f32]], &dev)?;
        let _g = Autocast::enter(Some(DType::F16));
        let y = matmul(&a, &a)?.to_vec2::<f32>()?[0][0];
        assert!(
            y.is_infinite(),
            "300² = 90000 is beyond fp16's 65504, got {y}"
        );
        Ok(())
    }

    #[test]
    fn gradients_reach_the_f32_masters_through_the_casts() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[[0.5f32, -0.25]], &dev)?;
        let x = Tensor::new(&[[2.0f32], [4.0]], &dev)?;
        let _g = Autocast::enter(Some(DType::BF16));
        let grads = matmul(w.as_tensor(), &x)?.sum_all()?.backward()?;
        let g = grads.get(&w).expect("the master has a gradient");
        assert_eq!(g.dtype(), DType::F32);
        assert_eq!(g.to_vec2::<f32>()?, vec![vec![2.0, 4.0]]);
        Ok(())
    }

    #[test]
    fn the_scaler_skips_overflowed_updates_and_grows_after_2000_good_ones() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f32, 2.0], &dev)?;
        let params = vec![("w".to_string(), w.clone())];
        let mut scaler = LossScaler::default();
        // A finite scaled gradient is divided by the scale.
        let mut grads = (w.as_tensor() * scaler.scale)?.sum_all()?.backward()?;
        assert!(scaler.unscale(&mut grads, &params)?);
        assert_eq!(grads.get(&w).unwrap().to_vec1::<f32>()?, vec![1.0, 1.0]);
        // An infinite one is reported and left alone; the scale halves.
        let big = Tensor::new(&[f32::INFINITY, 1.0], &dev)?;
        let mut grads = (w.as_tensor() * &big)?.sum_all()?.backward()?;
        assert!(!scaler.unscale(&mut grads, &params)?);
        scaler.update(true);
        assert_eq!((scaler.scale, scaler.skipped), (32768.0, 1));
        for _ in 0..1999 {
            scaler.update(false);
        }
        assert_eq!(scaler.scale, 32768.0);
        scaler.update(false);
        assert_eq!((scaler.scale, scaler.good_steps), (65536.0, 0));
        Ok(())
    }
}
