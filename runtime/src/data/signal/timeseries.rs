//! Time-series outputs: per-channel z-scoring with statistics over a whole dataset.
//!
//! As the reference: the mean and population standard deviation of every channel are
//! accumulated sample by sample (Welford, f64) over all decimated samples of all recordings,
//! then each window is normalised in f32 as `(x − mean) / (std + 1e-8)`.

use serde::{Deserialize, Serialize};

/// The reference's `<dataset>_normalization_stats.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub channel_means: Vec<f64>,
    pub channel_stds: Vec<f64>,
    pub n_eeg_channels: usize,
    pub n_samples_total: u64,
}

/// Running per-channel mean and variance.
pub struct Welford {
    n: u64,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl Welford {
    pub fn new(channels: usize) -> Self {
        Welford {
            n: 0,
            mean: vec![0.0; channels],
            m2: vec![0.0; channels],
        }
    }

    /// Add a recording (`channels × samples`), sample by sample.
    pub fn add(&mut self, recording: &[Vec<f64>]) {
        let len = recording.first().map_or(0, Vec::len);
        for t in 0..len {
            self.n += 1;
            let n = self.n as f64;
            for (c, ch) in recording.iter().enumerate() {
                let x = ch[t];
                let delta = x - self.mean[c];
                self.mean[c] += delta / n;
                self.m2[c] += delta * (x - self.mean[c]);
            }
        }
    }

    pub fn stats(&self) -> Stats {
        let n = self.n.max(1) as f64;
        Stats {
            channel_means: self.mean.clone(),
            channel_stds: self.m2.iter().map(|m| (m / n).sqrt()).collect(),
            n_eeg_channels: self.mean.len(),
            n_samples_total: self.n * self.mean.len() as u64,
        }
    }
}

/// One window (`channels × samples`, f64 volts) z-scored in f32, C order.
pub fn normalize(window: &[Vec<f64>], stats: &Stats) -> Vec<f32> {
    let mut out = Vec::with_capacity(window.len() * window.first().map_or(0, Vec::len));
    for (c, ch) in window.iter().enumerate() {
        let (m, s) = (
            stats.channel_means[c] as f32,
            stats.channel_stds[c] as f32 + 1e-8f32,
        );
        out.extend(ch.iter().map(|&x| (x as f32 - m) / s));
    }
    out
}
