//! The log-frequency spectrogram against the reference's golden images of real EEG.
//! Tolerance: pixels exact (the fixtures have no value within 1e-6 of a quantisation boundary),
//! so every one of the 3 × 65,536 pixels must match.

use std::path::Path;

use signal_diffusion_runtime::io::{read_npy, read_npy_f64};
use signal_diffusion_runtime::signal::spectrogram::{db_only_image, derive_hop, LogStft};

const MATH_MIN_DB: f64 = -127.028;
const MATH_MAX_DB: f64 = -44.068;

#[test]
fn db_only_images_equal_the_reference_pixel_for_pixel() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let hop = derive_hop(2048, 256, 20, 4);
    assert_eq!(hop, 172);
    let stft = LogStft::new(256, hop);
    for w in 0..3 {
        let (shape, x) = read_npy_f64(&dir.join(format!("win{w}_input_f64.npy"))).unwrap();
        assert_eq!(shape, [20, 2048]);
        let channels: Vec<Vec<f64>> = x.chunks(2048).map(<[f64]>::to_vec).collect();
        let img = db_only_image(&stft, &channels, MATH_MIN_DB, MATH_MAX_DB);
        let (eshape, descr, expected) =
            read_npy(&dir.join(format!("win{w}_db_only_u8.npy"))).unwrap();
        assert_eq!(
            (eshape.as_slice(), descr.as_str()),
            ([256, 256].as_slice(), "|u1")
        );
        let diffs: Vec<(usize, u8, u8)> = img
            .iter()
            .zip(&expected)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| (i, *a, *b))
            .take(10)
            .collect();
        assert!(
            diffs.is_empty(),
            "window {w}: pixels differ (index, ours, reference): {diffs:?}"
        );
    }
}
