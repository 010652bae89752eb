//! GELU, its tanh approximation, SiLU (the same x·gate(x) form), and GELU-tanh with a linear layer's bias add folded in: one
//! pass each way on the CPU (vectorised f32 loops) and on a GPU (runtime/kernels/gelu.cu,
//! dit.cu). GEGLU (value·GELU(gate) of a projection's two halves): one pass each way on the CPU.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

use super::cpu::{contiguous, exp_f32, fused_f32, par_map, vectorised};

/// GELU (erf form), `0.5·x·(1 + erf(x/√2))`, with a one-pass backward
/// `g·(Φ(x) + x·φ(x))`: on the GPU runtime/kernels/gelu.cu, on the CPU the loops below (Candle's
/// `gelu_erf` backward is ten elementwise ops, each a full-size tensor).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F32 | DType::F64 => x.contiguous()?.apply_op1(SelfGated { gate: Gate::Erf }),
        _ => x.gelu_erf(),
    }
}

/// SiLU, x·σ(x), one pass each way on the CPU (Candle's forward is a serial map and its backward
/// a chain of full-size tensors); Candle's elsewhere.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    match (x.device().is_cpu(), x.dtype()) {
        (true, DType::F32 | DType::F64) => x.contiguous()?.apply_op1(SelfGated {
            gate: Gate::Sigmoid,
        }),
        _ => x.silu(),
    }
}

/// GELU's tanh approximation (PyTorch's `approximate="tanh"`, diffusers' "gelu-approximate"),
/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, one pass each way on the CPU (Candle's own is a
/// chain of library `tanh`/`powf` calls and its backward a dozen tensors).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    match (x.device().is_cpu(), x.dtype()) {
        (true, DType::F32 | DType::F64) => {
            x.contiguous()?.apply_op1(SelfGated { gate: Gate::Tanh })
        }
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
    let round = crate::ops::precision::autocast_dtype();
    if fused_f32(x) {
        return x
            .contiguous()?
            .apply_op2(&bias.contiguous()?, BiasGeluTanh { round });
    }
    let rounded = |t: &Tensor| crate::ops::precision::round_tensor(t, round);
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
        let bias = crate::ops::precision::operand(bias, self.round);
        let mut z: Vec<f32> = x
            .chunks(bias.len())
            .flat_map(|row| row.iter().zip(bias.iter()).map(|(x, b)| x + b))
            .collect();
        crate::ops::precision::round_in_place(&mut z, self.round);
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
            CpuStorage::F32(gelu_f32(&z, None, Gate::Tanh)),
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
        let y = crate::ops::cuda::gelu_tanh((xs, xl), (bs, bl), None, self.round)?;
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
        let dbias = crate::ops::precision::bias_grad(bias, &dz, self.round)?;
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
        let dz = gelu_f32(&z, Some(g), Gate::Tanh);
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
        let dz = crate::ops::cuda::gelu_tanh((xs, xl), (bs, bl), Some((gs, gl)), self.round)?;
        Ok((dz, xl.shape().clone()))
    }
}

/// (a, b) with f(x) = x·a and f'(x) = a + x·b: (Φ(x), φ(x)) for GELU's erf form; for the tanh
/// form a = (1 + t)/2, b = (1 − t²)/2·c·(1 + 3k·x²), t = tanh(c·(x + k·x³)); (σ, σ(1 − σ)) for
/// SiLU.
fn gelu_parts(x: f64, gate: Gate) -> (f64, f64) {
    if gate == Gate::Sigmoid {
        let sigma = 1.0 / (1.0 + (-x).exp());
        return (sigma, sigma * (1.0 - sigma));
    }
    if gate == Gate::Tanh {
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

/// SiLU's (a, b): x·σ(x), σ(x) + x·σ(x)(1 − σ(x)).
#[inline(always)]
fn silu_parts_f32(x: f32) -> (f32, f32) {
    let sigma = 1.0 / (1.0 + exp_f32(-x));
    (sigma, sigma * (1.0 - sigma))
}

#[inline(always)]
fn parts_f32(x: f32, gate: Gate) -> (f32, f32) {
    match gate {
        Gate::Erf => gelu_parts_f32(x),
        Gate::Tanh => gelu_tanh_parts_f32(x),
        Gate::Sigmoid => silu_parts_f32(x),
    }
}

vectorised! {
    /// The f32 GELU loops (forward without `g`, backward with it).
    fn gelu_loop_f32(x: &[f32], g: Option<&[f32]>, out: &mut [f32], gate: Gate) {
        match g {
            None => {
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = v * parts_f32(v, gate).0;
                }
            }
            Some(g) => {
                for ((o, &v), &d) in out.iter_mut().zip(x).zip(g) {
                    let (a, b) = parts_f32(v, gate);
                    *o = d * (a + v * b);
                }
            }
        }
    }
}

/// GELU (or SiLU, by `gate`) of `x` in f32 on the CPU's threads, or with `g` = ∂L/∂y its
/// backward ∂L/∂x.
pub(crate) fn gelu_f32(x: &[f32], g: Option<&[f32]>, gate: Gate) -> Vec<f32> {
    par_map(x.len(), |start, out: &mut [f32]| {
        let end = start + out.len();
        gelu_loop_f32(&x[start..end], g.map(|g| &g[start..end]), out, gate)
    })
}

/// GEGLU of h (..., 2f) = [value | gate]: value·GELU(gate) (erf form), (..., f), as diffusers'
/// `GEGLU` and k-diffusion's `LinearGEGLU` split their projection. On the CPU in f32 one pass
/// each way (∂value = g·GELU(gate), ∂gate = g·value·GELU'(gate)), no copy of either half;
/// elsewhere the halves and [`gelu`].
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if h.dtype() != DType::F32 || !h.device().is_cpu() {
        let halves = h.chunk(2, D::Minus1)?;
        return &halves[0] * gelu(&halves[1].contiguous()?)?;
    }
    h.contiguous()?.apply_op1(Geglu)
}

struct Geglu;

vectorised! {
    /// One row of GEGLU: `out` = value·GELU(gate); with `g`, its backward into `out`
    /// ([∂value | ∂gate], twice as long).
    fn geglu_row_f32(value: &[f32], gate: &[f32], g: Option<&[f32]>, out: &mut [f32]) {
        match g {
            None => {
                for ((o, &a), &b) in out.iter_mut().zip(value).zip(gate) {
                    *o = a * b * gelu_parts_f32(b).0;
                }
            }
            Some(g) => {
                let (d_value, d_gate) = out.split_at_mut(value.len());
                for i in 0..value.len() {
                    let (a, b) = (value[i], gate[i]);
                    let (phi_cdf, phi_pdf) = gelu_parts_f32(b);
                    d_value[i] = g[i] * b * phi_cdf;
                    d_gate[i] = g[i] * a * (phi_cdf + b * phi_pdf);
                }
            }
        }
    }
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let two_f = l.dims().last().copied().unwrap_or(0);
        if two_f % 2 != 0 {
            candle_core::bail!("geglu: the last axis ({two_f}) must split in two halves");
        }
        let f = two_f / 2;
        let h = contiguous::<f32>(s, l)?;
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("a last axis") = f;
        let mut out = vec![0f32; h.len() / 2];
        crate::ops::cpu::on_row_chunks(&mut out, f, |start, rows| {
            for (i, row) in rows.chunks_exact_mut(f).enumerate() {
                let at = (start / f + i) * two_f;
                geglu_row_f32(&h[at..at + f], &h[at + f..at + two_f], None, row);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, h: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let two_f = h.dim(D::Minus1)?;
        let f = two_f / 2;
        let dh = crate::ops::cpu::with_f32(&[h, &grad.contiguous()?], |t| {
            let (h, g) = (t[0], t[1]);
            let mut dh = vec![0f32; h.len()];
            crate::ops::cpu::on_row_chunks(&mut dh, two_f, |start, rows| {
                for (i, row) in rows.chunks_exact_mut(two_f).enumerate() {
                    let r = start / two_f + i;
                    let (value, gate) = h[r * two_f..(r + 1) * two_f].split_at(f);
                    geglu_row_f32(value, gate, Some(&g[r * f..(r + 1) * f]), row);
                }
            });
            Ok(dh)
        })?;
        Ok(Some(Tensor::from_vec(dh, h.shape(), h.device())?))
    }
}

/// GELU in its erf form or (`tanh`) its tanh approximation.
/// x·a(x): GELU (erf or tanh form) or SiLU, one pass each way.
pub(crate) struct SelfGated {
    pub(crate) gate: Gate,
}

/// Which gate multiplies x.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Gate {
    /// Φ(x): GELU.
    Erf,
    /// GELU's tanh approximation.
    Tanh,
    /// σ(x): SiLU.
    Sigmoid,
}

pub(crate) struct GeluBackward {
    pub(crate) gate: Gate,
}

impl CustomOp1 for SelfGated {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(gelu_f32(contiguous::<f32>(s, l)?, None, self.gate))
            }
            CpuStorage::F64(_) => {
                let x = contiguous::<f64>(s, l)?;
                CpuStorage::F64(par_map(x.len(), |start, out: &mut [f64]| {
                    for (o, &v) in out.iter_mut().zip(&x[start..]) {
                        *o = v * gelu_parts(v, self.gate).0;
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
        if self.gate != Gate::Erf {
            candle_core::bail!("on a GPU only GELU's erf form has a kernel of its own here");
        }
        Ok((crate::ops::cuda::gelu_forward(s, l)?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &GeluBackward { gate: self.gate },
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
                CpuStorage::F32(gelu_f32(x, Some(g), self.gate))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (x, g) = (contiguous::<f64>(xs, xl)?, contiguous::<f64>(gs, gl)?);
                CpuStorage::F64(par_map(x.len(), |start, out: &mut [f64]| {
                    for ((o, &v), &d) in out.iter_mut().zip(&x[start..]).zip(&g[start..]) {
                        let (a, b) = gelu_parts(v, self.gate);
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
        if self.gate != Gate::Erf {
            candle_core::bail!("on a GPU only GELU's erf form has a kernel of its own here");
        }
        Ok((
            crate::ops::cuda::gelu_backward(xs, xl, gs, gl)?,
            xl.shape().clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

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

    /// SiLU equals Candle's `silu` in f64 (1e-12) and f32 (1e-5, our vectorised exp), and its
    /// one-pass gradient the central difference of Candle's forward (f64, tolerance 1e-8).
    #[test]
    fn silu_matches_candles_and_its_gradient_the_derivative() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 4.0, 100_001, &dev)?)?;
        let ours = silu(x.as_tensor())?;
        let max = |t: Tensor| t.abs()?.max_all()?.to_scalar::<f64>();
        assert!(max((&ours - x.as_tensor().silu()?)?)? < 1e-12);
        let grad = ours.sum_all()?.backward()?;
        let h = 1e-5;
        let central = ((x.as_tensor() + h)?.silu()? - (x.as_tensor() - h)?.silu()?)? / (2.0 * h);
        let d = max((grad.get(&x).unwrap() - central?)?)?;
        assert!(d < 1e-8, "gradient differs from the derivative by {d}");
        let x32 = x.as_tensor().to_dtype(DType::F32)?;
        let d32 = (silu(&x32)? - x32.silu()?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d32 < 1e-5, "f32 differs by {d32}");
        Ok(())
    }

    /// GELU-tanh with a fused bias is GELU-tanh of z = round(x + round(b)) (no rounding outside
    /// autocast): the value and ∂L/∂x exactly; ∂L/∂b is the rounded column sum of the rounded
    /// ∂L/∂z (summed in f64 here), within one 16-bit ulp, and the plain sum to 1e-6 in f32, each
    /// plus the f32 summation bound of the op's own column sum.
    #[test]
    fn bias_gelu_tanh_is_gelu_tanh_of_the_rounded_sum() -> Result<()> {
        use crate::ops::precision::{round_in_place, Autocast};
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
            let column = |c: usize| dz.iter().skip(c).step_by(width).map(|&v| v as f64);
            let mut want_db: Vec<f32> = (0..width).map(|c| column(c).sum::<f64>() as f32).collect();
            round_in_place(&mut want_db, round);
            for (c, (got, want)) in host(grads.get(&b).unwrap())?
                .iter()
                .zip(&want_db)
                .enumerate()
            {
                // Our column sum runs in f32: besides the final rounding, it may differ from the
                // f64 sum by the f32 summation bound rows·ε·Σ|dz| (1.9e-6 on one unseeded draw).
                let summation =
                    rows as f64 * f32::EPSILON as f64 * column(c).map(f64::abs).sum::<f64>();
                let tolerance = (ulp * want.abs().max(1.0)) as f64 + summation;
                assert!(
                    ((got - want).abs() as f64) <= tolerance,
                    "{round:?}: ∂b {got} against {want} (tolerance {tolerance:e})"
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

    /// GEGLU equals its halves-and-GELU composite, values and gradient, in f32 (1e-5 of the
    /// largest; the composite's GELU is the same f32 erf).
    #[test]
    fn geglu_matches_the_composite_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        for f in [8, 21] {
            let h = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (3, 5, 2 * f), &dev)? * 2.0)?)?;
            let r = Tensor::randn(0f32, 1.0, (3, 5, f), &dev)?;
            let ours = geglu(h.as_tensor())?;
            let halves = h.as_tensor().chunk(2, D::Minus1)?;
            let theirs = (&halves[0] * gelu(&halves[1].contiguous()?)?)?;
            let max = |t: Tensor| t.abs()?.max_all()?.to_scalar::<f32>();
            assert!(max((&ours - &theirs)?)? < 1e-5 * max(theirs.clone())?);
            let a = (ours * &r)?.sum_all()?.backward()?;
            let b = (theirs * &r)?.sum_all()?.backward()?;
            let (a, b) = (a.get(&h).unwrap(), b.get(&h).unwrap());
            let diff = max((a - b)?)?;
            assert!(
                diff < 1e-5 * max(b.clone())?,
                "f = {f}: ∂h differs by {diff}"
            );
        }
        Ok(())
    }
}
