//! Preprocessing throughput on real EEG (the S001R02 fixture at 125 Hz, 20 channels, its six
//! 2048-sample windows repeated), printed as one JSON line per measurement so
//! `benches/preprocess.sh` can put them next to the numpy/scipy baseline.
//!
//! `cargo bench -p signal-diffusion-runtime --bench preprocess`

use std::path::Path;
use std::time::Instant;

use signal_diffusion_runtime::io::{read_npy_f64, write_png};
use signal_diffusion_runtime::signal::decimate::decimate;
use signal_diffusion_runtime::signal::spectrogram::{derive_hop, image, LogStft, OutputType};

const REPEAT: usize = 20;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let (_, x) = read_npy_f64(&dir.join("s001r02_picked_125hz_f64.npy")).unwrap();
    let rec: Vec<Vec<f64>> = x.chunks(7625).map(<[f64]>::to_vec).collect();
    let windows: Vec<Vec<Vec<f64>>> = (0..6)
        .map(|w| {
            rec.iter()
                .map(|ch| ch[w * 1024..w * 1024 + 2048].to_vec())
                .collect()
        })
        .collect();
    let stft = LogStft::new(256, derive_hop(2048, 256, 20, 4));
    let out = tempfile::tempdir().unwrap();
    let jobs: Vec<&Vec<Vec<f64>>> = (0..REPEAT).flat_map(|_| windows.iter()).collect();

    for threads in [1usize, 2] {
        for png in [false, true] {
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..threads {
                    let (jobs, stft, out) = (&jobs, &stft, out.path());
                    s.spawn(move || {
                        for (i, w) in jobs.iter().enumerate().skip(t).step_by(threads) {
                            let img = image(stft, w, OutputType::DbOnly, -127.028, -44.068);
                            if png {
                                write_png(&out.join(format!("{i}.png")), &img, 1, 256, 256)
                                    .unwrap();
                            }
                        }
                    });
                }
            });
            let secs = start.elapsed().as_secs_f64();
            println!("{{\"impl\": \"rust\", \"what\": \"db-only windows/s\", \"threads\": {threads}, \"png\": {png}, \"value\": {:.1}}}", jobs.len() as f64 / secs);
        }
    }

    // The DFT kernel alone, one thread: 20 channels × 255 rows × 12 frames × 511 samples × 2
    // (re, im) multiply-adds per window.
    let start = Instant::now();
    for w in &jobs {
        for ch in w.iter() {
            std::hint::black_box(stft.transform(ch));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let flops = jobs.len() as f64 * 20.0 * 255.0 * 12.0 * 511.0 * 2.0 * 2.0;
    println!("{{\"impl\": \"rust\", \"what\": \"DFT GFLOP/s (f64, 1 thread)\", \"threads\": 1, \"png\": false, \"value\": {:.2}}}", flops / secs / 1e9);

    // Zero-phase decimation: a 500 Hz signal of 10 minutes, q = 4.
    let long: Vec<f64> = (0..300_000)
        .map(|i| (i as f64 * 0.01).sin() + (i as f64 * 0.37).cos())
        .collect();
    let start = Instant::now();
    let n = 10;
    for _ in 0..n {
        std::hint::black_box(decimate(&long, 4).unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{{\"impl\": \"rust\", \"what\": \"decimation M input samples/s\", \"threads\": 1, \"png\": false, \"value\": {:.1}}}", (n * long.len()) as f64 / secs / 1e6);
}
