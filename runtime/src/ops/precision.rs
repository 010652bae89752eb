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
//! Where a product has a 16-bit kernel (cuBLAS and cuDNN on CUDA) it computes on real bf16/f16
//! copies of its operands. Where it has none (our CPU kernels are f32), the operands are rounded
//! to the 16-bit type and kept in f32: the same numbers, since a 16-bit value is exact in f32, at
//! f32 speed plus the rounding passes. Either way the casts and
//! roundings happen inside the op ([`matmul`], [`matmul_add`]; the fused linear, attention and
//! convolution ops with [`operands`] and [`round_in_place`]), so autograd keeps no 16-bit or
//! rounded copy for the backward and a 16-bit step holds no more activation memory than an f32
//! one. So a CPU run has the GPU run's numerics, overflow of fp16 included.
//!
//! The 16-bit type of the current step is a scoped, per-thread setting ([`Autocast::enter`]), as
//! `torch.autocast` is, so the layers need no precision argument; evaluation runs outside it, in
//! f32.

use std::cell::Cell;

use candle_core::backend::BackendStorage;
use candle_core::{
    backprop::GradStore, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape,
    Tensor, Var,
};
use serde::{Deserialize, Serialize};
use signal_diffusion_config::choice::MixedPrecision;

thread_local! {
    static AUTOCAST: Cell<Option<DType>> = const { Cell::new(None) };
}

/// The 16-bit type `mixed_precision` asks for (`None`: f32).
pub fn dtype_of(mixed_precision: MixedPrecision) -> Option<DType> {
    match mixed_precision {
        MixedPrecision::Bf16 => Some(DType::BF16),
        MixedPrecision::Fp16 => Some(DType::F16),
        MixedPrecision::No => None,
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

/// `a·b` (as [`Tensor::matmul`]) under the current autocast, as one op: the operands are cast to
/// the 16-bit type inside it, multiplied there (cuBLAS on a GPU, accumulating in f32) and the
/// result widened to f32. Outside autocast, Candle's matmul.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match autocast_dtype() {
        low @ Some(_) => a.apply_op2(b, Product { low }),
        None => a.matmul(b),
    }
}

/// `a·b + bias`, the bias (of `b`'s last dimension) broadcast over the rows, as one op that keeps
/// only its result for the backward (two ops would keep the product too). Under autocast the
/// bias is cast too and added in the 16-bit type, as PyTorch's `addmm` does.
pub fn matmul_add(a: &Tensor, b: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let low = autocast_dtype();
    a.apply_op3(b, bias, Product { low })
}

/// A product, with a bias or not, in f32 or under autocast. The 16-bit copies of its operands
/// and its 16-bit result exist only inside the op, so autograd keeps the f32 tensors it keeps for
/// an f32 product and nothing more; cast ops around a product would keep the copies alive until
/// the backward, and a bf16 step would hold more memory than an f32 one. The backward is products
/// of the same kind, which is how a 16-bit tensor's gradient is computed:
///   ∂a = ∂y·bᵀ,  ∂b = aᵀ·∂y,  ∂bias = Σ_rows ∂y (in f32, rounded).
/// Generic over the device's storage: Candle's CPU backend widens bf16 products to f32, exactly,
/// so the CPU runs what cuBLAS runs on a GPU.
struct Product {
    /// The 16-bit type; `None`: the operands' own (f32 outside autocast).
    low: Option<DType>,
}

impl Product {
    fn forward<S: BackendStorage>(
        &self,
        (a, al): (&S, &Layout),
        (b, bl): (&S, &Layout),
        bias: Option<(&S, &Layout)>,
    ) -> Result<(S, Shape)> {
        let (ad, bd) = (al.dims(), bl.dims());
        let r = ad.len();
        if r < 2 || bd.len() != r || ad[..r - 2] != bd[..r - 2] || ad[r - 1] != bd[r - 2] {
            candle_core::bail!("a product of shapes {ad:?} and {bd:?}");
        }
        let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
        let batch = ad[..r - 2].iter().product();
        let out = Shape::from([&ad[..r - 1], &[n]].concat());
        let out_layout = Layout::contiguous(&out);
        // A cast reads any strides and writes a contiguous tensor.
        let cast = |(s, l): (&S, &Layout)| match self.low {
            Some(low) => Ok(Some((s.to_dtype(l, low)?, Layout::contiguous(l.shape())))),
            None => Ok::<_, candle_core::Error>(None),
        };
        let (a_low, b_low) = (cast((a, al))?, cast((b, bl))?);
        let (a, al) = a_low.as_ref().map_or((a, al), |(s, l)| (s, l));
        let (b, bl) = b_low.as_ref().map_or((b, bl), |(s, l)| (s, l));
        let mut y = a.matmul(b, (batch, m, n, k), al, bl)?;
        if let Some(bias) = bias {
            let bias_low = cast(bias)?;
            let (bias, bias_l) = bias_low.as_ref().map_or(bias, |(s, l)| (s, l));
            let along_rows = bias_l.broadcast_as(&out)?;
            y = y.binary_impl::<candle_core::op::Add>(bias, &out_layout, &along_rows)?;
        }
        match self.low {
            Some(_) => Ok((y.to_dtype(&out_layout, DType::F32)?, out)),
            None => Ok((y, out)),
        }
    }

    /// ∂a and ∂b, each only when something upstream needs it.
    fn grads(&self, a: &Tensor, b: &Tensor, dy: &Tensor) -> Result<[Option<Tensor>; 2]> {
        let da = match a.track_op() {
            true => Some(dy.apply_op2_no_bwd(&b.t()?, self)?),
            false => None,
        };
        let db = match b.track_op() {
            true => Some(a.t()?.apply_op2_no_bwd(dy, self)?),
            false => None,
        };
        Ok([da, db])
    }
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "autocast-product"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((a, al), (b, bl), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.forward((a, al), (b, bl), None)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [da, db] = self.grads(a, b, dy)?;
        Ok((da, db))
    }
}

impl CustomOp3 for Product {
    fn name(&self) -> &'static str {
        "autocast-product-bias"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
        bias: &CpuStorage,
        bias_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((a, al), (b, bl), Some((bias, bias_l)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
        bias: &candle_core::CudaStorage,
        bias_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.forward((a, al), (b, bl), Some((bias, bias_l)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [da, db] = self.grads(a, b, dy)?;
        Ok((da, db, Some(bias_grad(bias, dy, self.low)?)))
    }
}

/// A tensor rounded to a 16-bit type and kept in f32, as one op each way (the gradient is
/// rounded the same way, as a 16-bit tensor's gradient would be): the rounded copy is the op's
/// output, and no 16-bit tensor stays in the graph.
struct Rounded {
    low: DType,
}

impl CustomOp1 for Rounded {
    fn name(&self) -> &'static str {
        "round-to-16-bit"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut v = crate::ops::cpu::contiguous::<f32>(s, l)?.to_vec();
        round_in_place(&mut v, Some(self.low));
        Ok((CpuStorage::F32(v), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((round_storage(s, l, self.low)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(self)?))
    }
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

crate::ops::cpu::vectorised! {
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

/// [`operands`] of CPU storages read through their layouts (contiguous f32).
pub fn storage_operands<'a, const N: usize>(
    v: [(&'a CpuStorage, &Layout); N],
    dtype: Option<DType>,
) -> Result<[std::borrow::Cow<'a, [f32]>; N]> {
    let mut slices = [&[][..]; N];
    for (slot, (s, l)) in slices.iter_mut().zip(v) {
        *slot = crate::ops::cpu::contiguous::<f32>(s, l)?;
    }
    Ok(operands(slices, dtype))
}

/// A fused op's gradients, computed in f32: rounded to autocast's `dtype` as 16-bit gradients
/// are, as tensors of `shape` on `dev`.
pub fn gradients<const N: usize>(
    grads: [Vec<f32>; N],
    dtype: Option<DType>,
    shape: &Shape,
    dev: &candle_core::Device,
) -> Result<[Option<Tensor>; N]> {
    let mut out: [Option<Tensor>; N] = std::array::from_fn(|_| None);
    for (slot, mut g) in out.iter_mut().zip(grads) {
        round_in_place(&mut g, dtype);
        *slot = Some(Tensor::from_vec(g, shape.clone(), dev)?);
    }
    Ok(out)
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

/// The gradient of `bias`, added along the last axis (repeating when shorter) in the 16-bit type
/// `low` (`None`: f32): the column sums of ∂L/∂y, rounded to `low` as a 16-bit gradient is,
/// summed in f32 (as PyTorch's CUDA reductions do) and the sum rounded.
pub fn bias_grad(bias: &Tensor, dy: &Tensor, low: Option<DType>) -> Result<Tensor> {
    let sums = round_tensor(dy, low)?
        .reshape(((), bias.elem_count()))?
        .sum(0)?;
    round_tensor(&sums.reshape(bias.shape())?, low)
}

/// A contiguous f32 copy of a device's tensor, rounded to `low` (cast there and back; for GPU
/// ops that compute in f32 under autocast).
pub fn round_storage<S: BackendStorage>(s: &S, l: &Layout, low: DType) -> Result<S> {
    s.to_dtype(l, low)?
        .to_dtype(&Layout::contiguous(l.shape()), DType::F32)
}

/// A tensor (f32) rounded to `dtype` and kept in f32, as one op ([`Rounded`]; `None`: itself).
pub fn round_tensor(t: &Tensor, dtype: Option<DType>) -> Result<Tensor> {
    match dtype {
        Some(low) => t.contiguous()?.apply_op1(Rounded { low }),
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

    /// The autocast product op (the GPU path: casts inside, cuBLAS-style 16-bit product) against
    /// cast ops around Candle's products, batched, with a transposed operand and with a bias:
    /// values and every gradient within one 16-bit ulp (both sides are 16-bit values, so a
    /// difference is at least one; a wrong transpose or a missing rounding is far more).
    #[test]
    fn the_autocast_product_op_equals_cast_ops_around_a_product() -> Result<()> {
        let dev = Device::Cpu;
        let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev);
        let (a, bt, bias) = (
            Var::from_tensor(&randn(&[2, 3, 5, 9])?)?,
            Var::from_tensor(&randn(&[2, 3, 4, 9])?)?,
            Var::from_tensor(&randn(&[4])?)?,
        );
        let probe = randn(&[2, 3, 5, 4])?;
        for (low, ulp) in [(DType::BF16, 2f32.powi(-7)), (DType::F16, 2f32.powi(-10))] {
            for with_bias in [false, true] {
                let b = bt.as_tensor().t()?;
                let ours = {
                    let _g = Autocast::enter(Some(low));
                    match with_bias {
                        true => matmul_add(a.as_tensor(), &b, bias.as_tensor())?,
                        false => matmul(a.as_tensor(), &b)?,
                    }
                };
                let cast = |t: &Tensor| t.to_dtype(low);
                let mut theirs = cast(a.as_tensor())?.matmul(&cast(&b)?)?;
                if with_bias {
                    theirs = theirs.broadcast_add(&cast(bias.as_tensor())?)?;
                }
                let theirs = theirs.to_dtype(DType::F32)?;
                let grads = |y: &Tensor| (y * &probe)?.sum_all()?.backward();
                let (g_ours, g_theirs) = (grads(&ours)?, grads(&theirs)?);
                let mut pairs = vec![("forward", ours.clone(), theirs.clone())];
                for (name, v) in [("∂a", &a), ("∂b", &bt)]
                    .into_iter()
                    .chain(with_bias.then_some(("∂bias", &bias)))
                {
                    let got = g_ours.get(v).expect("a gradient");
                    assert_eq!(got.dtype(), DType::F32, "{name}");
                    let want = match name {
                        // Candle's CPU sums bf16 in bf16; the op sums the 16-bit gradient in
                        // f32 and rounds once, as PyTorch's CUDA reductions do.
                        "∂bias" => probe
                            .to_dtype(low)?
                            .to_dtype(DType::F64)?
                            .reshape(((), 4))?
                            .sum(0)?
                            .to_dtype(low)?
                            .to_dtype(DType::F32)?,
                        _ => g_theirs.get(v).unwrap().clone(),
                    };
                    pairs.push((name, got.clone(), want));
                }
                for (name, got, want) in pairs {
                    let (got, want) = (got.flatten_all()?.to_vec1::<f32>()?, want.flatten_all()?);
                    let want = want.to_vec1::<f32>()?;
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() <= ulp * w.abs(),
                            "{low:?}, bias {with_bias}, {name}: {g} against {w}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Outside autocast the op with a bias (every linear layer off the CPU) is Candle's matmul
    /// and broadcast add, values and gradients, in f64 to 1e-12.
    #[test]
    fn the_product_op_with_a_bias_equals_candles_ops() -> Result<()> {
        let dev = Device::Cpu;
        let randn = |shape: &[usize]| Tensor::randn(0f64, 1.0, shape, &dev);
        let vars = [
            Var::from_tensor(&randn(&[3, 5, 9])?)?,
            Var::from_tensor(&randn(&[3, 4, 9])?)?,
            Var::from_tensor(&randn(&[4])?)?,
        ];
        let [a, bt, bias] = vars.each_ref().map(|v| v.as_tensor());
        let probe = randn(&[3, 5, 4])?;
        let ours = matmul_add(a, &bt.t()?, bias)?;
        let theirs = a.matmul(&bt.t()?)?.broadcast_add(bias)?;
        let grads = |y: &Tensor| (y * &probe)?.sum_all()?.backward();
        let (g_ours, g_theirs) = (grads(&ours)?, grads(&theirs)?);
        let diff = |x: &Tensor, y: &Tensor| -> Result<f64> {
            (x - y)?.abs()?.max_all()?.to_scalar::<f64>()
        };
        assert!(diff(&ours, &theirs)? < 1e-12);
        for v in &vars {
            assert!(diff(g_ours.get(v).unwrap(), g_theirs.get(v).unwrap())? < 1e-12);
        }
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
