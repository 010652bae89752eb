//! Preprocessing throughput on real EEG (the S001R02 fixture at 125 Hz, 20 channels, its six
//! 2048-sample windows repeated), printed as one JSON line per measurement so
//! `benches/preprocess.sh` can put them next to the numpy/scipy baseline.
//!
//! `cargo bench -p signal-diffusion-runtime --bench preprocess`

mod common;

use std::path::Path;

use signal_diffusion_config::choice::{OutputType, PolarLayout};
use signal_diffusion_runtime::data::io::{read_npy_f64, write_png};
use signal_diffusion_runtime::data::signal::decimate::{decimate, decimate_channels};
use signal_diffusion_runtime::data::signal::spectrogram::{derive_hop, image, LogStft};

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
            let secs = common::median_seconds(|| {
                std::thread::scope(|s| {
                    for t in 0..threads {
                        let (jobs, stft, out) = (&jobs, &stft, out.path());
                        s.spawn(move || {
                            for (i, w) in jobs.iter().enumerate().skip(t).step_by(threads) {
                                let img = image(
                                    stft,
                                    w,
                                    OutputType::DbOnly,
                                    PolarLayout::PhaseCosSin,
                                    -127.028,
                                    -44.068,
                                );
                                if png {
                                    write_png(&out.join(format!("{i}.png")), &img, 1, 256, 256)
                                        .unwrap();
                                }
                            }
                        });
                    }
                })
            });
            println!("{{\"impl\": \"rust\", \"what\": \"db-only windows/s\", \"threads\": {threads}, \"png\": {png}, \"value\": {:.1}}}", jobs.len() as f64 / secs);
        }
    }

    // The transform alone, one thread, all 20 channels of a window at once: two products of
    // the 255×255 cos/sin tables with 255 × (20 channels × 12 frames) even/odd parts — the
    // arithmetic actually done — next to the direct DFT's count (20 × 255 rows × 12 frames ×
    // 511 samples × 2 (re, im) multiply-adds) that the centred sums halve.
    let secs = common::median_seconds(|| {
        for w in &jobs {
            std::hint::black_box(stft.transform_channels(w));
        }
    });
    let done = jobs.len() as f64 * 2.0 * 255.0 * 255.0 * 240.0 * 2.0;
    let direct = jobs.len() as f64 * 20.0 * 255.0 * 12.0 * 511.0 * 2.0 * 2.0;
    println!("{{\"impl\": \"rust\", \"what\": \"DFT GFLOP/s done (f64, 1 thread)\", \"threads\": 1, \"png\": false, \"value\": {:.2}}}", done / secs / 1e9);
    println!("{{\"impl\": \"rust\", \"what\": \"DFT GFLOP/s direct-DFT equivalent (f64, 1 thread)\", \"threads\": 1, \"png\": false, \"value\": {:.2}}}", direct / secs / 1e9);

    // The DFT's GEMMs run at the widest unit the kernels may use: its share of that f64 peak.
    if let Some(isa) = common::Isa::of_kernels() {
        let peak = common::fma_peak(isa, true, 1);
        println!("{{\"impl\": \"rust\", \"what\": \"f64 FMA peak GFLOP/s ({}, 1 thread, measured)\", \"threads\": 1, \"png\": false, \"value\": {peak:.2}}}", isa.name());
        println!("{{\"impl\": \"rust\", \"what\": \"DFT share of the FMA peak\", \"threads\": 1, \"png\": false, \"value\": {:.2}}}", done / secs / 1e9 / peak);
    }

    // Zero-phase decimation: a 500 Hz signal of 10 minutes, q = 4.
    let long: Vec<f64> = (0..300_000)
        .map(|i| (i as f64 * 0.01).sin() + (i as f64 * 0.37).cos())
        .collect();
    let n = 10;
    let secs = common::median_seconds(|| {
        for _ in 0..n {
            std::hint::black_box(decimate(&long, 4).unwrap());
        }
    });
    println!("{{\"impl\": \"rust\", \"what\": \"decimation M input samples/s\", \"threads\": 1, \"png\": false, \"value\": {:.1}}}", (n * long.len()) as f64 / secs / 1e6);

    // The preprocessing case: 20 channels of one recording (5 minutes at 500 Hz) together.
    let channels: Vec<Vec<f64>> = (0..20)
        .map(|c| {
            long[..150_000]
                .iter()
                .map(|v| v * (1.0 + c as f64 * 0.01))
                .collect()
        })
        .collect();
    let secs = common::median_seconds(|| {
        std::hint::black_box(decimate_channels(&channels, 4).unwrap());
    });
    println!("{{\"impl\": \"rust\", \"what\": \"decimation of 20 channels M input samples/s\", \"threads\": 1, \"png\": false, \"value\": {:.1}}}", 20.0 * 150_000.0 / secs / 1e6);
}
