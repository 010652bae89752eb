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
}
