//! How close generated spectrograms or time series are to real ones: features that need no
//! downloaded network, and two distances between feature sets, KID and a multi-bandwidth Gaussian
//! MMD². Time series have the signal-domain counterpart of these features (`signal_features`).
//!
//! Features. A preprocessed spectrogram is `n` EEG-channel strips side by side (each `R0/n`
//! columns of time, centred with equal black margins) with frequency on the vertical axis
//! (Nyquist at the top); the dB value is channel 0 of the image. Per EEG channel: the mean dB of
//! 8 equal frequency bands (band power) and the standard deviation over the strip's time columns
//! of the column means (how much the power moves). 9·n numbers per image, standardised by the
//! reference set's mean and standard deviation (at least 2.5 grey levels), computed once per run.
//!
//! KID is torch-fidelity's: polynomial kernel k(x, y) = (x·y/d + 1)³, the unbiased MMD² estimate
//! of its `mmd2` on 100 random subsets of each set (subset draws seeded), mean and standard
//! deviation. The subsets hold half the smaller set, at most 1,000 (torch-fidelity's and
//! clean-fid's size once both sets have 2,000 samples): theirs, min(n_gen, n_ref, 1000), takes
//! the whole smaller set when it has fewer than 1,000, so with 32 samples every subset of it was
//! the same and the ± always 0. On features standardised by the reference, a set many standard
//! deviations away (the noise an untrained model generates) makes the cubic kernel's terms grow
//! as the cube of that distance: KIDs in the hundreds of thousands at step 0 are that, not an
//! error. MMD² uses the full sets with the unbiased U-statistic and
//! a sum of Gaussian kernels exp(−‖x − y‖²/(2s)) for s = {0.5, 1, 2, 4} × the median squared
//! distance within the reference set.

use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Frequency bands per EEG channel.
pub const BANDS: usize = 8;

/// The smallest standard deviation a feature is scaled by (2.5/127.5: 2.5 grey levels).
const MIN_STD: f64 = 2.5 / 127.5;

/// Where the EEG-channel strips lie in an image of width `width`, for images written at
/// `source_width` with `channels` strips (the preprocessing's tiling, scaled).
pub fn strips(width: usize, source_width: usize, channels: usize) -> Vec<(usize, usize)> {
    let per = source_width / channels;
    let pad = (source_width - channels * per) / 2;
    let scale = width as f64 / source_width as f64;
    (0..channels)
        .map(|i| {
            let a = ((pad + i * per) as f64 * scale).round() as usize;
            let b = (((pad + (i + 1) * per) as f64 * scale).round() as usize).max(a + 1);
            (a.min(width - 1), b.min(width))
        })
        .collect()
}

/// The features of one image (`height` × `width` values of its dB channel, row-major).
pub fn spectrogram_features(
    db: &[f32],
    height: usize,
    width: usize,
    strips: &[(usize, usize)],
) -> Vec<f32> {
    let mut out = Vec::with_capacity(strips.len() * (BANDS + 1));
    for &(a, b) in strips {
        let cols = (b - a) as f64;
        for band in 0..BANDS {
            let (r0, r1) = (
                band * height / BANDS,
                ((band + 1) * height / BANDS).max(band * height / BANDS + 1),
            );
            let mut s = 0f64;
            for r in r0..r1 {
                s += db[r * width + a..r * width + b]
                    .iter()
                    .map(|v| *v as f64)
                    .sum::<f64>();
            }
            out.push((s / ((r1 - r0) as f64 * cols)) as f32);
        }
        let means: Vec<f64> = (a..b)
            .map(|c| (0..height).map(|r| db[r * width + c] as f64).sum::<f64>() / height as f64)
            .collect();
        let m = means.iter().sum::<f64>() / cols;
        let var = means.iter().map(|v| (v - m).powi(2)).sum::<f64>() / cols;
        out.push(var.sqrt() as f32);
    }
    out
}

/// Welch segment length for time-series features (the whole channel when shorter).
const SEGMENT: usize = 256;

/// The features of one time series (`channels` × `len` values, row-major), the signal-domain
/// counterpart of `spectrogram_features`: per EEG channel, the log10 mean power of `BANDS` equal
/// bands of its Welch periodogram (Hann window, 50 % overlap, each segment's mean removed, DC
/// excluded) and the standard deviation over segments of the segment's log10 power (how much the
/// power moves). 9·channels numbers.
pub fn signal_features(x: &[f32], channels: usize, len: usize) -> Vec<f32> {
    let seg = SEGMENT.min(len);
    let bins = seg / 2;
    let tau = std::f64::consts::TAU;
    let hann: Vec<f64> = (0..seg)
        .map(|n| 0.5 - 0.5 * (tau * n as f64 / seg as f64).cos())
        .collect();
    // DFT rows for bins 1..=seg/2, the window folded in.
    let (cos, sin): (Vec<f64>, Vec<f64>) = (1..=bins)
        .flat_map(|k| (0..seg).map(move |n| (k, n)))
        .map(|(k, n)| {
            let a = tau * (k * n % seg) as f64 / seg as f64;
            (a.cos() * hann[n], a.sin() * hann[n])
        })
        .unzip();
    let starts: Vec<usize> = (0..=len - seg).step_by((seg / 2).max(1)).collect();
    let mut out = Vec::with_capacity(channels * (BANDS + 1));
    let mut segment = vec![0f64; seg];
    for ch in &x.chunks_exact(len).take(channels).collect::<Vec<_>>() {
        let mut power = vec![0f64; bins];
        let mut seg_log = Vec::with_capacity(starts.len());
        for &s in &starts {
            let mean = ch[s..s + seg].iter().map(|v| *v as f64).sum::<f64>() / seg as f64;
            for (d, v) in segment.iter_mut().zip(&ch[s..s + seg]) {
                *d = *v as f64 - mean;
            }
            let mut total = 0f64;
            for (k, p) in power.iter_mut().enumerate() {
                let row = k * seg..(k + 1) * seg;
                let re = dot(&cos[row.clone()], &segment);
                let im = dot(&sin[row], &segment);
                *p += re * re + im * im;
                total += re * re + im * im;
            }
            seg_log.push((total + 1e-12).log10());
        }
        for band in 0..BANDS {
            let (a, b) = (
                band * bins / BANDS,
                ((band + 1) * bins / BANDS).max(band * bins / BANDS + 1),
            );
            let mean = power[a..b].iter().sum::<f64>() / ((b - a) * starts.len()) as f64;
            out.push((mean + 1e-12).log10() as f32);
        }
        let m = seg_log.iter().sum::<f64>() / seg_log.len() as f64;
        let var = seg_log.iter().map(|v| (v - m).powi(2)).sum::<f64>() / seg_log.len() as f64;
        out.push(var.sqrt() as f32);
    }
    out
}

/// The reference set, standardised, with what the distances need from it.
pub struct Reference {
    mean: Vec<f64>,
    std: Vec<f64>,
    pub features: Vec<Vec<f64>>,
    median_sq: f64,
}

impl Reference {
    pub fn new(raw: &[Vec<f32>]) -> Reference {
        let d = raw[0].len();
        let n = raw.len() as f64;
        let mean: Vec<f64> = (0..d)
            .map(|j| raw.iter().map(|f| f[j] as f64).sum::<f64>() / n)
            .collect();
        let std: Vec<f64> = (0..d)
            .map(|j| {
                let v = raw
                    .iter()
                    .map(|f| (f[j] as f64 - mean[j]).powi(2))
                    .sum::<f64>()
                    / n;
                // A feature that barely varies in the real data (a band clipped at the floor)
                // would turn a one-grey-level difference into a huge z-score: differences below
                // MIN_STD (2.5 grey levels in [-1, 1] units) count as noise.
                v.sqrt().max(MIN_STD)
            })
            .collect();
        let mut r = Reference {
            mean,
            std,
            features: vec![],
            median_sq: 1.0,
        };
        r.features = raw.iter().map(|f| r.standardise(f)).collect();
        let mut d2: Vec<f64> = vec![];
        for i in 0..r.features.len() {
            for j in i + 1..r.features.len() {
                d2.push(sq_dist(&r.features[i], &r.features[j]));
            }
        }
        d2.sort_by(f64::total_cmp);
        r.median_sq = d2
            .get(d2.len() / 2)
            .copied()
            .filter(|m| *m > 0.0)
            .unwrap_or(1.0);
        r
    }

    pub fn standardise(&self, f: &[f32]) -> Vec<f64> {
        f.iter()
            .enumerate()
            .map(|(j, v)| (*v as f64 - self.mean[j]) / self.std[j])
            .collect()
    }

    /// KID and MMD² of generated raw features against this reference.
    pub fn compare(&self, generated: &[Vec<f32>]) -> Fidelity {
        let g: Vec<Vec<f64>> = generated.iter().map(|f| self.standardise(f)).collect();
        let kid = kid(&g, &self.features, 100, 1000);
        Fidelity {
            kid_mean: kid.mean,
            kid_std: kid.std,
            subset: kid.subset,
            mmd2: mmd2_gaussian(&g, &self.features, self.median_sq),
            generated: g.len(),
            reference: self.features.len(),
        }
    }
}

/// The distances of a generated set to the reference, and the sample counts behind them.
#[derive(Debug, Clone, Copy)]
pub struct Fidelity {
    pub kid_mean: f64,
    pub kid_std: f64,
    /// Samples of each set in a KID subset.
    pub subset: usize,
    pub mmd2: f64,
    pub generated: usize,
    pub reference: usize,
}

/// KID over random subsets: the mean and standard deviation of their estimates.
#[derive(Debug, Clone, Copy)]
pub struct Kid {
    pub mean: f64,
    pub std: f64,
    /// Samples of each set in a subset.
    pub subset: usize,
}

fn sq_dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// torch-fidelity's `mmd2` with a cubic polynomial kernel on two equal-size sets.
fn mmd2_polynomial(x: &[&Vec<f64>], y: &[&Vec<f64>]) -> f64 {
    let d = x[0].len() as f64;
    let k = |a: &Vec<f64>, b: &Vec<f64>| (dot(a, b) / d + 1.0).powi(3);
    let m = x.len() as f64;
    let (mut xx, mut yy, mut xy) = (0f64, 0f64, 0f64);
    for i in 0..x.len() {
        for j in 0..x.len() {
            if i != j {
                xx += k(x[i], x[j]);
                yy += k(y[i], y[j]);
            }
            xy += k(x[i], y[j]);
        }
    }
    (xx + yy) / (m * (m - 1.0)) - 2.0 * xy / (m * m)
}

/// KID: mean and standard deviation of `subsets` polynomial MMD² estimates on random subsets of
/// min(min(|a|, |b|)/2, max_subset) samples of each set (NaN below 2 samples a subset).
pub fn kid(a: &[Vec<f64>], b: &[Vec<f64>], subsets: usize, max_subset: usize) -> Kid {
    let m = (a.len().min(b.len()) / 2).min(max_subset);
    if m < 2 {
        return Kid {
            mean: f64::NAN,
            std: f64::NAN,
            subset: m,
        };
    }
    let mut rng = ChaCha8Rng::seed_from_u64(2020);
    let values: Vec<f64> = (0..subsets)
        .map(|_| {
            let x: Vec<&Vec<f64>> = sample(&mut rng, a.len(), m).iter().map(|i| &a[i]).collect();
            let y: Vec<&Vec<f64>> = sample(&mut rng, b.len(), m).iter().map(|i| &b[i]).collect();
            mmd2_polynomial(&x, &y)
        })
        .collect();
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
    Kid {
        mean,
        std: var.sqrt(),
        subset: m,
    }
}

/// Unbiased MMD² with a sum of Gaussian kernels at bandwidths scaled by `median_sq`.
pub fn mmd2_gaussian(a: &[Vec<f64>], b: &[Vec<f64>], median_sq: f64) -> f64 {
    let scales = [0.5, 1.0, 2.0, 4.0];
    let k = |x: &[f64], y: &[f64]| {
        let d2 = sq_dist(x, y);
        scales
            .iter()
            .map(|s| (-d2 / (2.0 * s * median_sq)).exp())
            .sum::<f64>()
    };
    let within = |s: &[Vec<f64>]| {
        let n = s.len() as f64;
        let mut t = 0f64;
        for i in 0..s.len() {
            for j in i + 1..s.len() {
                t += 2.0 * k(&s[i], &s[j]);
            }
        }
        t / (n * (n - 1.0))
    };
    let mut cross = 0f64;
    for x in a {
        for y in b {
            cross += k(x, y);
        }
    }
    within(a) + within(b) - 2.0 * cross / (a.len() * b.len()) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::path::normal;

    fn gaussian_set(n: usize, d: usize, shift: f64, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| (0..d).map(|_| normal(&mut rng) + shift).collect())
            .collect()
    }

    #[test]
    fn strips_follow_the_preprocessing_tiling() {
        // 256 wide, 20 channels: 12 columns each from column 8 (data.md §3.5); at 64: ×1/4.
        let s = strips(256, 256, 20);
        assert_eq!(s[0], (8, 20));
        assert_eq!(s[19], (236, 248));
        assert_eq!(strips(64, 256, 20)[1], (5, 8));
    }

    #[test]
    fn signal_features_find_the_band_of_a_sine_and_its_modulation() {
        // Two channels of 1024 samples: a steady sine in band 2 of 8 (bin 40 of 128), and the
        // same sine switched on and off every 256 samples at 10× the amplitude.
        let len = 1024;
        let mut x = vec![0f32; 2 * len];
        for n in 0..len {
            let v = (std::f64::consts::TAU * 40.0 * n as f64 / 256.0).sin() as f32;
            x[n] = v;
            x[len + n] = if (n / 256) % 2 == 0 { 10.0 * v } else { 0.0 };
        }
        let f = signal_features(&x, 2, len);
        assert_eq!(f.len(), 2 * (BANDS + 1));
        let steady = &f[..BANDS];
        let loudest = (0..BANDS).max_by(|a, b| steady[*a].total_cmp(&steady[*b]));
        assert_eq!(loudest, Some(2), "{steady:?}");
        assert!(steady[2] - steady[5] > 6.0, "a pure tone: {steady:?}");
        // 10× amplitude on half the time: ≈ +1.7 decades of mean power in its band.
        assert!((f[BANDS + 1 + 2] - steady[2] - 1.7).abs() < 0.2, "{f:?}");
        assert!(
            f[BANDS] < 0.05 && f[2 * BANDS + 1] > 1.0,
            "variability: {f:?}"
        );
    }

    #[test]
    fn distances_are_near_zero_for_one_distribution_and_grow_with_a_shift() {
        let r = gaussian_set(200, 10, 0.0, 1);
        let same = gaussian_set(200, 10, 0.0, 2);
        let far = gaussian_set(200, 10, 1.0, 3);
        let k_same = kid(&same, &r, 100, 1000).mean;
        let k_far = kid(&far, &r, 100, 1000).mean;
        assert!(k_same.abs() < 0.02, "{k_same}");
        // Mean shift δ=1 in each of 10 dims: E[k] differences are large.
        assert!(k_far > 0.5, "{k_far}");
        let m_same = mmd2_gaussian(&same, &r, 20.0);
        let m_far = mmd2_gaussian(&far, &r, 20.0);
        assert!(m_same.abs() < 0.02 && m_far > 0.2, "{m_same} {m_far}");
    }

    /// With as few samples as an evaluation draws (32), the ± is a real spread: a second draw
    /// of the reference's distribution scores 0 within it, and a shifted copy of the reference
    /// scores more the further it is shifted, by more than the spread. (The reference against
    /// its very own samples scores below 0: its subsets share samples, whose self-similarity
    /// counts in the cross term only.)
    #[test]
    fn kid_of_small_sets_has_a_spread_that_covers_zero_and_grows_with_a_shift() {
        let r = gaussian_set(32, 18, 0.0, 7);
        let same = kid(&gaussian_set(32, 18, 0.0, 8), &r, 100, 1000);
        assert_eq!(same.subset, 16);
        assert!(same.std > 0.0, "{same:?}");
        assert!(same.mean.abs() <= 2.0 * same.std, "{same:?}");
        let shifted = |d: f64| -> Vec<Vec<f64>> {
            r.iter()
                .map(|x| x.iter().map(|v| v + d).collect())
                .collect()
        };
        let mut last = same;
        for d in [0.5, 1.0, 2.0] {
            let k = kid(&shifted(d), &r, 100, 1000);
            assert!(
                k.mean - last.mean > last.std.max(k.std),
                "shift {d}: {k:?} after {last:?}"
            );
            last = k;
        }
    }
}
