//! Loading a Parquet split of real 256×256 db-polar spectrograms (the S001R02 fixture's six
//! windows, repeated to 240 rows) into model inputs, one thread: PNG bytes decoded on every load
//! (no `dataset.cache_dir`) against the images decoded once into the cache and read back. One
//! JSON line per measurement (median of 5 passes over the split).
//!
//! `cargo bench -p signal-diffusion-runtime --bench loader`

mod common;

use std::path::Path;
use std::time::Instant;

use signal_diffusion_config::choice::{OutputType, PolarLayout};
use signal_diffusion_runtime::data::cache::cached;
use signal_diffusion_runtime::data::io::{encode_png, read_npy_f64};
use signal_diffusion_runtime::data::loader::{read_split, Split};
use signal_diffusion_runtime::data::signal::spectrogram::{derive_hop, image, LogStft};
use signal_diffusion_runtime::data::table::{Cell, Kind, Table, TableWriter};

const ROWS: usize = 240;

fn main() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let (_, x) = read_npy_f64(&fixtures.join("s001r02_picked_125hz_f64.npy")).unwrap();
    let rec: Vec<Vec<f64>> = x.chunks(7625).map(<[f64]>::to_vec).collect();
    let stft = LogStft::new(256, derive_hop(2048, 256, 20, 4));
    let pngs: Vec<Vec<u8>> = (0..6)
        .map(|w| {
            let window: Vec<Vec<f64>> = rec
                .iter()
                .map(|ch| ch[w * 1024..w * 1024 + 2048].to_vec())
                .collect();
            let px = image(
                &stft,
                &window,
                OutputType::DbPolar,
                PolarLayout::PhaseCosSin,
                -127.028,
                -44.068,
            );
            encode_png(&px, 3, 256, 256).unwrap()
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut t = Table::empty(&[("image", Kind::Image)]);
    for i in 0..ROWS {
        t.push_row(vec![Cell::Image(Some(pngs[i % 6].clone()))])
            .unwrap();
    }
    let mut w = TableWriter::create(&data.join("train.parquet"), &t).unwrap();
    w.write(&t).unwrap();
    w.finish().unwrap();

    let plain = read_split(&data, "train", &[], None).unwrap();
    let cache = tmp.path().join("cache");
    let started = Instant::now();
    let decoded = cached(
        read_split(&data, "train", &[], None).unwrap(),
        &data,
        &cache,
        None,
        1,
    )
    .unwrap();
    let fill = started.elapsed().as_secs_f64();
    for (what, split) in [
        ("decoded on every load", &plain),
        ("read from the cache", &decoded),
    ] {
        let secs = common::median_seconds(|| load_all(split));
        println!(
            "{{\"what\": \"samples/s, {what}\", \"threads\": 1, \"value\": {:.1}}}",
            ROWS as f64 / secs
        );
    }
    println!("{{\"what\": \"seconds to fill the cache\", \"threads\": 1, \"value\": {fill:.3}}}");
}

fn load_all(split: &Split) {
    let mut out = vec![];
    for i in 0..split.len() {
        split.load(i, &[3, 256, 256], 0, &mut out).unwrap();
        std::hint::black_box(&out);
    }
}
