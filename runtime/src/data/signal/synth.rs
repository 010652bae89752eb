//! `sigdiff synth`: a small, clearly synthetic, multi-subject EEG dataset in a real raw layout,
//! preprocessed, so the quickstart trains on something with real EEG structure without any
//! download.
//!
//! Each subject has a gender, a health status and an age; its recording is 1/f-like background
//! (an Ornstein–Uhlenbeck process) plus rhythms whose parameters depend on those attributes the
//! way the literature describes on average: the alpha peak slows with age and is slightly faster
//! in women; Parkinson's disease slows and weakens alpha and raises theta. The recordings are
//! written as OpenNeuro ds004584 (the `parkinsons` dataset) is laid out — `participants.tsv`
//! and `sub-XXX/eeg/sub-XXX_task-Rest_eeg.set` + `.fdt`, 64 channels at 500 Hz — and then go
//! through `sigdiff preprocess parkinsons` (channel map, decimation to 125 Hz, 2048-sample
//! windows with 50 % overlap, log-frequency spectrograms, subject split) into `<out>/stfts`.

use std::f64::consts::PI;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use signal_diffusion_config::choice::{DataType, OutputType, PolarLayout};
use signal_diffusion_config::settings::{DatasetPaths, Settings};

use super::datasets::PARKINSONS_CHANNELS;
use super::preprocess::{PreprocessOptions, NSAMPS, SHIFT, TARGET_RATE};

#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Output directory: raw recordings go to `<out>/raw/parkinsons`, spectrograms to
    /// `<out>/stfts`.
    pub out: PathBuf,
    pub subjects: usize,
    /// 2048-sample windows per subject (16.4 s each at 125 Hz, overlapping by half).
    pub windows: usize,
    pub seed: u64,
    /// dB window of the 8-bit mapping (the reference's `math` dataset bounds, which fit these
    /// signals).
    pub min_db: f64,
    pub max_db: f64,
    /// Replace an existing demo dataset at `<out>`.
    pub overwrite: bool,
    /// Recordings preprocessed at once.
    pub jobs: usize,
}

/// The raw recordings' rate and channel count (ds004584: 500 Hz, 64 channels).
const RAW_RATE: f64 = 500.0;
const RAW_CHANNELS: usize = 64;

pub struct Subject {
    pub id: usize,
    pub female: bool,
    pub parkinsons: bool,
    pub age: u32,
}

/// One subject's recording of `samples` samples at `fs`, in volts, `RAW_CHANNELS` rows; the 20
/// channels of the parkinsons map carry the montage's posterior-anterior gradient.
///
/// Effects (averages reported in the EEG literature, exaggerated so a small model sees them in a
/// few minutes): women have higher broadband amplitude and a slightly faster alpha peak; the
/// alpha peak slows and weakens with age, and broadband power falls; Parkinson's disease
/// steepens the 1/f background (more slow-wave power), slows alpha and raises theta.
pub fn subject_recording(
    s: &Subject,
    samples: usize,
    fs: f64,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<f64>> {
    let age = (s.age as f64 - 20.0) / 60.0; // 0..1 over 20..80 years
    let alpha_hz =
        11.0 - 2.0 * age + if s.female { 0.6 } else { 0.0 } - if s.parkinsons { 1.2 } else { 0.0 };
    let alpha_amp = 24e-6 * (1.0 - 0.6 * age) * if s.parkinsons { 0.6 } else { 1.0 };
    let theta_amp = if s.parkinsons { 14e-6 } else { 4e-6 };
    // The background is an AR(1) process at 125 Hz with coefficient a and innovation σ; at any
    // rate the same continuous process (Ornstein–Uhlenbeck: the same spectrum below the
    // Nyquist frequency) has coefficient a^(125/fs) and the same stationary variance.
    let sigma_125 = if s.female { 6e-6 } else { 3.5e-6 } * (1.2 - 0.6 * age);
    let a_125: f64 = if s.parkinsons { 0.99 } else { 0.93 };
    let variance = sigma_125 * sigma_125 / (1.0 - a_125 * a_125);
    let a = a_125.powf(TARGET_RATE / fs);
    let sigma = (variance * (1.0 - a * a)).sqrt();
    let row_of = |ch: usize| PARKINSONS_CHANNELS.rows.iter().position(|&(_, i)| i == ch);
    (0..RAW_CHANNELS)
        .map(|ch| {
            // Alpha is strongest over the back of the head (the last rows of the map).
            let posterior = row_of(ch).map_or(1.0, |r| 0.5 + r as f64 / 20.0);
            let phases: [f64; 3] = [
                rng.random::<f64>() * 2.0 * PI,
                rng.random::<f64>() * 2.0 * PI,
                rng.random::<f64>() * 2.0 * PI,
            ];
            let mut ar = sigma_125 * gauss(rng);
            (0..samples)
                .map(|n| {
                    let t = n as f64 / fs;
                    ar = a * ar + sigma * gauss(rng);
                    ar + alpha_amp * posterior * (2.0 * PI * alpha_hz * t + phases[0]).sin()
                        + theta_amp * (2.0 * PI * 5.5 * t + phases[1]).sin()
                        + 3e-6 * (2.0 * PI * 21.0 * t + phases[2]).sin()
                })
                .collect()
        })
        .collect()
}

pub fn run(args: &SynthOptions) -> Result<()> {
    if args.subjects < 10 {
        bail!(
            "--subjects {} is too few for an 80/10/10 subject split; use at least 10",
            args.subjects
        );
    }
    if args.windows == 0 {
        bail!("--windows 0: each subject needs at least one window");
    }
    let (raw, stfts, meta) = (
        args.out.join("raw/parkinsons"),
        args.out.join("stfts"),
        args.out.join("meta"),
    );
    for dir in [&raw, &stfts, &meta] {
        if dir.exists() {
            if !args.overwrite {
                bail!(
                    "{} already exists; pass --overwrite to replace it",
                    dir.display()
                );
            }
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
        }
    }
    let started = std::time::Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let subjects: Vec<Subject> = (0..args.subjects)
        .map(|id| Subject {
            id: id + 1,
            female: rng.random_bool(0.5),
            parkinsons: rng.random_bool(0.4),
            age: rng.random_range(20..=80),
        })
        .collect();
    // Windows overlap by half: w windows need (w + 1) shifts at 125 Hz.
    let samples = ((args.windows + 1) * SHIFT).max(NSAMPS) * (RAW_RATE / TARGET_RATE) as usize;
    let labels: Vec<String> = (0..RAW_CHANNELS)
        .map(|ch| {
            PARKINSONS_CHANNELS
                .rows
                .iter()
                .find(|&&(_, i)| i == ch)
                .map_or(format!("E{}", ch + 1), |&(name, _)| name.to_string())
        })
        .collect();
    let mut participants = String::from("participant_id\tGROUP\tGENDER\tAGE\n");
    for s in &subjects {
        let id = format!("sub-{:03}", s.id);
        let mut srng =
            ChaCha8Rng::seed_from_u64(args.seed.wrapping_mul(1_000_003).wrapping_add(s.id as u64));
        let volts = subject_recording(s, samples, RAW_RATE, &mut srng);
        super::eeglab::write(
            &raw.join(&id)
                .join("eeg")
                .join(format!("{id}_task-Rest_eeg.set")),
            &labels,
            RAW_RATE,
            &volts,
        )?;
        participants.push_str(&format!(
            "{id}\t{}\t{}\t{}\n",
            if s.parkinsons { "PD" } else { "Control" },
            if s.female { "F" } else { "M" },
            s.age
        ));
        eprint!("\rsynth: {}/{} subjects written", s.id, subjects.len());
    }
    eprintln!();
    crate::data::io::write_atomic(&raw.join("participants.tsv"), |w| {
        Ok(w.write_all(participants.as_bytes())?)
    })?;
    std::fs::write(
        args.out.join("README.md"),
        "SYNTHETIC EEG, not recordings of people. Written by `sigdiff synth`: raw/parkinsons holds 64-channel 500 Hz \
         recordings in the OpenNeuro ds004584 layout whose rhythms depend on each synthetic subject's gender, health and \
         age; stfts holds them preprocessed as the reference does (log-frequency db-only spectrograms); meta holds \
         them as the weighted meta-dataset with captions (`sigdiff meta-dataset`).\n",
    )?;

    // Preprocess as `sigdiff preprocess parkinsons` does, with the demo's own paths.
    let settings = Settings {
        files: vec![],
        hf_models: Default::default(),
        data_root: args.out.join("raw"),
        output_root: args.out.clone(),
        max_sampling_weight: None,
        output_type: OutputType::DbOnly,
        data_type: DataType::Spectrogram,
        polar_layout: PolarLayout::PhaseCosSin,
        datasets: [(
            "parkinsons".to_string(),
            DatasetPaths {
                root: raw,
                output: stfts.clone(),
                timeseries_output: args.out.join("timeseries"),
                min_db: Some(args.min_db),
                max_db: Some(args.max_db),
                max_background_windows: 0,
            },
        )]
        .into(),
    };
    let summary = super::preprocess::run(
        &PreprocessOptions {
            datasets: vec!["parkinsons".into()],
            output_type: None,
            polar_layout: None,
            timeseries: false,
            include_math_trials: false,
            jobs: args.jobs,
            overwrite: false,
            seed: args.seed,
        },
        &settings,
    )?;
    if !summary.skipped.is_empty() {
        bail!("synthetic recordings were skipped: {:?}", summary.skipped);
    }
    // And as the weighted meta-dataset `sigdiff meta-dataset` writes (parquet, with the
    // reference's captions), what the caption-conditioned presets read.
    super::meta::run(
        &super::meta::MetaOptions {
            datasets: vec!["parkinsons".into()],
            output_dir: Some("meta".into()),
            copy_splits: ["train", "val", "test"].map(String::from).to_vec(),
            max_sampling_weight: None,
            overwrite: true,
            jobs: args.jobs,
        },
        &settings,
    )?;
    println!(
        "wrote {} synthetic subjects ({} spectrograms) to {} in {:.1} s",
        subjects.len(),
        summary.windows,
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn gauss(rng: &mut ChaCha8Rng) -> f64 {
    let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
    (-2.0 * u.ln()).sqrt() * (2.0 * PI * v).cos()
}

/// Synthetic CHB-MIT (`mit`) recordings in PhysioNet's layout, for the tests of the `mit`
/// adapter and its seizure classifier (runtime/tests/mit.rs, tests/train.rs): EDFs at 256 Hz in CHB-MIT's bipolar montage, each
/// case's `chbNN-summary.txt`, and `SUBJECT-INFO`. The signals are 20 µV of 10 Hz alpha plus
/// noise, and during each seizure a 3 Hz, 300 µV rhythm (a crude spike-wave stand-in).
pub mod chbmit {
    use std::f64::consts::TAU;
    use std::path::Path;

    use anyhow::Result;

    use crate::data::signal::edf::{self, Format, Recording, Signal};

    /// A 23-channel file's labels as PhysioNet writes them: the 18 double-banana derivations,
    /// P7-T7, T7-FT9, FT9-FT10, FT10-T8 and T8-P8 again, with two unused channels labelled `-`.
    pub const MONTAGE: [&str; 25] = [
        "FP1-F7", "F7-T7", "T7-P7", "P7-O1", "FP1-F3", "F3-C3", "C3-P3", "P3-O1", "FP2-F4",
        "F4-C4", "C4-P4", "P4-O2", "FP2-F8", "F8-T8", "T8-P8", "P8-O2", "FZ-CZ", "CZ-PZ", "-",
        "P7-T7", "T7-FT9", "FT9-FT10", "-", "FT10-T8", "T8-P8",
    ];

    /// `seconds` of EEG in `labels`' montage with `seizures` (`[start, end)` s). A repeated
    /// label's later copies are flat, so a reader that takes the first is seen to.
    pub fn write_edf(
        path: &Path,
        labels: &[&str],
        seconds: usize,
        seizures: &[(f64, f64)],
    ) -> Result<()> {
        let mut state = crate::data::io::fnv(path.to_string_lossy().as_bytes());
        let mut noise = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let signals = labels
            .iter()
            .enumerate()
            .map(|(c, l)| {
                let flat = labels[..c].contains(l);
                let samples = (0..256 * seconds).map(|n| {
                    if flat {
                        return 0.0;
                    }
                    let t = n as f64 / 256.0;
                    let mut uv = 20.0 * (TAU * 10.0 * t + c as f64).sin() + 10.0 * noise();
                    if seizures.iter().any(|&(a, b)| t >= a && t < b) {
                        uv += 300.0 * (TAU * 3.0 * t).sin();
                    }
                    uv
                });
                Signal::microvolts(l, 256, samples)
            })
            .collect();
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
        edf::write(
            path,
            &Recording::new(path, Format::Edf, 1.0, signals),
            Format::Edf,
        )
    }

    /// One file's entry of a `chbNN-summary.txt`, in the spelling of later cases (`Seizure 1
    /// Start Time:`, `numbered`) or of earlier ones (`Seizure Start Time:`).
    pub fn summary_entry(file: &str, seizures: &[(f64, f64)], numbered: bool) -> String {
        let mut s = format!(
            "File Name: {file}\nFile Start Time: 11:42:54\nFile End Time: 12:42:54\nNumber of Seizures in File: {}\n",
            seizures.len()
        );
        for (i, (a, b)) in seizures.iter().enumerate() {
            let n = if numbered {
                format!(" {}", i + 1)
            } else {
                String::new()
            };
            s.push_str(&format!(
                "Seizure{n} Start Time: {a} seconds\nSeizure{n} End Time: {b} seconds\n"
            ));
        }
        s + "\n"
    }

    /// `cases` cases under `root` (chb01, chb02, ...), alternating F/M, ages 5–20, each with
    /// one `seconds`-long file holding one seizure of a fifth of it at a case-dependent place,
    /// and `SUBJECT-INFO`.
    pub fn write_tree(root: &Path, cases: usize, seconds: usize) -> Result<()> {
        std::fs::create_dir_all(root)?;
        let mut info = String::from("Case\tGender\tAge (years)\n");
        for i in 1..=cases {
            let case = format!("chb{i:02}");
            let gender = if i % 2 == 1 { "F" } else { "M" };
            info.push_str(&format!("{case}\t{gender}\t{}\n", 5 + (i * 7) % 16));
            let length = seconds as f64 / 5.0;
            let start = (seconds as f64 - length) * ((i * 37) % 100) as f64 / 100.0;
            let seizure = [(start.floor(), (start + length).floor())];
            let file = format!("{case}_01.edf");
            write_edf(&root.join(&case).join(&file), &MONTAGE, seconds, &seizure)?;
            std::fs::write(
                root.join(&case).join(format!("{case}-summary.txt")),
                summary_entry(&file, &seizure, i % 2 == 0),
            )?;
        }
        std::fs::write(root.join("SUBJECT-INFO"), info)?;
        Ok(())
    }
}
