//! 8-bit AdamW (`optimizer.name = "adamw_8bit"`): the moments stored in one byte each, as
//! bitsandbytes' block-wise 8-bit Adam keeps them (Dettmers et al., "8-bit Optimizers via
//! Block-wise Quantization", 2022).
//!
//! Each tensor's moments are cut into blocks of [`BLOCK`] values. A block stores, per value, the
//! index of the nearest code of a 256-entry dynamic map (signed for the first moment, unsigned
//! for the second), and one f32: the block's largest magnitude, by which the codes are scaled.
//! The dynamic map spends its codes on an exponent, so small moments keep their relative
//! precision next to large ones. A step dequantises a block, takes the AdamW step in f32,
//! finds the block's new largest magnitude and quantises again. State: 2 bytes per value plus
//! 8 bytes per block of 256 (2.03 bytes per parameter, against 8 for f32 AdamW). Tensors of
//! fewer than [`MIN_8BIT_SIZE`] values keep f32 moments, as bitsandbytes does (their share of
//! the state is small, their biases and norms sensitive).
//!
//! Against bitsandbytes' CUDA kernel, on purpose: the weight decay is applied before the step,
//! as our f32 AdamW and PyTorch's do (bitsandbytes decays after; the two differ by lr²·wd); the
//! nearest code is found exactly (bitsandbytes' search may pick the farther neighbour of a value
//! that falls within rounding of a midpoint). Like bitsandbytes, a first moment never changes
//! sign by rounding: its code moves one step toward it instead.
//!
//! The state lives in host memory and the update runs on the CPU threads, whatever the
//! training device: on a GPU the gradients come down and the parameters go back up once per
//! step (no CUDA kernel yet), and the GPU holds no optimizer state at all.

use std::sync::LazyLock;

/// Values per quantisation block (bitsandbytes' block-wise optimizers use 256).
pub const BLOCK: usize = 256;
/// Tensors with fewer values keep f32 moments (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;

/// bitsandbytes' `create_dynamic_map(signed)` (8 bits, 7 exponent bits), ascending: for each
/// decade 10⁻⁶..10⁰, the midpoints of an even split of [0.1, 1] into 2^i (signed: both signs) or
/// 2^(i+1) (unsigned) parts, then 0 and 1. The values are computed in f32 as torch does.
fn dynamic_map(signed: bool) -> [f32; 256] {
    let mut codes = Vec::with_capacity(256);
    for i in 0..7i32 {
        let parts = if signed {
            1usize << i
        } else {
            1usize << (i + 1)
        };
        let scale = 10f64.powi(i - 6) as f32;
        let bounds = linspace_f32(0.1, 1.0, parts + 1);
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            codes.push(scale * mean);
            if signed {
                codes.push(-(scale * mean));
            }
        }
    }
    codes.push(0.0);
    codes.push(1.0);
    codes.sort_by(f32::total_cmp);
    codes
        .try_into()
        .expect("7 decades of 127 or 254 codes, 0 and 1: 256 codes")
}

/// torch.linspace for f32 on the CPU, to the bit: the step in f32, the first half counted up
/// from `start` and the second down from `end`, each value one fused multiply-add (as its
/// vectorised kernel computes them).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| match i < half {
            true => step.mul_add(i as f32, start),
            false => (-step).mul_add((steps - i - 1) as f32, end),
        })
        .collect()
}

/// A dynamic map and its search table.
pub struct Map {
    /// The 256 codes, ascending.
    pub codes: [f32; 256],
    /// For each 16-bit prefix of an f32 (sign, exponent, 7 mantissa bits), the last code below
    /// every value with that prefix (0 when none is).
    below: Vec<u8>,
}

impl Map {
    fn new(codes: [f32; 256]) -> Self {
        let below = (0..1u32 << 16)
            .map(|prefix| {
                // The prefix's lowest value: its smallest magnitude when positive, largest when
                // negative.
                let low_bits = if prefix & 0x8000 == 0 { 0 } else { 0xffff };
                let lowest = f32::from_bits(prefix << 16 | low_bits);
                codes.partition_point(|&c| c < lowest).saturating_sub(1) as u8
            })
            .collect();
        Map { codes, below }
    }

    /// The index of the code nearest `x` (the lower one on a tie). The table gives the last code
    /// below x's prefix; a code lies within one prefix's span at most once or twice, so a step or
    /// two finds the last code below x. (A binary search, branch-free or not, cost the DiT
    /// quickstart's step half again: its eight dependent loads per value are the step's
    /// critical path.)
    #[inline]
    pub fn nearest(&self, x: f32) -> u8 {
        let c = &self.codes;
        let mut below = self.below[(x.to_bits() >> 16) as usize] as usize;
        while below < 255 && c[below + 1] < x {
            below += 1;
        }
        let above = (below + 1).min(255);
        match x - c[below] <= c[above] - x {
            true => below as u8,
            false => above as u8,
        }
    }
}

/// The first moment's codes, in [-1, 1].
pub static SIGNED: LazyLock<Map> = LazyLock::new(|| Map::new(dynamic_map(true)));
/// The second moment's codes, in [0, 1].
pub static UNSIGNED: LazyLock<Map> = LazyLock::new(|| Map::new(dynamic_map(false)));

/// Quantise `values` into code indices of `map` scaled by their largest magnitude, which it
/// returns (bitsandbytes' `quantize_blockwise` for one block). A block of zeros stores the zero
/// code.
pub fn quantize_block(map: &Map, values: &[f32], out: &mut [u8]) -> f32 {
    let absmax = values.iter().fold(0f32, |a, v| a.max(v.abs()));
    let zero = map.nearest(0.0);
    for (q, &v) in out.iter_mut().zip(values) {
        *q = match absmax > 0.0 {
            true => map.nearest(v / absmax),
            false => zero,
        };
    }
    absmax
}

/// The step's constants: learning rate, betas, ε, weight decay, and the bias corrections
/// 1 − β1^t and 1 − β2^t.
#[derive(Debug, Clone, Copy)]
pub struct Hyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub bc1: f32,
    pub bc2: f32,
}

/// A tensor's moments, 8-bit: per value a code index, per block of [`BLOCK`] its scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub m: Vec<u8>,
    pub v: Vec<u8>,
    pub m_absmax: Vec<f32>,
    pub v_absmax: Vec<f32>,
}

impl Moments {
    /// Zero moments for `n` values.
    pub fn zeros(n: usize) -> Self {
        let blocks = n.div_ceil(BLOCK);
        Moments {
            m: vec![SIGNED.nearest(0.0); n],
            v: vec![UNSIGNED.nearest(0.0); n],
            m_absmax: vec![0.0; blocks],
            v_absmax: vec![0.0; blocks],
        }
    }

    /// Bytes of state.
    pub fn bytes(&self) -> usize {
        self.m.len() + self.v.len() + 4 * (self.m_absmax.len() + self.v_absmax.len())
    }

    /// One AdamW step of the parameter `p` with gradient `g`, block by block on Candle's threads.
    pub fn step(&mut self, p: &mut [f32], g: &[f32], h: &Hyper) {
        assert_eq!(p.len(), self.m.len(), "parameter and state sizes");
        assert_eq!(g.len(), p.len(), "parameter and gradient sizes");
        if p.is_empty() {
            return;
        }
        let blocks = self.m_absmax.len();
        let threads = candle_core::utils::get_num_threads().clamp(1, blocks.max(1));
        let per = blocks.div_ceil(threads) * BLOCK;
        let parts = p
            .chunks_mut(per)
            .zip(g.chunks(per))
            .zip(self.m.chunks_mut(per).zip(self.v.chunks_mut(per)))
            .zip(
                self.m_absmax
                    .chunks_mut(per / BLOCK)
                    .zip(self.v_absmax.chunks_mut(per / BLOCK)),
            );
        rayon::scope(|s| {
            for (((p, g), (m, v)), (ma, va)) in parts {
                s.spawn(move |_| {
                    let blocks = p
                        .chunks_mut(BLOCK)
                        .zip(g.chunks(BLOCK))
                        .zip(m.chunks_mut(BLOCK).zip(v.chunks_mut(BLOCK)))
                        .zip(ma.iter_mut().zip(va.iter_mut()));
                    for (((p, g), (m, v)), (ma, va)) in blocks {
                        step_block(p, g, m, v, ma, va, h);
                    }
                });
            }
        });
    }
}

/// One block: dequantise, AdamW in f32 (decay first, as PyTorch), quantise again.
fn step_block(
    p: &mut [f32],
    g: &[f32],
    m: &mut [u8],
    v: &mut [u8],
    m_absmax: &mut f32,
    v_absmax: &mut f32,
    h: &Hyper,
) {
    let (signed, unsigned): (&Map, &Map) = (&SIGNED, &UNSIGNED);
    let mut m_new = [0f32; BLOCK];
    let mut v_new = [0f32; BLOCK];
    let n = p.len();
    let decay = 1.0 - h.lr * h.weight_decay;
    for i in 0..n {
        let mi = h.beta1 * (signed.codes[m[i] as usize] * *m_absmax) + (1.0 - h.beta1) * g[i];
        let vi =
            h.beta2 * (unsigned.codes[v[i] as usize] * *v_absmax) + (1.0 - h.beta2) * g[i] * g[i];
        p[i] = p[i] * decay - h.lr * (mi / h.bc1) / ((vi / h.bc2).sqrt() + h.eps);
        m_new[i] = mi;
        v_new[i] = vi;
    }
    *m_absmax = quantize_block(signed, &m_new[..n], m);
    *v_absmax = quantize_block(unsigned, &v_new[..n], v);
    // A first moment keeps its sign: a code of the other sign moves one step back toward it.
    for i in 0..n {
        let code = signed.codes[m[i] as usize];
        if m_new[i] > 0.0 && code < 0.0 {
            m[i] += 1;
        } else if m_new[i] < 0.0 && code > 0.0 {
            m[i] -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_maps_are_sorted_and_span_their_ranges() {
        for (codes, lo) in [(&SIGNED.codes, -1.0), (&UNSIGNED.codes, 0.0)] {
            assert!(codes.windows(2).all(|w| w[0] < w[1]), "strictly ascending");
            assert_eq!(codes[255], 1.0);
            assert!((codes[0] - lo).abs() < 0.01, "{} vs {lo}", codes[0]);
            assert!(codes.contains(&0.0));
        }
        // The smallest non-zero magnitude is in the 10⁻⁶ decade.
        let tiny = UNSIGNED.codes.iter().copied().find(|&c| c > 0.0).unwrap();
        assert!((1e-7..1e-6).contains(&tiny), "{tiny}");
    }

    #[test]
    fn nearest_picks_the_closest_code() {
        // Every code, the midpoints between neighbours and points near them, and a sweep.
        let mut xs: Vec<f32> = (-1000..=1000).map(|i| i as f32 / 1000.0).collect();
        for map in [&*SIGNED, &*UNSIGNED] {
            for w in map.codes.windows(2) {
                let mid = (w[0] + w[1]) / 2.0;
                xs.extend([w[0], w[1], mid, mid.next_down(), mid.next_up()]);
            }
        }
        xs.extend([1e-7, -3e-7, 2e-6, -4.4e-6, 0.0, -0.0]);
        for map in [&*SIGNED, &*UNSIGNED] {
            let c = &map.codes;
            for &x in &xs {
                let q = map.nearest(x) as usize;
                let best = (0..256)
                    .min_by(|&a, &b| (c[a] - x).abs().total_cmp(&(c[b] - x).abs()))
                    .unwrap();
                assert_eq!((c[q] - x).abs(), (c[best] - x).abs(), "x = {x}");
            }
        }
    }

    /// With the moments a step leaves, the parameter moves as f32 AdamW moves it; the 8-bit
    /// moments are the f32 ones within the map's resolution.
    #[test]
    fn a_step_follows_f32_adamw_within_the_quantisation_error() {
        let n = 3 * BLOCK + 17;
        let g: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 1e-2).collect();
        let h = Hyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            bc1: 0.1,
            bc2: 0.001,
        };
        let mut p: Vec<f32> = (0..n).map(|i| (i as f32 * 0.01).cos()).collect();
        let p0 = p.clone();
        let mut s = Moments::zeros(n);
        s.step(&mut p, &g, &h);
        for i in 0..n {
            // From zero moments, the first step is the f32 one exactly.
            let m = 0.1 * g[i];
            let v = 0.001 * g[i] * g[i];
            let want = p0[i] * (1.0 - 1e-5) - 1e-3 * (m / 0.1) / ((v / 0.001).sqrt() + 1e-8);
            assert!((p[i] - want).abs() < 1e-6, "{i}: {} vs {want}", p[i]);
            // The stored moments decode to the f32 ones within half a code gap (≤ 3.5 % of a
            // value near 1, relative to the block's largest).
            let b = i / BLOCK;
            let m_back = SIGNED.codes[s.m[i] as usize] * s.m_absmax[b];
            let v_back = UNSIGNED.codes[s.v[i] as usize] * s.v_absmax[b];
            assert!(
                (m_back - m).abs() <= 0.04 * s.m_absmax[b],
                "m {i}: {m_back} vs {m}"
            );
            assert!(
                (v_back - v).abs() <= 0.04 * s.v_absmax[b],
                "v {i}: {v_back} vs {v}"
            );
            assert_eq!(m_back.signum(), m.signum(), "m keeps its sign");
        }
        assert_eq!(s.bytes(), 2 * n + 8 * 4);
    }
}
