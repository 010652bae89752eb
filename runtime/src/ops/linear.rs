//! `y = x·Wᵀ + b` as one op on the CPU, with its backward: the bias is the GEMM's starting value
//! (no separate broadcast pass), and the backward is two GEMMs reading the operands in place plus a
//! column sum for the bias:
//!   ∂L/∂x = ∂L/∂y·W,  ∂L/∂W = (∂L/∂y)ᵀ·x,  ∂L/∂b = Σ_rows ∂L/∂y.
//! In Candle ops the same layer is a matmul with a transposed view, a broadcast add, and in the
//! backward a transposed weight gradient (made contiguous later, by the optimizer) and a
//! reduction over the leading axis. Other devices and dtypes use those ops.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::ops::precision::{operands, round_in_place};

/// x (rows, din), weight (dout, din), bias (dout) -> (rows, dout).
/// Under autocast the three are rounded to the 16-bit type by the op itself on the CPU, or cast
/// to it inside the product on a GPU (see precision.rs).
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let round = crate::ops::precision::autocast_dtype();
        return x.contiguous()?.apply_op3(weight, bias, Linear { round });
    }
    crate::ops::precision::matmul_add(x, &weight.t()?, bias)
}

/// `round`: autocast's 16-bit type, to which operands, gradients and results are rounded.
struct Linear {
    round: Option<DType>,
}

fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// C (m×n, row-major) = [C +] alpha·A·B, A and B given as (slice, row stride, column stride), on
/// `threads` threads (the `gemm` crate's kernels; `threads` 1: this thread only).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
    accumulate: bool,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    alpha: f32,
    threads: usize,
) {
    assert!(c.len() >= m * n, "gemm destination out of bounds");
    // SAFETY: `c` holds m rows of n (checked above) and is borrowed mutably.
    unsafe {
        gemm_strided(
            (m, n, k),
            c.as_mut_ptr(),
            n,
            accumulate,
            a,
            b,
            alpha,
            threads,
        )
    }
}

/// `gemm` into m rows of n floats at `c` with row stride `ldc` (a block of a wider matrix, such
/// as one attention head's columns).
///
/// # Safety
/// `c` is valid for those writes, and no other thread reads or writes them meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    alpha: f32,
    threads: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        if !accumulate {
            for r in 0..m {
                // SAFETY: row r of the block the caller gave.
                unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), n).fill(0.0) };
            }
        }
        return;
    }
    let extent = |(s, rs, cs): (&[f32], usize, usize), r: usize, c: usize| {
        s.len() > (r - 1) * rs + (c - 1) * cs
    };
    assert!(
        extent(a, m, k) && extent(b, k, n),
        "gemm operands out of bounds"
    );
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the operand extents were checked against their slices; `c` is the caller's.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            accumulate,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
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
        let (rows, din) = xl.shape().dims2()?;
        let (dout, wdin) = wl.shape().dims2()?;
        if wdin != din || bl.dims() != [dout] {
            candle_core::bail!(
                "linear: x {:?}, weight {:?}, bias {:?}",
                xl.dims(),
                wl.dims(),
                bl.dims()
            );
        }
        let [x, w, b] = operands(
            [
                crate::ops::cpu::contiguous::<f32>(xs, xl)?,
                crate::ops::cpu::contiguous::<f32>(ws, wl)?,
                crate::ops::cpu::contiguous::<f32>(bs, bl)?,
            ],
            self.round,
        );
        let mut y = Vec::with_capacity(rows * dout);
        for _ in 0..rows {
            y.extend_from_slice(&b);
        }
        gemm(
            (rows, dout, din),
            &mut y,
            true,
            (&x, din, 1),
            (&w, 1, din),
            1.0,
            threads(),
        );
        round_in_place(&mut y, self.round);
        Ok((CpuStorage::F32(y), Shape::from((rows, dout))))
    }

    /// Each gradient only when something upstream needs it: a frozen weight (LoRA's base, a
    /// detached tensor) costs no GEMM, and neither does the input of a first layer.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, din) = x.dims2()?;
        let dout = w.dim(0)?;
        let [want_x, want_w, want_b] = [x, w, b].map(Tensor::track_op);
        let (dx, dw, db) = crate::ops::cpu::with_f32(&[x, w, grad], |v| {
            let [xv, wv, g] = operands([v[0], v[1], v[2]], self.round);
            let (xv, wv, g) = (&*xv, &*wv, &*g);
            let rounded = |mut grad: Vec<f32>| {
                round_in_place(&mut grad, self.round);
                grad
            };
            let dx = want_x.then(|| {
                let mut dx = vec![0f32; rows * din];
                gemm(
                    (rows, din, dout),
                    &mut dx,
                    false,
                    (g, dout, 1),
                    (wv, din, 1),
                    1.0,
                    threads(),
                );
                rounded(dx)
            });
            let dw = want_w.then(|| {
                let mut dw = vec![0f32; dout * din];
                gemm(
                    (dout, din, rows),
                    &mut dw,
                    false,
                    (g, 1, dout),
                    (xv, din, 1),
                    1.0,
                    threads(),
                );
                rounded(dw)
            });
            let db = want_b.then(|| {
                let mut db = vec![0f32; dout];
                for row in g.chunks(dout) {
                    db.iter_mut().zip(row).for_each(|(s, v)| *s += v);
                }
                rounded(db)
            });
            Ok((dx, dw, db))
        })?;
        let dev = grad.device();
        Ok((
            dx.map(|v| Tensor::from_vec(v, (rows, din), dev))
                .transpose()?,
            dw.map(|v| Tensor::from_vec(v, (dout, din), dev))
                .transpose()?,
            db.map(|v| Tensor::from_vec(v, dout, dev)).transpose()?,
        ))
    }
}

/// A LoRA-adapted linear layer, `y = x·Wᵀ + b + low·Bᵀ` with `low = s·drop(x)·Aᵀ` (rows, r)
/// computed before, as one op: the frozen `weight` (and `bias`, when frozen too) are held by the
/// op, not its inputs, so the backward computes no gradient for them, and the output is the only
/// full-size tensor made (as ops, the update, its scale and the sum were three more, each kept
/// for the backward). ∂x = ∂y·W, ∂low = ∂y·B, ∂B = ∂yᵀ·low. Other devices and dtypes use ops.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    low: &Tensor,
    b: &Tensor,
) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let round = crate::ops::precision::autocast_dtype();
        let frozen_bias = bias.filter(|b| !b.track_op()).cloned();
        let op = LoraLinear {
            weight: weight.clone(),
            bias: frozen_bias.clone(),
            round,
        };
        let y = x
            .contiguous()?
            .apply_op3(&low.contiguous()?, &b.contiguous()?, op)?;
        return match bias.filter(|_| frozen_bias.is_none()) {
            Some(trained) => y.broadcast_add(trained),
            None => Ok(y),
        };
    }
    let y = match bias {
        Some(bias) => crate::ops::precision::matmul_add(x, &weight.t()?, bias)?,
        None => crate::ops::precision::matmul(x, &weight.t()?)?,
    };
    y + crate::ops::precision::matmul(low, &b.t()?)?
}

struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    round: Option<DType>,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ls: &CpuStorage,
        ll: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, din) = xl.shape().dims2()?;
        let (dout, rank) = bl.shape().dims2()?;
        if self.weight.dims() != [dout, din] || ll.dims() != [rows, rank] {
            candle_core::bail!(
                "lora_linear: x {:?}, weight {:?}, low {:?}, B {:?}",
                xl.dims(),
                self.weight.dims(),
                ll.dims(),
                bl.dims()
            );
        }
        let mut held = vec![self.weight.contiguous()?];
        held.extend(
            self.bias
                .iter()
                .map(Tensor::contiguous)
                .collect::<Result<Vec<_>>>()?,
        );
        crate::ops::cpu::with_f32(&held.iter().collect::<Vec<_>>(), |frozen| {
            let [x, low, b, w] = operands(
                [
                    crate::ops::cpu::contiguous::<f32>(xs, xl)?,
                    crate::ops::cpu::contiguous::<f32>(ls, ll)?,
                    crate::ops::cpu::contiguous::<f32>(bs, bl)?,
                    frozen[0],
                ],
                self.round,
            );
            let mut y = match frozen.get(1) {
                Some(bias) => {
                    let [bias] = operands([*bias], self.round);
                    let mut y = Vec::with_capacity(rows * dout);
                    for _ in 0..rows {
                        y.extend_from_slice(&bias);
                    }
                    y
                }
                None => vec![0f32; rows * dout],
            };
            gemm(
                (rows, dout, din),
                &mut y,
                true,
                (&x, din, 1),
                (&w, 1, din),
                1.0,
                threads(),
            );
            gemm(
                (rows, dout, rank),
                &mut y,
                true,
                (&low, rank, 1),
                (&b, 1, rank),
                1.0,
                threads(),
            );
            round_in_place(&mut y, self.round);
            Ok((CpuStorage::F32(y), Shape::from((rows, dout))))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        low: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, din) = x.dims2()?;
        let (dout, rank) = b.dims2()?;
        let want_x = x.track_op();
        let weight = self.weight.contiguous()?;
        let (dx, dlow, db) = crate::ops::cpu::with_f32(&[low, b, grad, &weight], |v| {
            let [low, b, g, w] = operands([v[0], v[1], v[2], v[3]], self.round);
            let (low, b, g, w) = (&*low, &*b, &*g, &*w);
            let product = |(m, n, k), a, bm| {
                let mut out = vec![0f32; m * n];
                gemm((m, n, k), &mut out, false, a, bm, 1.0, threads());
                round_in_place(&mut out, self.round);
                out
            };
            let dx = want_x.then(|| product((rows, din, dout), (g, dout, 1), (w, din, 1)));
            let dlow = product((rows, rank, dout), (g, dout, 1), (b, rank, 1));
            let db = product((dout, rank, rows), (g, 1, dout), (low, rank, 1));
            Ok((dx, dlow, db))
        })?;
        let dev = grad.device();
        Ok((
            dx.map(|v| Tensor::from_vec(v, (rows, din), dev))
                .transpose()?,
            Some(Tensor::from_vec(dlow, (rows, rank), dev)?),
            Some(Tensor::from_vec(db, (dout, rank), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Under autocast the op's own rounding (of operands, gradients and output) gives exactly
    /// what cast ops around the f32 op give (the GPU's path, and this op's before it rounded
    /// itself), bit for bit, for bf16 and fp16.
    #[test]
    fn rounding_inside_the_op_equals_cast_ops_around_it() -> Result<()> {
        use crate::ops::precision::{round_tensor, Autocast};
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (37, 19), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (23, 19), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 23, &dev)?)?;
        let r = Tensor::randn(0f32, 1.0, (37, 23), &dev)?;
        for dtype in [DType::BF16, DType::F16] {
            let inside = {
                let _amp = Autocast::enter(Some(dtype));
                linear(x.as_tensor(), w.as_tensor(), b.as_tensor())?
            };
            let round = |t: &Tensor| round_tensor(t, Some(dtype));
            let around = round(&linear(
                &round(x.as_tensor())?,
                &round(w.as_tensor())?,
                &round(b.as_tensor())?,
            )?)?;
            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                Ok(t.flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|v| v.to_bits())
                    .collect())
            };
            assert_eq!(bits(&inside)?, bits(&around)?, "{dtype:?} forward");
            let gi = (&inside * &r)?.sum_all()?.backward()?;
            let ga = (&around * &r)?.sum_all()?.backward()?;
            for (name, var) in [("x", &x), ("w", &w), ("b", &b)] {
                let (a, b) = (gi.get(var).unwrap(), ga.get(var).unwrap());
                assert_eq!(bits(a)?, bits(b)?, "{dtype:?} d{name}");
            }
        }
        Ok(())
    }

    /// Output and gradients equal Candle's matmul + broadcast add.
    #[test]
    fn fused_linear_equals_candles_ops_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (37, 19), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (23, 19), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 23, &dev)?)?;
        let r = Tensor::randn(0f32, 1.0, (37, 23), &dev)?;
        let fused = linear(x.as_tensor(), w.as_tensor(), b.as_tensor())?;
        let plain = x
            .as_tensor()
            .matmul(&w.as_tensor().t()?)?
            .broadcast_add(b.as_tensor())?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert!(diff(&fused, &plain)? < 1e-5);
        let gf = (&fused * &r)?.sum_all()?.backward()?;
        let gp = (&plain * &r)?.sum_all()?.backward()?;
        for (name, var) in [("x", &x), ("w", &w), ("b", &b)] {
            let e = diff(gf.get(var).unwrap(), gp.get(var).unwrap())?;
            assert!(e < 1e-4, "d{name}: {e}");
        }
        Ok(())
    }

    /// The fused LoRA linear equals x·Wᵀ + b + low·Bᵀ in Candle's ops, forward and backward
    /// (∂x, ∂low, ∂B), with a frozen bias (held by the op), a trained one (added after it) and
    /// none; the frozen weight gets no gradient.
    #[test]
    fn lora_linear_equals_candles_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (37, 19), &dev)?)?;
        let low = Var::from_tensor(&Tensor::randn(0f32, 1.0, (37, 3), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (23, 3), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (23, 19), &dev)?;
        let bias_var = Var::from_tensor(&Tensor::randn(0f32, 1.0, 23, &dev)?)?;
        let frozen_bias = bias_var.as_tensor().detach();
        let r = Tensor::randn(0f32, 1.0, (37, 23), &dev)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        for bias in [None, Some(&frozen_bias), Some(bias_var.as_tensor())] {
            let fused = lora_linear(x.as_tensor(), &w, bias, low.as_tensor(), b.as_tensor())?;
            let mut plain =
                (x.as_tensor().matmul(&w.t()?)? + low.as_tensor().matmul(&b.as_tensor().t()?)?)?;
            if let Some(bias) = bias {
                plain = plain.broadcast_add(bias)?;
            }
            assert!(diff(&fused, &plain)? < 1e-5);
            let gf = (&fused * &r)?.sum_all()?.backward()?;
            let gp = (&plain * &r)?.sum_all()?.backward()?;
            for (name, var) in [("x", &x), ("low", &low), ("B", &b)] {
                let e = diff(gf.get(var).unwrap(), gp.get(var).unwrap())?;
                assert!(e < 1e-4, "d{name}: {e}");
            }
            let trained_bias = bias.is_some_and(|t| t.is_variable());
            assert_eq!(gf.get(bias_var.as_tensor()).is_some(), trained_bias);
            if trained_bias {
                let e = diff(gf.get(&bias_var).unwrap(), gp.get(&bias_var).unwrap())?;
                assert!(e < 1e-4, "dbias: {e}");
            }
        }
        Ok(())
    }
}
