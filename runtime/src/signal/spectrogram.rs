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
    pub fn transform(&self, x: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let len = x.len();
        let dc = x.iter().sum::<f64>() / (len as f64).sqrt();
        let mean = x.iter().sum::<f64>() / len as f64;
        let pad = self.n - len % self.hop;
        let mut padded: Vec<f64> = x.iter().map(|v| v - mean).collect();
        padded.resize(len + pad, 0.0);
        let frames = self.frames(len);
        let r = self.resolution;
        let mut re = vec![0.0; r * frames];
        let mut im = vec![0.0; r * frames];
        for t in 0..frames {
            let frame = &padded[t * self.hop..t * self.hop + self.n];
            re[t] = dc;
            for k in 1..r {
                let (c, s) = (
                    &self.cos[k * self.n..(k + 1) * self.n],
                    &self.sin[k * self.n..(k + 1) * self.n],
                );
                let (mut a, mut b) = (0.0, 0.0);
                for j in 0..self.n {
                    a += c[j] * frame[j];
                    b += s[j] * frame[j];
                }
                // exp(-iφ) = cos φ - i sin φ; the fold doubles every non-DC row.
                re[k * frames + t] = 2.0 * a;
                im[k * frames + t] = -2.0 * b;
            }
        }
        (re, im)
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

/// A db-only image (L, R×R): each channel's dB strip clipped to [min_db, max_db], truncated to
/// 0..255, flipped so row 0 is Nyquist, tiled left to right with the reference's margins.
pub fn db_only_image(stft: &LogStft, window: &[Vec<f64>], min_db: f64, max_db: f64) -> Vec<u8> {
    let r = stft.resolution;
    let frames = stft.frames(window[0].len());
    let pad = (r - window.len() * frames) / 2;
    let mut img = vec![0u8; r * r];
    for (ch, x) in window.iter().enumerate() {
        let (re, im) = stft.transform(x);
        for k in 0..r {
            for t in 0..frames {
                let mag = (re[k * frames + t].powi(2) + im[k * frames + t].powi(2)).sqrt();
                let db = (20.0 * (mag + 1e-9).log10()).clamp(min_db, max_db);
                let v = (255.0 * (db - min_db) / (max_db - min_db)) as u8;
                img[(r - 1 - k) * r + pad + ch * frames + t] = v;
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
