//! Rational resampling, as `scipy.signal.resample_poly(x, up, down)` with its defaults
//! (`window=('kaiser', 5.0)`, `padtype='constant'`): for recordings whose rate is not an integer
//! multiple of 125 Hz (CHB-MIT's 256 Hz: up 125, down 256), where `decimate` cannot be used.
//!
//! The filter is scipy's `firwin(2·half + 1, 1/max(up, down), window=('kaiser', 5.0))·up` with
//! half = 10·max(up, down); the signal is zero-stuffed by `up`, convolved with it and every
//! `down`-th sample kept (`upfirdn`), computed polyphase: each output sample sums only the taps
//! that meet a real input sample (about 2·half/down of them). The output is aligned and trimmed
//! exactly as scipy does, to ⌈n·up/down⌉ samples.

/// The modified Bessel function I0 (its power series; ample for the window's β = 5).
fn bessel_i0(x: f64) -> f64 {
    let (mut sum, mut term, q) = (1.0, 1.0, x * x / 4.0);
    for k in 1..200 {
        term *= q / (k * k) as f64;
        sum += term;
        if term < sum * 1e-17 {
            break;
        }
    }
    sum
}

/// `scipy.signal.firwin(taps, cutoff, window=('kaiser', beta))`: a low-pass with unit DC gain.
fn firwin_kaiser(taps: usize, cutoff: f64, beta: f64) -> Vec<f64> {
    let alpha = (taps - 1) as f64 / 2.0;
    let sinc = |x: f64| {
        if x == 0.0 {
            1.0
        } else {
            (std::f64::consts::PI * x).sin() / (std::f64::consts::PI * x)
        }
    };
    let i0_beta = bessel_i0(beta);
    let h: Vec<f64> = (0..taps)
        .map(|n| {
            let m = n as f64 - alpha;
            let r = m / alpha;
            let window = bessel_i0(beta * (1.0 - r * r).max(0.0).sqrt()) / i0_beta;
            cutoff * sinc(cutoff * m) * window
        })
        .collect();
    let sum: f64 = h.iter().sum();
    h.into_iter().map(|v| v / sum).collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `x` resampled by `up/down` (reduced by their gcd first), as scipy's `resample_poly`.
pub fn resample_poly(x: &[f64], up: usize, down: usize) -> Vec<f64> {
    let g = gcd(up, down);
    let (up, down) = (up / g, down / g);
    if up == 1 && down == 1 {
        return x.to_vec();
    }
    let n_in = x.len();
    let n_out = (n_in * up).div_ceil(down);
    let max_rate = up.max(down);
    let half = 10 * max_rate;
    let mut h = firwin_kaiser(2 * half + 1, 1.0 / max_rate as f64, 5.0);
    for v in &mut h {
        *v *= up as f64;
    }
    // scipy pads the filter in front so that output samples fall on the filter's centre, then
    // drops the first n_pre_remove outputs of upfirdn.
    let n_pre_pad = down - half % down;
    let n_pre_remove = (half + n_pre_pad) / down;
    let padded: Vec<f64> = std::iter::repeat_n(0.0, n_pre_pad).chain(h).collect();
    // upfirdn: y[k] = Σ_j padded[j] · xu[k·down − j], xu[m] = x[m / up] where up divides m.
    (n_pre_remove..n_pre_remove + n_out)
        .map(|k| {
            let m = k * down;
            // The taps j ≡ m (mod up) with 0 ≤ m − j < n_in·up.
            let mut j = m % up;
            let mut acc = 0.0;
            while j < padded.len() && j <= m {
                let i = (m - j) / up;
                if i < n_in {
                    acc += padded[j] * x[i];
                }
                j += up;
            }
            acc
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bessel_i0_matches_known_values() {
        // scipy.special.i0(5.0), i0(1.0)
        assert!((bessel_i0(5.0) - 27.239871823604442).abs() < 1e-12);
        assert!((bessel_i0(1.0) - 1.2660658777520082).abs() < 1e-14);
    }

    #[test]
    fn a_constant_stays_constant_inside() {
        let y = resample_poly(&vec![1.0; 2560], 125, 256);
        assert_eq!(y.len(), 1250);
        // Away from the zero-padded ends the DC gain is 1.
        assert!(
            y[100..1150].iter().all(|v| (v - 1.0).abs() < 1e-3),
            "{:?}",
            &y[100..105]
        );
    }
}
