//! Zero-phase decimation against scipy 1.17 on real EEG (tolerances from the fixtures' README:
//! the filter's sections 1e-14 relative, filtered and decimated signals 1e-12 × max|x|).

use std::path::Path;

use signal_diffusion_runtime::data::io::read_npy_f64;
use signal_diffusion_runtime::data::signal::decimate::{cheby1_sos, decimate, sosfiltfilt};

fn fixture(name: &str) -> Vec<f64> {
    read_npy_f64(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
    .1
}

#[test]
fn chebyshev_sections_equal_scipys() {
    let expected = fixture("decim_cheby1_sos_f64.npy");
    let sos = cheby1_sos(8, 0.05, 0.2);
    assert_eq!(sos.len(), 4);
    for (i, (got, want)) in sos.iter().flatten().zip(&expected).enumerate() {
        let rel = (got - want).abs() / want.abs().max(1e-300);
        assert!(
            rel <= 1e-14 || (got - want).abs() <= 1e-14,
            "coefficient {i}: {got} vs {want}"
        );
    }
}

#[test]
fn filtfilt_and_decimate_equal_scipys() {
    let x = fixture("decim_oz_500hz_8s_in_f64.npy");
    let tol = 1e-12 * x.iter().fold(0f64, |m, v| m.max(v.abs()));
    let sos = cheby1_sos(8, 0.05, 0.2);
    let filtered = sosfiltfilt(&sos, &x).unwrap();
    for (i, (a, b)) in filtered
        .iter()
        .zip(fixture("decim_oz_500hz_8s_filtfilt_f64.npy"))
        .enumerate()
    {
        assert!((a - b).abs() <= tol, "filtfilt sample {i}: {a} vs {b}");
    }
    let out = decimate(&x, 4).unwrap();
    let want = fixture("decim_oz_125hz_8s_out_f64.npy");
    assert_eq!(out.len(), want.len());
    for (i, (a, b)) in out.iter().zip(&want).enumerate() {
        assert!((a - b).abs() <= tol, "decimated sample {i}: {a} vs {b}");
    }
}

#[test]
fn too_short_signals_are_an_error_not_a_panic() {
    assert!(decimate(&[1.0; 20], 4)
        .unwrap_err()
        .contains("needs more than 27"));
}

/// `resample_poly(x, 125, 256)` (256 Hz recordings such as CHB-MIT's to the pipeline's 125 Hz)
/// against scipy 1.17 (fixtures/resample/generate.py): within 1e-12 × max|x|, at a length the
/// down factor divides and one it does not.
#[test]
fn resampling_256_to_125_hz_equals_scipys_resample_poly() {
    use signal_diffusion_runtime::data::signal::resample::resample_poly;
    for n in [2560, 2001] {
        let x = fixture(&format!("resample/in_{n}_f64.npy"));
        let want = fixture(&format!("resample/out_{n}_f64.npy"));
        let got = resample_poly(&x, 125, 256);
        assert_eq!(got.len(), want.len(), "n = {n}");
        let scale = x.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        assert!(
            worst <= 1e-12 * scale,
            "n = {n}: max |ours − scipy| = {worst:e}"
        );
    }
}
