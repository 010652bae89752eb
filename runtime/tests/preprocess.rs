//! `preprocess` on a small directory tree in the math dataset's real layout (eegmat: EDF at
//! 500 Hz in raw_eeg/, subject-info.csv), written by the test with our EDF writer.

use std::path::Path;

use signal_diffusion_config::choice::{OutputType, PolarLayout};
use signal_diffusion_config::settings::Env;

use crate::common::rows;
use signal_diffusion_runtime::data::signal::edf::{self, Format, Recording, Signal};
use signal_diffusion_runtime::data::signal::preprocess::{run, PreprocessOptions};

const LABELS: [&str; 21] = [
    "Fp1", "Fp2", "F3", "F4", "F7", "F8", "T3", "T4", "C3", "C4", "T5", "T6", "P3", "P4", "O1",
    "O2", "Fz", "Cz", "Pz", "A2-A1", "ECG",
];

fn write_subject(raw: &Path, name: &str, seconds: usize, alpha_uv: f64) {
    let signals = LABELS
        .iter()
        .enumerate()
        .map(|(c, l)| {
            let uv = (0..500 * seconds).map(|n| {
                let t = n as f64 / 500.0;
                alpha_uv * (2.0 * std::f64::consts::PI * 10.0 * t + c as f64).sin()
                    + 3.0 * ((n * 7919 + c * 104729) % 1000) as f64 / 1000.0
            });
            Signal::microvolts(&format!("EEG {l}"), 500, uv)
        })
        .collect();
    let rec = Recording::new(&raw.join(name), Format::Edf, 1.0, signals);
    edf::write(&raw.join(name), &rec, Format::Edf).unwrap();
}

fn setup(tmp: &Path) -> signal_diffusion_config::settings::Settings {
    let raw = tmp.join("raw/math/raw_eeg");
    std::fs::create_dir_all(&raw).unwrap();
    let mut info =
        String::from("Subject,Age,Gender,Recording year,Number of subtractions,Count quality\n");
    for s in 0..10 {
        // 25 s at 500 Hz -> 3125 samples at 125 Hz -> 2 windows.
        write_subject(&raw, &format!("Subject{s:02}_1.edf"), 25, 10.0 + s as f64);
        info.push_str(&format!(
            "Subject{s:02},{},{},2011,10,1\n",
            20 + s,
            if s % 2 == 0 { "F" } else { "M" }
        ));
    }
    write_subject(&raw, "Subject10_1.edf", 10, 10.0); // too short for one window
    info.push_str("Subject10,30,M,2011,10,1\n");
    std::fs::write(raw.join("subject-info.csv"), info).unwrap();
    let settings = tmp.join("settings.toml");
    std::fs::write(&settings, "[data]\nroot = \"raw\"\noutput_root = \"out\"\n\n[datasets.math]\nroot = \"math\"\noutput = \"math/stfts\"\ntimeseries_output = \"math/timeseries\"\nmin_db = -127.028\nmax_db = -44.068\n").unwrap();
    let env = Env::isolated(tmp.to_path_buf());
    signal_diffusion_config::load_settings(Some(&settings), &env).unwrap()
}

fn args(timeseries: bool) -> PreprocessOptions {
    PreprocessOptions {
        datasets: vec!["math".into()],
        output_type: None,
        polar_layout: None,
        timeseries,
        include_math_trials: false,
        jobs: 2,
        overwrite: false,
        seed: 205,
    }
}

#[test]
fn math_layout_becomes_the_reference_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let settings = setup(tmp.path());
    let summary = run(&args(false), &settings).unwrap();
    assert_eq!(
        (
            summary.recordings,
            summary.windows,
            summary.written,
            summary.existing
        ),
        (11, 20, 20, 0)
    );
    assert_eq!(summary.skipped.len(), 1);
    assert!(
        summary.skipped[0].0.ends_with("Subject10_1.edf")
            && summary.skipped[0].1.contains("no window fits"),
        "{:?}",
        summary.skipped
    );
    // The channel labels carry the "EEG " prefix the reference strips: no name warnings.
    assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);

    let out = tmp.path().join("out/math/stfts");
    let all = rows(&out.join("metadata.csv"));
    assert_eq!(
        all[0],
        [
            "file_name",
            "split",
            "state",
            "gender",
            "doingmath",
            "age",
            "math_condition"
        ]
    );
    // 11 subjects -> 9/1/1 by the reference's counts; the short one contributes no rows.
    let mut per_split = std::collections::BTreeMap::new();
    let mut subject_split = std::collections::BTreeMap::new();
    for r in &all[1..] {
        *per_split.entry(r[1].clone()).or_insert(0) += 1;
        let subject = r[0].split('/').nth(1).unwrap().to_string();
        assert_eq!(
            subject_split.entry(subject).or_insert(r[1].clone()),
            &r[1],
            "a subject in two splits"
        );
        assert!(
            r[0].starts_with(&format!("{}/sub", r[1])) && r[0].contains("/spectrogram-"),
            "{r:?}"
        );
        let age: usize = r[5].parse().unwrap();
        let nn: usize = r[0].split('/').nth(1).unwrap()[3..].parse().unwrap();
        assert_eq!(
            age,
            20 + nn,
            "metadata looked up by subject name, not by row (the reference's off-by-one)"
        );
        assert_eq!(r[6], if r[3] == "F" { "1" } else { "0" });
        let (px, c, h, w) = signal_diffusion_runtime::data::io::read_png(&out.join(&r[0])).unwrap();
        assert_eq!((c, h, w), (1, 256, 256));
        assert!(px.iter().any(|&p| p > 0));
    }
    assert_eq!(all.len() - 1, 20);
    for split in ["train", "val", "test"] {
        let n = rows(&out.join(format!("{split}-metadata.csv"))).len() - 1;
        assert_eq!(n, *per_split.get(split).unwrap_or(&0), "{split}");
    }

    // A rerun keeps what exists; an empty file (what a power loss can leave of an unsynced
    // write) counts as missing and is written again.
    std::fs::write(out.join(&all[1][0]), b"").unwrap();
    let again = run(&args(false), &settings).unwrap();
    assert_eq!((again.written, again.existing), (1, 19));
    assert!(signal_diffusion_runtime::data::io::read_png(&out.join(&all[1][0])).is_ok());

    // The dataset records what its pixels are; a rerun that would mix in another kind is
    // refused (naming the record and --overwrite), and --overwrite rewrites it as asked.
    let layout = |dir: &Path| std::fs::read_to_string(dir.join("layout.json")).unwrap();
    assert_eq!(layout(&out), "{\n  \"output_type\": \"db-only\"\n}");
    let polar = |polar_layout, overwrite| PreprocessOptions {
        output_type: Some(OutputType::DbPolar),
        polar_layout,
        overwrite,
        ..args(false)
    };
    let err = run(&polar(None, false), &settings).unwrap_err().to_string();
    assert!(
        err.contains("layout.json: this dataset holds db-only images")
            && err.contains("db-polar images in the `phase-cos-sin` layout")
            && err.contains("--overwrite"),
        "{err}"
    );
    let replaced = run(&polar(Some(PolarLayout::MagnitudePhase), true), &settings).unwrap();
    assert_eq!(replaced.written, 20);
    assert!(layout(&out).contains("\"polar_layout\": \"magnitude-phase\""));
    let (_, c, _, _) = signal_diffusion_runtime::data::io::read_png(&out.join(&all[1][0])).unwrap();
    assert_eq!(c, 3);
}

#[test]
fn timeseries_windows_and_statistics_are_written_where_readers_look() {
    let tmp = tempfile::tempdir().unwrap();
    let settings = setup(tmp.path());
    let summary = run(&args(true), &settings).unwrap();
    assert_eq!(summary.windows, 20);
    let ts = tmp.path().join("out/math/timeseries");
    let first = rows(&ts.join("train-metadata.csv"))[1][0].clone();
    assert!(
        first.contains("/Subject") && first.contains("/state-1/timeseries-"),
        "{first}"
    );
    let (shape, x) = signal_diffusion_runtime::data::io::read_npy_f32(&ts.join(&first)).unwrap();
    assert_eq!(shape, [20, 2048]);
    assert!(x.iter().all(|v| v.is_finite()));
    for dir in [&ts, &tmp.path().join("out/math/stfts")] {
        let stats: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("math_normalization_stats.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(stats["n_eeg_channels"], 20);
    }
}

#[test]
fn corrupt_recordings_are_skipped_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let settings = setup(tmp.path());
    let f = tmp.path().join("raw/math/raw_eeg/Subject03_1.edf");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let summary = run(&args(false), &settings).unwrap();
    let (path, why) = summary
        .skipped
        .iter()
        .find(|(p, _)| p.ends_with("Subject03_1.edf"))
        .expect("skipped");
    assert!(
        why.contains("Subject03_1.edf: truncated"),
        "{path:?}: {why}"
    );
}
