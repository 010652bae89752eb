//! The reference's log-frequency spectrogram and its 8-bit multichannel image
//! (`multichannel_spectrograms.py`), as spec/reference/data.md §3.2–3.5 describes it.
//!
//! Per channel: demean (keeping `dc = Σx/√len`), zero-pad, frames of N = 2R−1 samples every
//! `hop`, symmetric Hann, a dense DFT at 255 log-spaced positive frequencies scaled by 1/√N, the
//! DC row replaced by `dc`, and the negative-frequency half folded in (×2 for a real input).
//! Only the 256 rows that survive the fold are computed: the reference's full 511-row matrix
//! product does twice the work for the same numbers.

use std::f64::consts::PI;

/// Frequencies (cycles/sample) of the 256 output rows: 0, then 0.001 … 0.5 log-spaced.
pub fn log_frequencies(resolution: usize) -> Vec<f64> {
    let half = resolution - 1; // N // 2 with N = 2R - 1
    let (a, b) = (0.5f64.log10(), -3.0f64);
    // np.linspace(a, b, half) gives the negative side from -0.5 to -0.001; row k (k >= 1) is
    // its mirror, so it takes the exponent at index half - k.
    let e = |i: usize| {
        if half == 1 {
            a
        } else {
            a + (b - a) * i as f64 / (half - 1) as f64
        }
    };
    let mut f = vec![0.0];
    f.extend((1..=half).map(|k| 10f64.powf(e(half - k))));
    f
}

/// Symmetric Hann window of `n` points (numpy's `hanning`).
pub fn hann(n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| 0.5 - 0.5 * (2.0 * PI * i as f64 / (n - 1) as f64).cos())
        .collect()
}

/// Precomputed transform for one resolution and hop.
pub struct LogStft {
    pub resolution: usize,
    pub hop: usize,
    n: usize,
    /// cos and sin of 2π f_k n, times the window and 1/√N: rows 1..R, columns 0..N.
    cos: Vec<f64>,
    sin: Vec<f64>,
}

impl LogStft {
    pub fn new(resolution: usize, hop: usize) -> Self {
        let n = 2 * resolution - 1;
        let f = log_frequencies(resolution);
        let w = hann(n);
        let scale = 1.0 / (n as f64).sqrt();
        let mut cos = vec![0.0; resolution * n];
        let mut sin = vec![0.0; resolution * n];
        for k in 1..resolution {
            for j in 0..n {
                let phase = 2.0 * PI * f[k] * j as f64;
                cos[k * n + j] = phase.cos() * w[j] * scale;
                sin[k * n + j] = phase.sin() * w[j] * scale;
            }
        }
        LogStft {
            resolution,
            hop,
            n,
            cos,
            sin,
        }
    }

    pub fn frames(&self, len: usize) -> usize {
        len / self.hop + 1
    }

    /// One channel's window -> (re, im), each `resolution × frames`, row 0 = DC.
    ///
    /// Frames are laid out sample-major (`frames_t[j · F + t]`), so each step over the window
    /// updates all F frames' accumulators at once: F independent multiply-adds the compiler
    /// vectorises, where a per-frame dot product is one serial chain. Each output still sums
    /// over j in ascending order, so the numbers are those of the plain dot product.
    pub fn transform(&self, x: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let len = x.len();
        let dc = x.iter().sum::<f64>() / (len as f64).sqrt();
        let mean = x.iter().sum::<f64>() / len as f64;
        let pad = self.n - len % self.hop;
        let mut padded: Vec<f64> = x.iter().map(|v| v - mean).collect();
        padded.resize(len + pad, 0.0);
        let f = self.frames(len);
        let mut frames_t = vec![0.0; self.n * f];
        for t in 0..f {
            for j in 0..self.n {
                frames_t[j * f + t] = padded[t * self.hop + j];
            }
        }
        let r = self.resolution;
        let mut re = vec![0.0; r * f];
        let mut im = vec![0.0; r * f];
        re[..f].fill(dc);
        dft_rows(&self.cos, &self.sin, self.n, &frames_t, f, &mut re, &mut im);
        (re, im)
    }
}

/// Rows 1..R of the transform: `re[k·F + t] = 2 Σ_j cos[k][j]·x_t[j]`, `im = −2 Σ_j sin·x`.
///
/// On x86-64 with AVX2 and FMA (checked at run time) the same loops are compiled for those
/// units; each output is still summed over j in ascending order (fused multiply-adds round
/// once instead of twice, a difference of ~1e-16 relative that the parity tests bound).
fn dft_rows(
    cos: &[f64],
    sin: &[f64],
    n: usize,
    frames_t: &[f64],
    f: usize,
    re: &mut [f64],
    im: &mut [f64],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for (checked above).
        return unsafe { dft_rows_avx2(cos, sin, n, frames_t, f, re, im) };
    }
    dft_rows_generic::<false>(cos, sin, n, frames_t, f, re, im)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dft_rows_avx2(
    cos: &[f64],
    sin: &[f64],
    n: usize,
    frames_t: &[f64],
    f: usize,
    re: &mut [f64],
    im: &mut [f64],
) {
    dft_rows_generic::<true>(cos, sin, n, frames_t, f, re, im)
}

/// Two rows at a time over all frames: the frame row loaded for sample j feeds four
/// accumulator sets (cos and sin of rows k and k+1). `FMA` selects fused multiply-adds, which
/// are only fast where the CPU has them.
#[inline(always)]
fn dft_rows_generic<const FMA: bool>(
    cos: &[f64],
    sin: &[f64],
    n: usize,
    frames_t: &[f64],
    f: usize,
    re: &mut [f64],
    im: &mut [f64],
) {
    let madd = |a: f64, b: f64, c: f64| if FMA { a.mul_add(b, c) } else { a * b + c };
    let rows = re.len() / f;
    let (mut a0, mut b0, mut a1, mut b1) = (vec![0.0; f], vec![0.0; f], vec![0.0; f], vec![0.0; f]);
    let mut k = 1;
    while k < rows {
        let pair = k + 1 < rows;
        a0.fill(0.0);
        b0.fill(0.0);
        a1.fill(0.0);
        b1.fill(0.0);
        let (c0, s0) = (&cos[k * n..(k + 1) * n], &sin[k * n..(k + 1) * n]);
        let (c1, s1) = if pair {
            (
                &cos[(k + 1) * n..(k + 2) * n],
                &sin[(k + 1) * n..(k + 2) * n],
            )
        } else {
            (c0, s0)
        };
        for (j, row) in frames_t.chunks_exact(f).enumerate() {
            let (w0, v0, w1, v1) = (c0[j], s0[j], c1[j], s1[j]);
            for t in 0..f {
                let x = row[t];
                a0[t] = madd(w0, x, a0[t]);
                b0[t] = madd(v0, x, b0[t]);
                a1[t] = madd(w1, x, a1[t]);
                b1[t] = madd(v1, x, b1[t]);
            }
        }
        // exp(-iφ) = cos φ - i sin φ; the fold doubles every non-DC row.
        for t in 0..f {
            re[k * f + t] = 2.0 * a0[t];
            im[k * f + t] = -2.0 * b0[t];
            if pair {
                re[(k + 1) * f + t] = 2.0 * a1[t];
                im[(k + 1) * f + t] = -2.0 * b1[t];
            }
        }
        k += 2;
    }
}

/// The reference's hop: start at `step`, grow by `step` until nsamps/hop fits in R/channels columns.
pub fn derive_hop(nsamps: usize, resolution: usize, channels: usize, step: usize) -> usize {
    let max_bins = resolution / channels;
    let mut hop = step;
    while nsamps as f64 / hop as f64 > max_bins as f64 {
        hop += step;
    }
    hop
}

/// The reference's output types: channel 0 is always the clipped dB; db-iq adds the real and
/// imaginary parts, db-polar the linear magnitude and the phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputType {
    DbOnly,
    DbIq,
    DbPolar,
}

impl OutputType {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "db-only" => Some(OutputType::DbOnly),
            "db-iq" => Some(OutputType::DbIq),
            "db-polar" => Some(OutputType::DbPolar),
            _ => None,
        }
    }

    pub fn channels(self) -> usize {
        if self == OutputType::DbOnly {
            1
        } else {
            3
        }
    }
}

/// `trunc(255 · (v − lo)/(hi − lo))` as numpy's `astype(uint8)` after the reference's scaling;
/// all-equal values map to 0.
fn to_u8(v: f64, lo: f64, hi: f64) -> u8 {
    if hi > lo {
        (255.0 * ((v - lo) / (hi - lo))) as u8
    } else {
        0
    }
}

/// A multichannel image (R×R, 1 or 3 interleaved channels): each EEG channel's strip of F
/// columns, flipped so row 0 is Nyquist, tiled left to right with the reference's margins.
/// dB is clipped to [min_db, max_db]; I/Q share one min–max per strip, magnitude and phase each
/// their own (per EEG channel and window, as the reference).
pub fn image(
    stft: &LogStft,
    window: &[Vec<f64>],
    output: OutputType,
    min_db: f64,
    max_db: f64,
) -> Vec<u8> {
    let r = stft.resolution;
    let frames = stft.frames(window[0].len());
    let pad = (r - window.len() * frames) / 2;
    let nc = output.channels();
    let mut img = vec![0u8; r * r * nc];
    for (ch, x) in window.iter().enumerate() {
        let (re, im) = stft.transform(x);
        let mag: Vec<f64> = re.iter().zip(&im).map(|(a, b)| a.hypot(*b)).collect();
        let (g, b): (Vec<f64>, Vec<f64>) = match output {
            OutputType::DbOnly => (vec![], vec![]),
            OutputType::DbIq => (re.clone(), im.clone()),
            OutputType::DbPolar => (
                mag.clone(),
                re.iter().zip(&im).map(|(a, b)| b.atan2(*a)).collect(),
            ),
        };
        let range = |v: &[f64]| {
            v.iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
                    (lo.min(x), hi.max(x))
                })
        };
        let (g_range, b_range) = match output {
            OutputType::DbIq => {
                let (a, b) = (range(&g), range(&b));
                let joint = (a.0.min(b.0), a.1.max(b.1));
                (joint, joint)
            }
            _ => (range(&g), range(&b)),
        };
        for k in 0..r {
            for t in 0..frames {
                let i = k * frames + t;
                let px = ((r - 1 - k) * r + pad + ch * frames + t) * nc;
                let db = (20.0 * (mag[i] + 1e-9).log10()).clamp(min_db, max_db);
                img[px] = to_u8(db, min_db, max_db);
                if nc == 3 {
                    img[px + 1] = to_u8(g[i], g_range.0, g_range.1);
                    img[px + 2] = to_u8(b[i], b_range.0, b_range.1);
                }
            }
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_derivation_matches_the_reference() {
        assert_eq!(derive_hop(2048, 256, 20, 4), 172);
        assert_eq!(derive_hop(2048, 256, 20, 8), 176);
    }

    #[test]
    fn frequencies_span_the_reference_grid() {
        let f = log_frequencies(256);
        assert_eq!(f.len(), 256);
        assert_eq!(f[0], 0.0);
        assert!((f[1] - 0.001).abs() < 1e-15);
        assert!((f[255] - 0.5).abs() < 1e-15);
    }
}
