//! `sigdiff synth`: a small, clearly synthetic, multi-subject EEG dataset, so the quickstart
//! trains on something with real EEG structure without any download.
//!
//! Each subject has a gender, a health status and an age; its 20-channel, 125 Hz signal is
//! 1/f-like background (an AR(1) process) plus rhythms whose parameters depend on those
//! attributes the way the literature describes on average: the alpha peak slows with age and is
//! slightly faster in women; Parkinson's disease slows and weakens alpha and raises theta. The
//! windows go through the reference's log-frequency spectrogram and db-only tiling, and are
//! written in the reference's preprocessed layout (`{split}/sub-NN/spectrogram-K.png` plus
//! `{split}-metadata.csv` and `metadata.csv`), split by subject 80/10/10.

use std::f64::consts::PI;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::spectrogram::{derive_hop, image, LogStft, OutputType};

#[derive(Debug, Clone, clap::Args)]
pub struct SynthArgs {
    /// Output directory; spectrograms go to `<out>/stfts`.
    #[arg(long, default_value = "data/demo")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 40)]
    pub subjects: usize,
    /// 2048-sample windows per subject (16.4 s each at 125 Hz).
    #[arg(long, default_value_t = 8)]
    pub windows: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// dB window of the 8-bit mapping (the reference's `math` dataset bounds).
    #[arg(long, default_value_t = -127.028, allow_hyphen_values = true)]
    pub min_db: f64,
    #[arg(long, default_value_t = -44.068, allow_hyphen_values = true)]
    pub max_db: f64,
    /// Replace an existing dataset at `<out>/stfts`.
    #[arg(long)]
    pub overwrite: bool,
}

const FS: f64 = 125.0;
const CHANNELS: usize = 20;
const NSAMPS: usize = 2048;

pub struct Subject {
    pub id: usize,
    pub female: bool,
    pub parkinsons: bool,
    pub age: u32,
}

/// One window of one subject's EEG, in volts: `CHANNELS` rows of `NSAMPS` samples.
///
/// Effects (averages reported in the EEG literature, exaggerated so a small model sees them in a
/// few minutes): women have higher broadband amplitude and a slightly faster alpha peak; the
/// alpha peak slows and weakens with age, and broadband power falls; Parkinson's disease steepens the 1/f background (more
/// slow-wave power), slows alpha and raises theta.
pub fn subject_window(s: &Subject, rng: &mut ChaCha8Rng) -> Vec<Vec<f64>> {
    let age = (s.age as f64 - 20.0) / 60.0; // 0..1 over 20..80 years
    let alpha_hz =
        11.0 - 2.0 * age + if s.female { 0.6 } else { 0.0 } - if s.parkinsons { 1.2 } else { 0.0 };
    let alpha_amp = 24e-6 * (1.0 - 0.6 * age) * if s.parkinsons { 0.6 } else { 1.0 };
    let theta_amp = if s.parkinsons { 14e-6 } else { 4e-6 };
    // Broadband power falls with age (by about half over 20..80 years here).
    let background = if s.female { 6e-6 } else { 3.5e-6 } * (1.2 - 0.6 * age);
    let ar_coef = if s.parkinsons { 0.99 } else { 0.93 };
    (0..CHANNELS)
        .map(|ch| {
            // Alpha is strongest over the back of the head (the last channels of the map).
            let posterior = 0.5 + ch as f64 / CHANNELS as f64;
            let phases: [f64; 3] = [
                rng.random::<f64>() * 2.0 * PI,
                rng.random::<f64>() * 2.0 * PI,
                rng.random::<f64>() * 2.0 * PI,
            ];
            let mut ar = 0.0;
            (0..NSAMPS)
                .map(|n| {
                    let t = n as f64 / FS;
                    ar = ar_coef * ar + background * gauss(rng);
                    ar + alpha_amp * posterior * (2.0 * PI * alpha_hz * t + phases[0]).sin()
                        + theta_amp * (2.0 * PI * 5.5 * t + phases[1]).sin()
                        + 3e-6 * (2.0 * PI * 21.0 * t + phases[2]).sin()
                })
                .collect()
        })
        .collect()
}

fn gauss(rng: &mut ChaCha8Rng) -> f64 {
    let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
    (-2.0 * u.ln()).sqrt() * (2.0 * PI * v).cos()
}

pub fn run(args: &SynthArgs) -> Result<()> {
    if args.subjects < 10 {
        bail!(
            "--subjects {} is too few for an 80/10/10 subject split; use at least 10",
            args.subjects
        );
    }
    let root = args.out.join("stfts");
    if root.exists() {
        if !args.overwrite {
            bail!(
                "{} already exists; pass --overwrite to replace it",
                root.display()
            );
        }
        std::fs::remove_dir_all(&root)
            .with_context(|| format!("cannot remove {}", root.display()))?;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let subjects: Vec<Subject> = (0..args.subjects)
        .map(|id| Subject {
            id,
            female: rng.random_bool(0.5),
            parkinsons: rng.random_bool(0.4),
            age: rng.random_range(20..=80),
        })
        .collect();
    // Subject-level split, round-half-even counts like the reference (80/10/10), seeded.
    let mut order: Vec<usize> = (0..subjects.len()).collect();
    rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rng);
    // The reference's counts: each split takes min(remaining, round_half_even(frac · n)) in
    // order, and the last takes the remainder (n = 15 gives 12/2/1).
    let n = subjects.len();
    let n_train = ((n as f64) * 0.8).round_ties_even() as usize;
    let n_val = (((n as f64) * 0.1).round_ties_even() as usize).min(n - n_train);
    let split_of = |pos: usize| {
        if pos < n_train {
            "train"
        } else if pos < n_train + n_val {
            "val"
        } else {
            "test"
        }
    };

    let hop = derive_hop(NSAMPS, 256, CHANNELS, 4);
    let stft = LogStft::new(256, hop);
    let mut rows: Vec<(String, String, &Subject)> = vec![];
    let started = std::time::Instant::now();
    for (pos, &si) in order.iter().enumerate() {
        let s = &subjects[si];
        let split = split_of(pos);
        let mut srng =
            ChaCha8Rng::seed_from_u64(args.seed.wrapping_mul(1_000_003).wrapping_add(s.id as u64));
        let windows: Vec<Vec<Vec<f64>>> = (0..args.windows)
            .map(|_| subject_window(s, &mut srng))
            .collect();
        // Two threads: the transform is the cost, and windows are independent.
        let images: Vec<Vec<u8>> = std::thread::scope(|sc| {
            let handles: Vec<_> = windows
                .chunks(windows.len().div_ceil(2).max(1))
                .map(|chunk| {
                    sc.spawn(|| {
                        chunk
                            .iter()
                            .map(|w| image(&stft, w, OutputType::DbOnly, args.min_db, args.max_db))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("spectrogram thread"))
                .collect()
        });
        for (k, img) in images.iter().enumerate() {
            let rel = format!("{split}/sub-{:02}/spectrogram-{k}.png", s.id);
            crate::io::write_png(&root.join(&rel), img, 1, 256, 256)?;
            rows.push((rel, split.to_string(), s));
        }
        eprint!("\rsynth: {}/{} subjects", pos + 1, subjects.len());
    }
    eprintln!();
    for split in ["train", "val", "test", "all"] {
        let name = if split == "all" {
            "metadata.csv".to_string()
        } else {
            format!("{split}-metadata.csv")
        };
        crate::io::write_atomic(&root.join(name), |w| {
            writeln!(w, "file_name,split,gender,health,age")?;
            for (rel, sp, s) in rows
                .iter()
                .filter(|(_, sp, _)| split == "all" || sp == split)
            {
                writeln!(
                    w,
                    "{rel},{sp},{},{},{}",
                    if s.female { "F" } else { "M" },
                    if s.parkinsons { "PD" } else { "H" },
                    s.age
                )?;
            }
            Ok(())
        })?;
    }
    std::fs::write(
        args.out.join("README.md"),
        "SYNTHETIC EEG, not recordings of people. Written by `sigdiff synth`: 20 channels at 125 Hz, rhythms that depend on \
         each synthetic subject's gender, health and age, turned into the reference's log-frequency db-only spectrograms.\n",
    )?;
    println!(
        "wrote {} spectrograms of {} synthetic subjects to {} in {:.1} s",
        rows.len(),
        subjects.len(),
        root.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
