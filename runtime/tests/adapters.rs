//! `preprocess` on small directory trees in the parkinsons (BIDS + EEGLAB .set/.fdt), seed
//! (Neuroscan .cnt + participants_info.csv) and longitudinal (BIDS sessions + EDF) layouts,
//! written by the test: file names, metadata columns and values, splits, and the windows.
//! (The math layout has its own test in preprocess.rs.)

use std::collections::BTreeMap;
use std::path::Path;

use signal_diffusion_config::settings::{Env, Settings};
use signal_diffusion_runtime::data::signal::cnt::{self, Electrode};
use signal_diffusion_runtime::data::signal::edf::{self, Format, Recording, Signal};
use signal_diffusion_runtime::data::signal::eeglab;
use signal_diffusion_runtime::data::signal::preprocess::{run, PreprocessOptions, Summary};

/// µV of channel `c` at sample `n` of a recording at `fs` Hz: a 10 Hz rhythm plus a ramp.
fn microvolts(c: usize, n: usize, fs: f64) -> f64 {
    let t = n as f64 / fs;
    20.0 * (2.0 * std::f64::consts::PI * 10.0 * t + c as f64).sin()
        + 4.0 * ((n * 7919 + c * 104729) % 1000) as f64 / 1000.0
}

fn settings(tmp: &Path, dataset: &str, min_db: f64, max_db: f64) -> Settings {
    let path = tmp.join("settings.toml");
    std::fs::write(
        &path,
        format!(
            "[data]\nroot = \"raw\"\noutput_root = \"out\"\n\n[datasets.{dataset}]\nroot = \"{dataset}\"\noutput = \"{dataset}/stfts\"\ntimeseries_output = \"{dataset}/timeseries\"\nmin_db = {min_db}\nmax_db = {max_db}\n"
        ),
    )
    .unwrap();
    let env = Env::isolated(tmp.to_path_buf());
    signal_diffusion_config::load_settings(Some(&path), &env).unwrap()
}

fn args(dataset: &str, timeseries: bool) -> PreprocessOptions {
    PreprocessOptions {
        datasets: vec![dataset.into()],
        output_type: None,
        polar_layout: None,
        timeseries,
        include_math_trials: false,
        jobs: 2,
        overwrite: false,
        seed: 7,
    }
}

/// metadata.csv as (header, rows of column -> value).
fn table(path: &Path) -> (Vec<String>, Vec<BTreeMap<String, String>>) {
    let mut rdr = csv::Reader::from_path(path).unwrap();
    let header: Vec<String> = rdr.headers().unwrap().iter().map(String::from).collect();
    let rows = rdr
        .records()
        .map(|r| {
            header
                .iter()
                .cloned()
                .zip(r.unwrap().iter().map(String::from))
                .collect()
        })
        .collect();
    (header, rows)
}

/// Every row's file exists, is a 256×256 image (or a (20, 2048) series), and the subject
/// directory sits in one split only.
fn check_files(out: &Path, rows: &[BTreeMap<String, String>], timeseries: bool) {
    let mut split_of = BTreeMap::new();
    for r in rows {
        let file = &r["file_name"];
        let mut parts = file.split('/');
        let split = parts.next().unwrap();
        assert_eq!(split, r["split"], "{file}");
        let subject = parts.next().unwrap().to_string();
        assert_eq!(split_of.entry(subject).or_insert(split), &split, "{file}");
        if timeseries {
            let (shape, _) =
                signal_diffusion_runtime::data::io::read_npy_f32(&out.join(file)).unwrap();
            assert_eq!(shape, [20, 2048]);
        } else {
            let (_, c, h, w) =
                signal_diffusion_runtime::data::io::read_png(&out.join(file)).unwrap();
            assert_eq!((c, h, w), (1, 256, 256), "{file}");
        }
    }
}

// ---------------------------------------------------------------- parkinsons (EEGLAB)

/// A `.set` + `.fdt` pair as EEGLAB saves it, with our writer.
fn write_set(set: &Path, labels: &[String], fs: f64, samples: usize) {
    let volts: Vec<Vec<f64>> = (0..labels.len())
        .map(|c| (0..samples).map(|n| microvolts(c, n, fs) * 1e-6).collect())
        .collect();
    eeglab::write(set, labels, fs, &volts).unwrap();
}

#[test]
fn parkinsons_bids_eeglab_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw/parkinsons");
    let labels: Vec<String> = (0..64).map(|i| format!("E{i}")).collect();
    let mut participants = String::from("participant_id\tGROUP\tGENDER\tAGE\n");
    // Rows out of order (the reference's positional lookup would mislabel them) and one
    // subject (sub-004) with no recording.
    for i in [3usize, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11] {
        let group = if i.is_multiple_of(2) { "PD" } else { "Control" };
        let gender = if i.is_multiple_of(3) { "F" } else { "M" };
        participants.push_str(&format!("sub-{i:03}\t{group}\t{gender}\t{}\n", 50 + i));
        if i == 4 {
            std::fs::create_dir_all(root.join(format!("sub-{i:03}/eeg"))).unwrap();
            continue;
        }
        let eeg = root.join(format!("sub-{i:03}/eeg"));
        std::fs::create_dir_all(&eeg).unwrap();
        // 17 s at 500 Hz: one window at 125 Hz.
        write_set(
            &eeg.join(format!("sub-{i:03}_task-Rest_eeg.set")),
            &labels,
            500.0,
            8500,
        );
    }
    std::fs::write(root.join("participants.tsv"), participants).unwrap();
    let s = settings(tmp.path(), "parkinsons", -120.0675, 2.9085);
    // No dataset named: the ones whose raw directory exists (here, parkinsons).
    let mut a = args("parkinsons", false);
    a.datasets.clear();
    let summary: Summary = run(&a, &s).unwrap();
    assert_eq!(
        (summary.recordings, summary.windows),
        (10, 10),
        "{summary:?}"
    );
    assert!(summary.skipped.is_empty());
    // Labels E0.. are not the map's names: one warning per channel per file, used by index.
    assert!(summary
        .warnings
        .iter()
        .any(|w| w.contains("the map expects `Fp1`")));

    let out = tmp.path().join("out/parkinsons/stfts");
    let (header, rows) = table(&out.join("metadata.csv"));
    assert_eq!(
        header,
        [
            "file_name",
            "split",
            "gender",
            "health",
            "age",
            "parkinsons_condition"
        ]
    );
    assert_eq!(rows.len(), 10);
    for r in &rows {
        let i: usize = r["file_name"].split('/').nth(1).unwrap()[4..]
            .parse()
            .unwrap();
        assert!(r["file_name"].ends_with("/spectrogram-0.png"), "{r:?}");
        assert_eq!(r["age"], (50 + i).to_string(), "found by participant_id");
        assert_eq!(r["health"], if i.is_multiple_of(2) { "PD" } else { "H" });
        assert_eq!(r["gender"], if i.is_multiple_of(3) { "F" } else { "M" });
        let condition = 2 * usize::from(i.is_multiple_of(2)) + usize::from(i.is_multiple_of(3));
        assert_eq!(r["parkinsons_condition"], condition.to_string());
    }
    check_files(&out, &rows, false);
    // 10 subjects: 8/1/1.
    let count = |split: &str| rows.iter().filter(|r| r["split"] == split).count();
    assert_eq!((count("train"), count("val"), count("test")), (8, 1, 1));
}

// ---------------------------------------------------------------- seed (Neuroscan)

fn write_cnt(path: &Path, seconds: usize) {
    let n_ch = 63;
    let fs = 1000;
    let electrodes: Vec<Electrode> = (0..n_ch)
        .map(|c| Electrode {
            label: if c == 0 {
                "FP1".into()
            } else {
                format!("CH{c}")
            },
            baseline: 0,
            sensitivity: 0.0838,
            calibration: 1.0,
        })
        .collect();
    let per_count = electrodes[0].volts_per_count() * 1e6; // µV per count
    let raw: Vec<Vec<i32>> = (0..n_ch)
        .map(|c| {
            (0..seconds * fs)
                .map(|n| (microvolts(c, n, fs as f64) / per_count).round() as i32)
                .collect()
        })
        .collect();
    cnt::write(path, fs as u16, &electrodes, &raw, 4).unwrap();
}

#[test]
fn seed_trials_of_neuroscan_sessions() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw/seed");
    let raw = root.join("EEG_raw");
    std::fs::create_dir_all(&raw).unwrap();
    // 50 s: trial 0 of every session (from 30 s) holds 20 s = 2500 samples at 125 Hz, one
    // window; every later trial starts after the end of the file.
    write_cnt(&raw.join("1_1_20180804.cnt"), 50);
    write_cnt(&raw.join("1_2_20180807.cnt"), 50);
    write_cnt(&raw.join("2_3_20180810.cnt"), 50);
    std::fs::write(
        root.join("participants_info.csv"),
        "Subject,Sex,Age\n1,F,22\n2,male,25\n",
    )
    .unwrap();
    let s = settings(tmp.path(), "seed", -119.0125, -5.0875);
    let summary = run(&args("seed", true), &s).unwrap();
    assert_eq!((summary.recordings, summary.windows), (3, 3), "{summary:?}");

    let out = tmp.path().join("out/seed/timeseries");
    let (header, mut rows) = table(&out.join("metadata.csv"));
    assert_eq!(
        header,
        [
            "file_name",
            "split",
            "session",
            "trial",
            "gender",
            "health",
            "age",
            "emotion_id",
            "emotion",
            "emotion_label",
            "seed_condition"
        ]
    );
    check_files(&out, &rows, true);
    rows.sort_by(|a, b| {
        a["file_name"][a["file_name"].find('/').unwrap()..]
            .cmp(&b["file_name"][b["file_name"].find('/').unwrap()..])
    });
    let names: Vec<&str> = rows
        .iter()
        .map(|r| &r["file_name"][r["file_name"].find('/').unwrap() + 1..])
        .collect();
    assert_eq!(
        names,
        [
            "sub-01/timeseries-s1-t0-0.npy",
            "sub-01/timeseries-s2-t0-0.npy",
            "sub-02/timeseries-s3-t0-0.npy"
        ]
    );
    // Session 1 trial 0 is happy (4), sessions 2 and 3 start with sad (2).
    let fields = |r: &BTreeMap<String, String>| {
        [
            "session",
            "trial",
            "gender",
            "health",
            "age",
            "emotion_id",
            "emotion_label",
            "seed_condition",
        ]
        .map(|k| r[k].clone())
    };
    assert_eq!(
        fields(&rows[0]),
        ["0", "0", "F", "H", "22", "4", "happy", "9"]
    );
    assert_eq!(
        fields(&rows[1]),
        ["1", "0", "F", "H", "22", "2", "sad", "5"]
    );
    assert_eq!(
        fields(&rows[2]),
        ["2", "0", "M", "H", "25", "2", "sad", "4"]
    );
    // Statistics over whole recordings, written next to both outputs.
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("seed_normalization_stats.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        stats["n_samples_total"],
        20 * 3 * 50 * 125,
        "channels × samples"
    );
}

// ---------------------------------------------------------------- longitudinal (BIDS + EDF)

fn write_edf(path: &Path, n_ch: usize, seconds: usize) {
    let signals = (0..n_ch)
        .map(|c| {
            let label = if c == 0 {
                "Fp1".into()
            } else {
                format!("E{c}")
            };
            Signal::microvolts(
                &label,
                1000,
                (0..1000 * seconds).map(|n| microvolts(c, n, 1000.0)),
            )
        })
        .collect();
    let rec = Recording::new(path, Format::Edf, 1.0, signals);
    edf::write(path, &rec, Format::Edf).unwrap();
}

#[test]
fn longitudinal_sessions_and_acquisitions() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw/longitudinal");
    let rec = |sub: &str, ses: u32, acq: &str, seconds: usize| {
        let dir = root.join(format!("{sub}/ses-{ses}/eeg"));
        std::fs::create_dir_all(&dir).unwrap();
        write_edf(
            &dir.join(format!("{sub}_ses-{ses}_task-EyesOpen_acq-{acq}_eeg.edf")),
            55,
            seconds,
        );
    };
    // sub-001: both sessions, both acquisitions, years known (2016, 2021 + 1 = 6 years).
    for ses in [1, 2] {
        for acq in ["pre", "post"] {
            rec("sub-001", ses, acq, 17);
        }
    }
    std::fs::write(
        root.join("sub-001/sub-001_sessions.tsv"),
        "session_id\trecording_year\nses-1\t2016\nses-2\t2022\n",
    )
    .unwrap();
    // sub-002: session 2 only flagged; no sessions.tsv -> +5 years with a warning; its
    // session-1 file exists but is not flagged, so it is not used. No post file.
    rec("sub-002", 1, "pre", 17);
    rec("sub-002", 2, "pre", 17);
    // sub-003: too short for a window.
    rec("sub-003", 1, "pre", 10);
    std::fs::write(
        root.join("participants.tsv"),
        "participant_id\tage\tsex\thandedness\tsession1\tsession2\n\
         sub-001\t40\tfemale\tright\tyes\tyes\n\
         sub-002\t61\tmale\tleft\tno\tyes\n\
         sub-003\t30\tn/a\tright\tyes\tno\n",
    )
    .unwrap();
    let s = settings(tmp.path(), "longitudinal", -130.984, -4.088);
    let summary = run(&args("longitudinal", false), &s).unwrap();
    assert_eq!((summary.recordings, summary.windows), (6, 5), "{summary:?}");
    assert_eq!(summary.skipped.len(), 1);
    assert!(summary.skipped[0]
        .0
        .ends_with("sub-003_ses-1_task-EyesOpen_acq-pre_eeg.edf"));
    assert!(summary
        .warnings
        .iter()
        .any(|w| w.contains("sub-002/ses-2") && w.contains("5 years")));
    assert!(summary
        .warnings
        .iter()
        .any(|w| w.contains("sub-003") && w.contains("gender")));

    let out = tmp.path().join("out/longitudinal/stfts");
    let (header, rows) = table(&out.join("metadata.csv"));
    assert_eq!(
        header,
        [
            "file_name",
            "split",
            "gender",
            "age",
            "acquisition",
            "handedness",
            "health",
            "session",
            "recording_year"
        ]
    );
    check_files(&out, &rows, false);
    let mut got: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {} {} {} {}",
                &r["file_name"][r["file_name"].find('/').unwrap() + 1..],
                r["gender"],
                r["age"],
                r["acquisition"],
                r["handedness"],
                r["session"],
                r["recording_year"]
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "sub-001/spectrogram-0.png F 40 pre right ses-1 2016",
            "sub-001/spectrogram-1.png F 40 post right ses-1 2016",
            "sub-001/spectrogram-2.png F 46 pre right ses-2 2022",
            "sub-001/spectrogram-3.png F 46 post right ses-2 2022",
            "sub-002/spectrogram-0.png M 66 pre left ses-2 ",
        ]
    );
}
