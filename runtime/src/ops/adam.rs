//! Adam(W)'s update on the CPU in place, as two passes over the moments and one over the
//! weights: m ← β₁·m + (1 − β₁)·g, v ← β₂·v + (1 − β₂)·g², then
//! θ ← decay·θ − lr·(m / bc₁) / (√(v / bc₂) + ε), where decay = 1 − lr·wd for AdamW (1 for Adam,
//! whose decay the caller folds into g). Written as Candle ops the same update allocated a
//! parameter-sized tensor for each of its dozen ops every step (fresh pages the kernel zeroes);
//! these write into the tensors' own storage, which the weights' twins share (nn::Params::sharing).
//! The CUDA twin is `ops::cuda::adam_step`. `update_in_place`, the moments' op, also runs a
//! caller's update (8-bit AdamW's) on the weights' storage.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

use super::cpu::on_row_chunks;

/// The step's constants.
#[derive(Debug, Clone, Copy)]
pub struct AdamHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1 − β₁ᵗ and 1 − β₂ᵗ.
    pub bc1: f32,
    pub bc2: f32,
    /// θ's factor before the step: 1 − lr·wd (AdamW), 1 (Adam).
    pub decay: f32,
}

/// `theta` updated in place with gradient `grad`, its moments `m` and `v` too (all f32 on the CPU,
/// the same shape).
pub fn adam_update(
    theta: &Tensor,
    grad: &Tensor,
    (m, v): (&Tensor, &Tensor),
    hp: &AdamHyper,
) -> Result<()> {
    let grad = grad.contiguous()?;
    running_average(m, &grad, hp.beta1, false)?;
    running_average(v, &grad, hp.beta2, true)?;
    theta.inplace_op3(m, v, &Weights(*hp))
}

/// A moment's running average, in place: m ← β·m + (1 − β)·g (g² when `squared`).
fn running_average(moment: &Tensor, grad: &Tensor, beta: f32, squared: bool) -> Result<()> {
    update_in_place(moment, grad, |moment, g| {
        on_row_chunks(moment, 1, |at, part| {
            let g = &g[at..at + part.len()];
            for (m, &g) in part.iter_mut().zip(g) {
                let g = if squared { g * g } else { g };
                *m = *m * beta + g * (1.0 - beta);
            }
        })
    })
}

/// `update(x, g)` on `x`'s own storage (f32 on the CPU, contiguous) with the gradient `grad`: the
/// moments above, and an update whose state the caller keeps (8-bit AdamW's quantised moments,
/// train/adamw_8bit.rs), without copying the tensor out and back.
pub fn update_in_place(
    x: &Tensor,
    grad: &Tensor,
    update: impl FnMut(&mut [f32], &[f32]) + Send,
) -> Result<()> {
    let grad = grad.contiguous()?;
    x.inplace_op2(&grad, &InPlace(std::sync::Mutex::new(update)))
}

/// A caller's update of a tensor, as an in-place op.
struct InPlace<F>(std::sync::Mutex<F>);

impl<F: FnMut(&mut [f32], &[f32]) + Send> InplaceOp2 for InPlace<F> {
    fn name(&self) -> &'static str {
        "update-in-place"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> Result<()> {
        let (x, g) = (
            slice_mut(dst, dst_l, self.name())?,
            slice(g, g_l, self.name())?,
        );
        if x.len() != g.len() {
            candle_core::bail!(
                "update-in-place: {} values against a gradient of {}",
                x.len(),
                g.len()
            );
        }
        let mut update = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("update-in-place: a poisoned lock".into()))?;
        update(x, g);
        Ok(())
    }
}

/// A contiguous f32 slice of a storage, or an error naming the op.
fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: needs contiguous f32 tensors"),
    }
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{op}: needs contiguous f32 tensors"),
    }
}

/// θ ← decay·θ − lr·(m / bc₁) / (√(v / bc₂) + ε).
struct Weights(AdamHyper);

impl InplaceOp3 for Weights {
    fn name(&self) -> &'static str {
        "adam-weights"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> Result<()> {
        let name = self.name();
        let (theta, m, v) = (
            slice_mut(dst, dst_l, name)?,
            slice(m, m_l, name)?,
            slice(v, v_l, name)?,
        );
        if theta.len() != m.len() || theta.len() != v.len() {
            candle_core::bail!(
                "adam-weights: {} weights against moments of {} and {}",
                theta.len(),
                m.len(),
                v.len()
            );
        }
        let hp = self.0;
        on_row_chunks(theta, 1, |at, part| {
            let n = part.len();
            let (m, v) = (&m[at..at + n], &v[at..at + n]);
            for ((t, &m), &v) in part.iter_mut().zip(m).zip(v) {
                *t = *t * hp.decay - (m / hp.bc1) / ((v / hp.bc2).sqrt() + hp.eps) * hp.lr;
            }
        });
        Ok(())
    }
}
