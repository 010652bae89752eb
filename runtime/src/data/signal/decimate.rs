//! Zero-phase IIR decimation, as `scipy.signal.decimate(x, q, ftype='iir', zero_phase=True)`:
//! a Chebyshev type I low-pass (order 8, 0.05 dB ripple, cutoff 0.8/q of Nyquist) designed as
//! second-order sections, run forward and backward (`sosfiltfilt` with odd-extension padding of
//! 3·(2·sections+1) samples and `sosfilt_zi` initial conditions), then every q-th sample.
//!
//! The design follows scipy step for step (analog prototype, frequency pre-warping, bilinear
//! transform, "nearest" pole pairing with the pole nearest the unit circle in the last section),
//! so the sections equal scipy's, not just the overall response.

use std::f64::consts::PI;

/// A complex number, just enough for the filter design.
#[derive(Clone, Copy, Debug)]
struct C {
    re: f64,
    im: f64,
}

impl C {
    fn mul(self, o: C) -> C {
        C {
            re: self.re * o.re - self.im * o.im,
            im: self.re * o.im + self.im * o.re,
        }
    }
    fn div(self, o: C) -> C {
        let d = o.re * o.re + o.im * o.im;
        C {
            re: (self.re * o.re + self.im * o.im) / d,
            im: (self.im * o.re - self.re * o.im) / d,
        }
    }
    fn abs(self) -> f64 {
        self.re.hypot(self.im)
    }
}

/// Second-order sections `[b0, b1, b2, 1, a1, a2]`.
pub type Sos = Vec<[f64; 6]>;

/// `scipy.signal.cheby1(order, ripple_db, wn, output='sos')` for an even order (digital, low-pass).
pub fn cheby1_sos(order: usize, ripple_db: f64, wn: f64) -> Sos {
    assert!(
        order.is_multiple_of(2) && order > 0,
        "even orders only (decimate uses 8)"
    );
    // Analog prototype (cheb1ap): poles -sinh(mu + iθ), gain prod(-p), / sqrt(1+eps²) for even N.
    let eps = (10f64.powf(0.1 * ripple_db) - 1.0).sqrt();
    let mu = (1.0 / eps).asinh() / order as f64;
    let n = order as i64;
    let poles: Vec<C> = (0..order)
        .map(|i| {
            let m = (-n + 1 + 2 * i as i64) as f64;
            let theta = PI * m / (2.0 * order as f64);
            // -sinh(mu + iθ) = -(sinh mu cos θ + i cosh mu sin θ)
            C {
                re: -(mu.sinh() * theta.cos()),
                im: -(mu.cosh() * theta.sin()),
            }
        })
        .collect();
    let mut k = poles
        .iter()
        .fold(C { re: 1.0, im: 0.0 }, |acc, p| {
            acc.mul(C {
                re: -p.re,
                im: -p.im,
            })
        })
        .re;
    k /= (1.0 + eps * eps).sqrt();
    // Pre-warp (fs = 2) and scale to the cutoff: lp2lp_zpk.
    let fs2 = 4.0;
    let warped = fs2 * (PI * wn / 2.0).tan();
    let poles: Vec<C> = poles
        .iter()
        .map(|p| C {
            re: p.re * warped,
            im: p.im * warped,
        })
        .collect();
    k *= warped.powi(order as i32);
    // Bilinear transform: p -> (fs2 + p)/(fs2 - p); all zeros land on -1.
    let denom = poles.iter().fold(C { re: 1.0, im: 0.0 }, |acc, p| {
        acc.mul(C {
            re: fs2 - p.re,
            im: -p.im,
        })
    });
    let k = k * C { re: 1.0, im: 0.0 }.div(denom).re;
    let mut zp: Vec<C> = poles
        .iter()
        .map(|p| {
            C {
                re: fs2 + p.re,
                im: p.im,
            }
            .div(C {
                re: fs2 - p.re,
                im: -p.im,
            })
        })
        .collect();
    // zpk2sos, pairing "nearest": take the pole nearest the unit circle first, pair it with its
    // conjugate and two zeros at -1; the list is reversed so that pole ends up in the last section.
    // Only poles with positive imaginary part are kept (each stands for its conjugate pair).
    zp.retain(|p| p.im > 0.0);
    let mut sections = vec![];
    while !zp.is_empty() {
        let (idx, _) = zp
            .iter()
            .enumerate()
            .min_by(|a, b| (1.0 - a.1.abs()).abs().total_cmp(&(1.0 - b.1.abs()).abs()))
            .expect("non-empty");
        let p = zp.remove(idx);
        // (z - p)(z - p̄) = z² - 2 Re p z + |p|², computed as numpy's poly does.
        let a1 = -(p.re + p.re);
        let a2 = p.re * p.re + p.im * p.im;
        sections.push([1.0, 2.0, 1.0, 1.0, a1, a2]);
    }
    sections.reverse();
    for v in &mut sections[0][..3] {
        *v *= k;
    }
    sections
}

/// `scipy.signal.sosfilt_zi`: steady-state initial conditions of each section for a unit step.
fn sosfilt_zi(sos: &Sos) -> Vec<[f64; 2]> {
    let mut scale = 1.0;
    sos.iter()
        .map(|s| {
            let (b, a) = ([s[0], s[1], s[2]], [s[4], s[5]]);
            // lfilter_zi: solve (I - companion(a)ᵀ) zi = b[1:] - a[1:]·b[0]
            let (b0, b1) = (b[1] - a[0] * b[0], b[2] - a[1] * b[0]);
            let det = 1.0 + a[0] + a[1];
            let zi = [(b0 + b1) / det, ((1.0 + a[0]) * b1 - a[1] * b0) / det];
            let zi = [scale * zi[0], scale * zi[1]];
            scale *= (b[0] + b[1] + b[2]) / (1.0 + a[0] + a[1]);
            zi
        })
        .collect()
}

/// Direct form II transposed, section by section, in place (scipy's `sosfilt`).
fn sosfilt(sos: &Sos, x: &mut [f64], zi: &mut [[f64; 2]]) {
    for v in x.iter_mut() {
        let mut cur = *v;
        for (s, z) in sos.iter().zip(zi.iter_mut()) {
            let y = s[0] * cur + z[0];
            z[0] = s[1] * cur - s[4] * y + z[1];
            z[1] = s[2] * cur - s[5] * y;
            cur = y;
        }
        *v = cur;
    }
}

/// `sosfilt` on `LANES` signals at once, interleaved (`x[t][lane]`). Each lane does exactly
/// the scalar arithmetic (no fused multiply-adds), so results are bit-identical to one signal
/// at a time; the lanes fill the vector units while each IIR recurrence waits on its latency.
fn sosfilt_lanes(sos: &Sos, x: &mut [[f64; LANES]], zi: &mut [[[f64; LANES]; 2]]) {
    for v in x.iter_mut() {
        let mut cur = *v;
        for (s, z) in sos.iter().zip(zi.iter_mut()) {
            let mut y = [0.0; LANES];
            for l in 0..LANES {
                y[l] = s[0] * cur[l] + z[0][l];
                z[0][l] = s[1] * cur[l] - s[4] * y[l] + z[1][l];
                z[1][l] = s[2] * cur[l] - s[5] * y[l];
            }
            cur = y;
        }
        *v = cur;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sosfilt_lanes_avx2(sos: &Sos, x: &mut [[f64; LANES]], zi: &mut [[[f64; LANES]; 2]]) {
    sosfilt_lanes(sos, x, zi)
}

fn sosfilt_lanes_dispatch(sos: &Sos, x: &mut [[f64; LANES]], zi: &mut [[[f64; LANES]; 2]]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { sosfilt_lanes_avx2(sos, x, zi) };
    }
    sosfilt_lanes(sos, x, zi)
}

/// Signals filtered together by [`decimate_channels`].
const LANES: usize = 4;

/// `scipy.signal.decimate(x, q, axis=1, zero_phase=True)` on several signals of one length:
/// the same numbers as [`decimate`] on each, computed `LANES` signals at a time.
pub fn decimate_channels(channels: &[Vec<f64>], q: usize) -> Result<Vec<Vec<f64>>, String> {
    if q == 1 {
        return Ok(channels.to_vec());
    }
    let Some(n) = channels.first().map(Vec::len) else {
        return Ok(vec![]);
    };
    if channels.iter().any(|c| c.len() != n) {
        return Err("channels of different lengths".into());
    }
    let sos = cheby1_sos(8, 0.05, 0.8 / q as f64);
    let pad = 3 * (2 * sos.len() + 1);
    if n <= pad {
        return Err(format!(
            "the signal has {n} samples; zero-phase filtering needs more than {pad}"
        ));
    }
    let zi = sosfilt_zi(&sos);
    let mut out = Vec::with_capacity(channels.len());
    for group in channels.chunks(LANES) {
        // Odd extension per lane, as `sosfiltfilt`; unused lanes filter zeros.
        let mut ext = vec![[0.0; LANES]; n + 2 * pad];
        for (l, x) in group.iter().enumerate() {
            for i in 0..pad {
                ext[i][l] = 2.0 * x[0] - x[pad - i];
                ext[pad + n + i][l] = 2.0 * x[n - 1] - x[n - 2 - i];
            }
            for (e, &v) in ext[pad..pad + n].iter_mut().zip(x) {
                e[l] = v;
            }
        }
        let start = |edge: [f64; LANES]| -> Vec<[[f64; LANES]; 2]> {
            zi.iter()
                .map(|z| [edge.map(|e| z[0] * e), edge.map(|e| z[1] * e)])
                .collect()
        };
        let mut z = start(ext[0]);
        sosfilt_lanes_dispatch(&sos, &mut ext, &mut z);
        ext.reverse();
        let mut z = start(ext[0]);
        sosfilt_lanes_dispatch(&sos, &mut ext, &mut z);
        ext.reverse();
        for l in 0..group.len() {
            out.push(ext[pad..pad + n].iter().step_by(q).map(|v| v[l]).collect());
        }
    }
    Ok(out)
}

/// `scipy.signal.sosfiltfilt(sos, x)` with the default odd padding.
pub fn sosfiltfilt(sos: &Sos, x: &[f64]) -> Result<Vec<f64>, String> {
    let pad = 3 * (2 * sos.len() + 1);
    let n = x.len();
    if n <= pad {
        return Err(format!(
            "the signal has {n} samples; zero-phase filtering needs more than {pad}"
        ));
    }
    // Odd extension: 2·x[0] − x[pad..1] on the left, 2·x[n−1] − x[n−2..n−pad−1] on the right.
    let mut ext = Vec::with_capacity(n + 2 * pad);
    ext.extend((1..=pad).rev().map(|i| 2.0 * x[0] - x[i]));
    ext.extend_from_slice(x);
    ext.extend((1..=pad).map(|i| 2.0 * x[n - 1] - x[n - 1 - i]));
    let zi = sosfilt_zi(sos);
    let mut z: Vec<[f64; 2]> = zi.iter().map(|z| [z[0] * ext[0], z[1] * ext[0]]).collect();
    sosfilt(sos, &mut ext, &mut z);
    ext.reverse();
    let y0 = ext[0];
    let mut z: Vec<[f64; 2]> = zi.iter().map(|z| [z[0] * y0, z[1] * y0]).collect();
    sosfilt(sos, &mut ext, &mut z);
    ext.reverse();
    Ok(ext[pad..pad + n].to_vec())
}

/// `scipy.signal.decimate(x, q, zero_phase=True)` with the default IIR filter.
pub fn decimate(x: &[f64], q: usize) -> Result<Vec<f64>, String> {
    if q == 1 {
        return Ok(x.to_vec());
    }
    let sos = cheby1_sos(8, 0.05, 0.8 / q as f64);
    Ok(sosfiltfilt(&sos, x)?.into_iter().step_by(q).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_together_equal_one_at_a_time_bit_for_bit() {
        let channels: Vec<Vec<f64>> = (0..11)
            .map(|c| {
                (0..3000)
                    .map(|i| ((i * (c + 3)) as f64 * 0.013).sin() + c as f64 * 1e-3 * i as f64)
                    .collect()
            })
            .collect();
        for q in [4, 8] {
            let together = decimate_channels(&channels, q).unwrap();
            assert_eq!(together.len(), 11);
            for (c, x) in channels.iter().enumerate() {
                assert_eq!(together[c], decimate(x, q).unwrap(), "q {q} channel {c}");
            }
        }
    }
}
