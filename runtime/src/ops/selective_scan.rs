//! The selective scan of Mamba (mamba-ssm's `selective_scan_fn`, whose definition is its pure
//! PyTorch `selective_scan_ref`) as one op with its backward, for LocalMamba's SS2D. Per batch
//! b and channel d, with the state h ∈ ℝᴺ starting at 0 and B, C shared by the D/G channels of
//! each group g (VMamba's scan directions):
//!   δₗ = softplus(Δₗ + bias)   (Δₗ + bias without `delta_softplus`)
//!   hₗ = exp(δₗA) ∘ hₗ₋₁ + δₗ uₗ Bₗ,   yₗ = Cₗ·hₗ + D uₗ
//! and backward, with the adjoint λ of h run from the end (λ ← λ ∘ exp(δA) after each step):
//!   λ += dyₗ Cₗ,  dCₗ += dyₗ hₗ,  dBₗ += δ uₗ λ,  duₗ = δ Bₗ·λ + D dyₗ,
//!   dA += δ exp(δA) ∘ hₗ₋₁ ∘ λ,  dδₗ = λ·(A ∘ exp(δA) ∘ hₗ₋₁ + Bₗ uₗ)
//! with dδ taken through the softplus to Δ and the bias.
//! The state stays in f32 whatever the autocast. The forward keeps nothing; the backward
//! recomputes the states chunk by chunk ([`CHUNK`] steps), keeping one state per chunk instead of
//! the L×N states of every channel. Threads take (batch, group) pairs, which own their slices
//! of dB and dC; dA, dD and the bias gradient are summed over the batch after. The loops over N
//! run on the widest vector unit.
//!
//! Candle's custom ops take at most three inputs, so the seven are packed into one vector (a
//! copy of the inputs, small next to the scan) and the packed gradient is split by Candle's
//! `cat` backward. On a GPU the same packed vectors go through runtime/kernels/scan.cu (one warp
//! per 32 channels of a group, the state in registers, the backward's states saved per tile).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::ops::cpu::{dot, exp_f32, on_threads, vectorised, Blocks};

/// Steps between the states the backward keeps.
const CHUNK: usize = 64;

/// The scan's sizes: batch, channels, state size, groups, length.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Dims {
    batch: usize,
    channels: usize,
    state: usize,
    groups: usize,
    len: usize,
}

impl Dims {
    /// Offsets of u, Δ, A, B, C, D, bias in the packed vector, and its length.
    fn offsets(&self) -> [usize; 8] {
        let bdl = self.batch * self.channels * self.len;
        let bgnl = self.batch * self.groups * self.state * self.len;
        let sizes = [
            bdl,
            bdl,
            self.channels * self.state,
            bgnl,
            bgnl,
            self.channels,
            self.channels,
        ];
        let mut out = [0; 8];
        for (i, s) in sizes.iter().enumerate() {
            out[i + 1] = out[i] + s;
        }
        out
    }
}

/// The selective scan of u, Δ (B, D, L) with A (D, N), B and C (B, G, N, L), D and the Δ bias
/// (D); `delta_softplus` as mamba-ssm's flag. Returns y (B, D, L) in f32.
#[allow(clippy::too_many_arguments)]
pub fn selective_scan(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: &Tensor,
    delta_bias: &Tensor,
    delta_softplus: bool,
) -> Result<Tensor> {
    let (batch, channels, len) = u.dims3()?;
    let (_, state) = a.dims2()?;
    let (_, groups, _, _) = b.dims4()?;
    let dims = Dims {
        batch,
        channels,
        state,
        groups,
        len,
    };
    let expect = |t: &Tensor, want: &[usize], name: &str| -> Result<()> {
        if t.dims() != want {
            candle_core::bail!(
                "selective scan: {name} is {:?}, expected {want:?}",
                t.dims()
            );
        }
        Ok(())
    };
    expect(delta, &[batch, channels, len], "delta")?;
    expect(a, &[channels, state], "A")?;
    expect(b, &[batch, groups, state, len], "B")?;
    expect(c, &[batch, groups, state, len], "C")?;
    expect(d, &[channels], "D")?;
    expect(delta_bias, &[channels], "delta_bias")?;
    if groups == 0 || channels % groups != 0 {
        candle_core::bail!("selective scan: {channels} channels in {groups} groups");
    }
    let flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all();
    let packed = Tensor::cat(
        &[
            flat(u)?,
            flat(delta)?,
            flat(a)?,
            flat(b)?,
            flat(c)?,
            flat(d)?,
            flat(delta_bias)?,
        ],
        0,
    )?;
    packed.apply_op1(SelectiveScan {
        dims,
        softplus: delta_softplus,
    })
}

#[derive(Clone, Copy)]
struct SelectiveScan {
    dims: Dims,
    softplus: bool,
}

/// The backward: the packed gradient from the packed inputs and ∂L/∂y.
struct SelectiveScanBackward(SelectiveScan);

#[cfg(feature = "cuda")]
impl SelectiveScan {
    fn cuda_dims(&self) -> crate::ops::cuda::ScanDims {
        let d = self.dims;
        crate::ops::cuda::ScanDims {
            batch: d.batch,
            channels: d.channels,
            groups: d.groups,
            state: d.state,
            len: d.len,
            softplus: self.softplus,
        }
    }
}

/// The inputs of one (batch, group) unit, read from the packed vector.
struct Unit<'a> {
    x: &'a [f32],
    dims: Dims,
    /// `dims.offsets()`, once.
    off: [usize; 8],
    softplus: bool,
    b: usize,
    g: usize,
}

impl SelectiveScan {
    /// Unit `unit` (its batch and group) of the packed inputs `x`.
    fn unit<'a>(&self, x: &'a [f32], unit: usize) -> Unit<'a> {
        Unit {
            x,
            dims: self.dims,
            off: self.dims.offsets(),
            softplus: self.softplus,
            b: unit / self.dims.groups,
            g: unit % self.dims.groups,
        }
    }
}

impl Unit<'_> {
    fn at(&self, which: usize) -> usize {
        self.off[which]
    }

    /// Channel `ch`'s row of a (B, D, L) input (0 = u, 1 = Δ).
    fn row(&self, which: usize, ch: usize) -> &[f32] {
        let l = self.dims.len;
        &self.x[self.at(which) + (self.b * self.dims.channels + ch) * l..][..l]
    }

    /// This unit's (N, L) slice of B (3) or C (4), transposed to (L, N).
    fn transposed(&self, which: usize, out: &mut [f32]) {
        let (n, l) = (self.dims.state, self.dims.len);
        let src = &self.x[self.at(which) + (self.b * self.dims.groups + self.g) * n * l..][..n * l];
        for s in 0..n {
            for t in 0..l {
                out[t * n + s] = src[s * l + t];
            }
        }
    }

    /// δ at each step of channel `ch`, and ∂δ/∂(Δ + bias).
    fn deltas(&self, ch: usize, delta: &mut [f32], slope: &mut [f32]) {
        let bias = self.x[self.at(6) + ch];
        for ((d, s), raw) in delta.iter_mut().zip(slope.iter_mut()).zip(self.row(1, ch)) {
            let v = raw + bias;
            if self.softplus {
                // PyTorch's softplus (threshold 20: the identity above it).
                (*d, *s) = if v > 20.0 {
                    (v, 1.0)
                } else {
                    (v.exp().ln_1p(), 1.0 / (1.0 + (-v).exp()))
                };
            } else {
                (*d, *s) = (v, 1.0);
            }
        }
    }
}

/// One step of the state: h ← exp(δA) ∘ h + δ·u·B; returns C·h.
#[inline(always)]
fn step(h: &mut [f32], a: &[f32], bl: &[f32], cl: &[f32], delta: f32, u: f32) -> f32 {
    for ((h, &a), &b) in h.iter_mut().zip(a).zip(bl) {
        *h = exp_f32(delta * a) * *h + delta * u * b;
    }
    dot(h, cl)
}

vectorised! {
    /// Steps `from..to` of a channel's scan from the state `h`: the forward writes yₜ + D·uₜ
    /// into `y[t]`; the backward's replay keeps the state after each step in `states`.
    fn scan(
        h: &mut [f32],
        a: &[f32],
        bt: &[f32],
        ct: &[f32],
        delta: &[f32],
        u: &[f32],
        d: f32,
        from: usize,
        to: usize,
        y: Option<&mut [f32]>,
        states: Option<&mut [f32]>,
    ) {
        let (mut y, mut states) = (y, states);
        let n = h.len();
        for t in from..to {
            let yt = step(h, a, &bt[t * n..][..n], &ct[t * n..][..n], delta[t], u[t]);
            if let Some(y) = y.as_deref_mut() {
                y[t] = yt + d * u[t];
            }
            if let Some(s) = states.as_deref_mut() {
                s[(t - from) * n..][..n].copy_from_slice(h);
            }
        }
    }
}

vectorised! {
    /// Steps `to - 1` down to `from` backward through one chunk whose states are `hs` (the state
    /// after each of its steps) and `h0` (the state before it): λ (the adjoint of the state)
    /// gathers dyₜ·Cₜ, then gives dCₜ, dBₜ, dA, and ∂L/∂δₜ, ∂L/∂uₜ's scan part into
    /// `d_delta[t]`, `d_u[t]`; λ ← λ ∘ exp(δA). `scratch` holds 2N floats.
    fn scan_back(
        lambda: &mut [f32],
        hs: &[f32],
        h0: &[f32],
        a: &[f32],
        bt: &[f32],
        ct: &[f32],
        delta: &[f32],
        u: &[f32],
        dy: &[f32],
        from: usize,
        to: usize,
        dbt: &mut [f32],
        dct: &mut [f32],
        da: &mut [f32],
        d_delta: &mut [f32],
        d_u: &mut [f32],
        scratch: &mut [f32],
    ) {
        let n = lambda.len();
        let (decay, weighted) = scratch.split_at_mut(n);
        for t in (from..to).rev() {
            let i0 = (t - from) * n;
            let h_t = &hs[i0..][..n];
            let h_prev = if t > from { &hs[i0 - n..][..n] } else { h0 };
            let (bl, cl) = (&bt[t * n..][..n], &ct[t * n..][..n]);
            let (dbl, dcl) = (&mut dbt[t * n..][..n], &mut dct[t * n..][..n]);
            let (dl, ul, g) = (delta[t], u[t], dy[t]);
            for i in 0..n {
                lambda[i] += g * cl[i];
                dcl[i] += g * h_t[i];
                decay[i] = exp_f32(dl * a[i]);
            }
            // ∂δ = λ·(A ∘ exp(δA) ∘ hₜ₋₁) + uₜ λ·Bₜ and ∂u = δ λ·Bₜ, before λ moves on.
            let lambda_b = dot(lambda, bl);
            for i in 0..n {
                weighted[i] = lambda[i] * a[i] * decay[i];
            }
            d_delta[t] = dot(weighted, h_prev) + ul * lambda_b;
            d_u[t] = dl * lambda_b;
            for i in 0..n {
                da[i] += lambda[i] * dl * decay[i] * h_prev[i];
                dbl[i] += lambda[i] * dl * ul;
                lambda[i] *= decay[i];
            }
        }
    }
}

impl CustomOp1 for SelectiveScan {
    fn name(&self) -> &'static str {
        "selective-scan"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::ops::cpu::contiguous::<f32>(s, l)?;
        let Dims {
            batch,
            channels,
            state: n,
            groups,
            len,
        } = self.dims;
        let per_group = channels / groups;
        let mut out = vec![0f32; batch * channels * len];
        let o = Blocks::new(&mut out);
        on_threads(
            batch * groups,
            2 * len * n + 3 * len + n,
            |unit, scratch| {
                let u = self.unit(x, unit);
                let (bt, rest) = scratch.split_at_mut(len * n);
                let (ct, rest) = rest.split_at_mut(len * n);
                let (delta, rest) = rest.split_at_mut(len);
                let (slope, rest) = rest.split_at_mut(len);
                let h = &mut rest[..n];
                u.transposed(3, bt);
                u.transposed(4, ct);
                for ch in u.g * per_group..(u.g + 1) * per_group {
                    u.deltas(ch, delta, slope);
                    let a = &x[u.at(2) + ch * n..][..n];
                    h.fill(0.0);
                    // SAFETY: channel `ch` of sample b: this unit's channels, written by it only.
                    let y = unsafe { o.block((u.b * channels + ch) * len, len) };
                    scan(
                        h,
                        a,
                        bt,
                        ct,
                        delta,
                        u.row(0, ch),
                        x[u.at(5) + ch],
                        0,
                        len,
                        Some(y),
                        None,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((batch, channels, len))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let Dims {
            batch,
            channels,
            len,
            ..
        } = self.dims;
        let y = crate::ops::cuda::selective_scan_forward((s, l), self.cuda_dims())?;
        Ok((y, Shape::from((batch, channels, len))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        Ok(Some(
            arg.apply_op2_no_bwd(&grad, &SelectiveScanBackward(*self))?,
        ))
    }
}

impl CustomOp2 for SelectiveScanBackward {
    fn name(&self) -> &'static str {
        "selective-scan-backward"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let packed =
            crate::ops::cuda::selective_scan_backward((xs, xl), (gs, gl), self.0.cuda_dims())?;
        Ok((packed, Shape::from(self.0.dims.offsets()[7])))
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let this = &self.0;
        let dims = this.dims;
        let Dims {
            batch,
            channels,
            state: n,
            groups,
            len,
        } = dims;
        let per_group = channels / groups;
        let off = dims.offsets();
        let mut packed = vec![0f32; off[7]];
        // dA, dD and dbias per sample, summed over the batch below.
        let per_sample = channels * n + 2 * channels;
        let mut partial = vec![0f32; batch * per_sample];
        let chunks = len.div_ceil(CHUNK);
        {
            let x = crate::ops::cpu::contiguous::<f32>(xs, xl)?;
            let dy = crate::ops::cpu::contiguous::<f32>(gs, gl)?;
            let pk = Blocks::new(&mut packed);
            let pa = Blocks::new(&mut partial);
            let scratch = 4 * len * n + 4 * len + (chunks + 5) * n + CHUNK * n;
            on_threads(batch * groups, scratch, |unit, buf| {
                let u = this.unit(x, unit);
                let (bt, rest) = buf.split_at_mut(len * n);
                let (ct, rest) = rest.split_at_mut(len * n);
                let (dbt, rest) = rest.split_at_mut(len * n);
                let (dct, rest) = rest.split_at_mut(len * n);
                let (delta, rest) = rest.split_at_mut(len);
                let (slope, rest) = rest.split_at_mut(len);
                let (d_u, rest) = rest.split_at_mut(len);
                let (saved, rest) = rest.split_at_mut((chunks + 1) * n);
                let (lambda, rest) = rest.split_at_mut(n);
                let (d_delta, rest) = rest.split_at_mut(len);
                let (step_scratch, rest) = rest.split_at_mut(2 * n);
                let (replay, rest) = rest.split_at_mut(n);
                let hs = &mut rest[..CHUNK * n];
                u.transposed(3, bt);
                u.transposed(4, ct);
                dbt.fill(0.0);
                dct.fill(0.0);
                // Sample b's partial sums of dA, dD and dbias at channel ch: written by this
                // unit only (each channel is in one group).
                let base = u.b * per_sample;
                for ch in u.g * per_group..(u.g + 1) * per_group {
                    u.deltas(ch, delta, slope);
                    let a = &x[u.at(2) + ch * n..][..n];
                    let dd = x[u.at(5) + ch];
                    let ur = u.row(0, ch);
                    let gy = &dy[(u.b * channels + ch) * len..][..len];
                    // The state before each chunk.
                    saved[..n].fill(0.0);
                    for k in 0..chunks {
                        let (done, next) = saved.split_at_mut((k + 1) * n);
                        let h = &mut next[..n];
                        h.copy_from_slice(&done[k * n..]);
                        scan(
                            h,
                            a,
                            bt,
                            ct,
                            delta,
                            ur,
                            0.0,
                            k * CHUNK,
                            ((k + 1) * CHUNK).min(len),
                            None,
                            None,
                        );
                    }
                    lambda.fill(0.0);
                    // SAFETY: see `base`.
                    let da = unsafe { pa.block(base + ch * n, n) };
                    for k in (0..chunks).rev() {
                        let (start, end) = (k * CHUNK, ((k + 1) * CHUNK).min(len));
                        // Replay the chunk from its saved state, keeping each step's state.
                        let h0 = &saved[k * n..][..n];
                        replay.copy_from_slice(h0);
                        scan(
                            replay,
                            a,
                            bt,
                            ct,
                            delta,
                            ur,
                            0.0,
                            start,
                            end,
                            None,
                            Some(&mut *hs),
                        );
                        scan_back(
                            lambda,
                            hs,
                            h0,
                            a,
                            bt,
                            ct,
                            delta,
                            ur,
                            gy,
                            start,
                            end,
                            dbt,
                            dct,
                            da,
                            d_delta,
                            d_u,
                            step_scratch,
                        );
                    }
                    let (mut d_d, mut d_bias) = (0f32, 0f32);
                    // SAFETY: Δ's row of channel ch in sample b: this unit's only.
                    let d_raw = unsafe { pk.block(off[1] + (u.b * channels + ch) * len, len) };
                    for t in 0..len {
                        d_raw[t] = d_delta[t] * slope[t];
                        d_bias += d_raw[t];
                        d_u[t] += dd * gy[t];
                        d_d += gy[t] * ur[t];
                    }
                    // SAFETY: u's row of channel ch in sample b, and the partial sums: this
                    // unit's only.
                    unsafe {
                        pk.block(off[0] + (u.b * channels + ch) * len, len)
                            .copy_from_slice(d_u);
                        *pa.at(base + channels * n + ch) += d_d;
                        *pa.at(base + channels * n + channels + ch) += d_bias;
                    }
                }
                // dB and dC of this (batch, group), back to (N, L).
                for (which, src) in [(3usize, &*dbt), (4, &*dct)] {
                    let base = off[which] + (u.b * groups + u.g) * n * len;
                    // SAFETY: this unit's (N, L) slice.
                    let dst = unsafe { pk.block(base, n * len) };
                    for s in 0..n {
                        for t in 0..len {
                            dst[s * len + t] = src[t * n + s];
                        }
                    }
                }
            });
        }
        for sample in partial.chunks(per_sample) {
            let (da, rest) = sample.split_at(channels * n);
            let (dd, db) = rest.split_at(channels);
            for (dst, src) in [(off[2], da), (off[5], dd), (off[6], db)] {
                for (o, v) in packed[dst..dst + src.len()].iter_mut().zip(src) {
                    *o += v;
                }
            }
        }
        Ok((CpuStorage::F32(packed), Shape::from(off[7])))
    }
}
