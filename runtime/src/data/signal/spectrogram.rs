//! The reference's log-frequency spectrogram and its 8-bit multichannel image
//! (`multichannel_spectrograms.py`), as spec/reference/data.md §3.2–3.5 describes it.
//!
//! Per channel: demean (keeping `dc = Σx/√len`), zero-pad, frames of N = 2R−1 samples every
//! `hop`, symmetric Hann, a dense DFT at 255 log-spaced positive frequencies scaled by 1/√N, the
//! DC row replaced by `dc`, and the negative-frequency half folded in (×2 for a real input).
//! Only the 256 rows that survive the fold are computed: the reference's full 511-row matrix
//! product does twice the work for the same numbers. And each frame is summed about its centre
//! c: with y the windowed frame and the window symmetric,
//! `Σ_j y_j e^{−2πifj} = e^{−2πifc} [Σ_m (y_{c+m} + y_{c−m}) cos 2πfm − i Σ_m (y_{c+m} − y_{c−m}) sin 2πfm]`,
//! which halves the multiply-adds again (the Hann window is 0 at m = ±c, so m runs to c − 1).
//! All channels of a window go through one matrix product (see [`LogStft::transform_channels`]).

use signal_diffusion_config::choice::{OutputType, PolarLayout};
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
    /// cos and sin of 2π f_k m, times the window at c + m and 1/√N: rows 1..R, m in 0..c.
    cos: Vec<f64>,
    sin: Vec<f64>,
    /// cos and sin of 2π f_k c: the phase of each row's frame centre.
    centre: Vec<(f64, f64)>,
}

impl LogStft {
    pub fn new(resolution: usize, hop: usize) -> Self {
        let n = 2 * resolution - 1;
        let f = log_frequencies(resolution);
        let w = hann(n);
        let scale = 1.0 / (n as f64).sqrt();
        let c = resolution - 1;
        let mut cos = vec![0.0; resolution * c];
        let mut sin = vec![0.0; resolution * c];
        let mut centre = vec![(1.0, 0.0); resolution];
        for k in 1..resolution {
            for m in 0..c {
                let phase = 2.0 * PI * f[k] * m as f64;
                cos[k * c + m] = phase.cos() * w[c + m] * scale;
                sin[k * c + m] = phase.sin() * w[c + m] * scale;
            }
            let phase = 2.0 * PI * f[k] * c as f64;
            centre[k] = (phase.cos(), phase.sin());
        }
        LogStft {
            resolution,
            hop,
            n,
            cos,
            sin,
            centre,
        }
    }

    pub fn frames(&self, len: usize) -> usize {
        len / self.hop + 1
    }

    /// One channel's window -> (re, im), each `resolution × frames`, row 0 = DC.
    pub fn transform(&self, x: &[f64]) -> (Vec<f64>, Vec<f64>) {
        self.transform_channels(&[x]).pop().expect("one channel")
    }

    /// Every channel of a window at once: the centred even and odd parts of all channels'
    /// frames form the columns of two matrices (K = c samples × N = channels·frames), and the
    /// transform is two matrix products with the (R−1)×c cos and sin tables — one GEMM each
    /// (the `gemm` crate's kernels, near the core's FMA peak) instead of per-channel dot
    /// products. Sums run in a different order than numpy's; the parity tests bound the
    /// difference (≈1e-13 relative, against a tolerance of 1e-9).
    pub fn transform_channels<X: AsRef<[f64]>>(&self, channels: &[X]) -> Vec<(Vec<f64>, Vec<f64>)> {
        let c = self.resolution - 1;
        let len = channels[0].as_ref().len();
        let f = self.frames(len);
        let cols = channels.len() * f;
        // even[m][ch·F + t] = y[c+m] + y[c−m] (y[c] for m = 0); odd[m][..] = y[c+m] − y[c−m].
        let mut even = vec![0.0; c * cols];
        let mut odd = vec![0.0; c * cols];
        let mut dcs = Vec::with_capacity(channels.len());
        let pad = self.n - len % self.hop;
        let mut padded = vec![0.0; len + pad];
        for (ch, x) in channels.iter().enumerate() {
            let x = x.as_ref();
            let sum = x.iter().sum::<f64>();
            dcs.push(sum / (len as f64).sqrt());
            let mean = sum / len as f64;
            for (p, v) in padded.iter_mut().zip(x) {
                *p = v - mean;
            }
            for t in 0..f {
                let frame = &padded[t * self.hop..t * self.hop + self.n];
                let col = ch * f + t;
                even[col] = frame[c];
                for m in 1..c {
                    even[m * cols + col] = frame[c + m] + frame[c - m];
                    odd[m * cols + col] = frame[c + m] - frame[c - m];
                }
            }
        }
        // C = cos · even and S = sin · odd, rows 1..R (row 0 of the tables is unused).
        let rows = self.resolution - 1;
        let mut cs = vec![0.0; rows * cols];
        let mut sn = vec![0.0; rows * cols];
        for (table, parts, out) in [(&self.cos, &even, &mut cs), (&self.sin, &odd, &mut sn)] {
            // SAFETY: row-major matrices of the stated sizes: table[c..] is rows × c, parts is
            // c × cols, out is rows × cols; no aliasing.
            unsafe {
                gemm::gemm(
                    rows,
                    cols,
                    c,
                    out.as_mut_ptr(),
                    1,
                    cols as isize,
                    false,
                    table[c..].as_ptr(),
                    1,
                    c as isize,
                    parts.as_ptr(),
                    1,
                    cols as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
        // X = e^{−iθ}(C − iS), θ = 2π f c; the fold doubles every non-DC row; row 0 is DC.
        let r = self.resolution;
        (0..channels.len())
            .map(|ch| {
                let mut re = vec![0.0; r * f];
                let mut im = vec![0.0; r * f];
                re[..f].fill(dcs[ch]);
                for k in 1..r {
                    let (cos_t, sin_t) = self.centre[k];
                    for t in 0..f {
                        let i = (k - 1) * cols + ch * f + t;
                        let (a, b) = (cs[i], sn[i]);
                        re[k * f + t] = 2.0 * (a * cos_t - b * sin_t);
                        im[k * f + t] = -2.0 * (a * sin_t + b * cos_t);
                    }
                }
                (re, im)
            })
            .collect()
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
/// dB is clipped to [min_db, max_db]; I/Q share one min–max per strip. db-polar in the
/// `phase-cos-sin` layout: cos φ and sin φ on the fixed scale [-1, 1] (cos 1, sin 0 where X = 0);
/// in the original's `magnitude-phase` layout: linear magnitude and φ, each min–max scaled per
/// EEG channel and window as the reference does (its φ wraps at ±π, so nearly real rows flicker
/// between 0 and 255).
pub fn image(
    stft: &LogStft,
    window: &[Vec<f64>],
    output: OutputType,
    polar: PolarLayout,
    min_db: f64,
    max_db: f64,
) -> Vec<u8> {
    let r = stft.resolution;
    let frames = stft.frames(window[0].len());
    let pad = (r - window.len() * frames) / 2;
    let nc = output.channels();
    let mut img = vec![0u8; r * r * nc];
    for (ch, (re, im)) in stft.transform_channels(window).into_iter().enumerate() {
        let mag: Vec<f64> = re.iter().zip(&im).map(|(a, b)| a.hypot(*b)).collect();
        let (g, b): (Vec<f64>, Vec<f64>) = match (output, polar) {
            (OutputType::DbOnly, _) => (vec![], vec![]),
            (OutputType::DbIq, _) => (re.clone(), im.clone()),
            (OutputType::DbPolar, PolarLayout::MagnitudePhase) => (
                mag.clone(),
                re.iter().zip(&im).map(|(a, b)| b.atan2(*a)).collect(),
            ),
            (OutputType::DbPolar, PolarLayout::PhaseCosSin) => mag
                .iter()
                .zip(re.iter().zip(&im))
                .map(|(&m, (&a, &b))| if m > 0.0 { (a / m, b / m) } else { (1.0, 0.0) })
                .unzip(),
        };
        let range = |v: &[f64]| {
            v.iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
                    (lo.min(x), hi.max(x))
                })
        };
        let (g_range, b_range) = match (output, polar) {
            (OutputType::DbIq, _) => {
                let (a, b) = (range(&g), range(&b));
                let joint = (a.0.min(b.0), a.1.max(b.1));
                (joint, joint)
            }
            (OutputType::DbPolar, PolarLayout::PhaseCosSin) => ((-1.0, 1.0), (-1.0, 1.0)),
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
