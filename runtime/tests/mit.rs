//! The `mit` adapter on a synthetic CHB-MIT tree in PhysioNet's layout (written here: EDFs at
//! 256 Hz through our writer, `chbNN-summary.txt` in both seizure spellings, `SUBJECT-INFO`):
//! window counts and seizure labels against a hand computation, the background cap, the
//! montage picked by name (a repeated channel, placeholders, a file whose montage lacks one),
//! and chb21 kept with chb01.

use std::path::Path;

use signal_diffusion_config::settings::Env;

use crate::common::rows;
use signal_diffusion_runtime::data::signal::preprocess::{run, PreprocessOptions};

use signal_diffusion_runtime::data::signal::synth::chbmit::{summary_entry, MONTAGE};

fn write_edf(path: &Path, labels: &[&str], seconds: usize, seizures: &[(f64, f64)]) {
    signal_diffusion_runtime::data::signal::synth::chbmit::write_edf(
        path, labels, seconds, seizures,
    )
    .unwrap();
}

fn settings(tmp: &Path, cap: usize) -> signal_diffusion_config::settings::Settings {
    let path = tmp.join("settings.toml");
    std::fs::write(
        &path,
        format!("[data]\nroot = \"raw\"\noutput_root = \"out\"\n\n[datasets.mit]\nroot = \"chbmit\"\noutput = \"mit/stfts\"\ntimeseries_output = \"mit/timeseries\"\nmin_db = -127.028\nmax_db = -44.068\nmax_background_windows = {cap}\n"),
    )
    .unwrap();
    signal_diffusion_config::load_settings(Some(&path), &Env::isolated(tmp.to_path_buf())).unwrap()
}

fn args() -> PreprocessOptions {
    PreprocessOptions {
        datasets: vec!["mit".into()],
        output_type: None,
        polar_layout: None,
        timeseries: false,
        include_math_trials: false,
        jobs: 2,
        overwrite: true,
        seed: 3,
    }
}

/// chb01 (one 120 s file, a seizure at [40, 60) s, old spelling), chb21 (chb01 again, 120 s,
/// no seizure, numbered spelling), chb02 (a file with a seizure, and one whose montage lacks
/// FT10-T8), chb03 (a file its summary does not list).
fn write_tree(root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    std::fs::write(
        root.join("SUBJECT-INFO"),
        "Case\tGender\tAge (years)\nchb01\tF\t11\nchb02\tM\t11\nchb03\tF\t14\nchb21\tF\t13\n",
    )
    .unwrap();
    let seizure = [(40.0, 60.0)];
    write_edf(&root.join("chb01/chb01_03.edf"), &MONTAGE, 120, &seizure);
    std::fs::write(
        root.join("chb01/chb01-summary.txt"),
        "Data Sampling Rate: 256 Hz\n*************************\n\n".to_string()
            + &summary_entry("chb01_03.edf", &seizure, false),
    )
    .unwrap();
    write_edf(&root.join("chb21/chb21_01.edf"), &MONTAGE, 120, &[]);
    std::fs::write(
        root.join("chb21/chb21-summary.txt"),
        summary_entry("chb21_01.edf", &[], true),
    )
    .unwrap();
    let short: Vec<&str> = MONTAGE
        .iter()
        .copied()
        .filter(|l| *l != "FT10-T8")
        .collect();
    write_edf(
        &root.join("chb02/chb02_01.edf"),
        &MONTAGE,
        120,
        &[(100.0, 119.0)],
    );
    write_edf(&root.join("chb02/chb02_02.edf"), &short, 120, &[]);
    std::fs::write(
        root.join("chb02/chb02-summary.txt"),
        summary_entry("chb02_01.edf", &[(100.0, 119.0)], true)
            + &summary_entry("chb02_02.edf", &[], true),
    )
    .unwrap();
    write_edf(&root.join("chb03/chb03_01.edf"), &MONTAGE, 120, &[]);
    std::fs::write(
        root.join("chb03/chb03-summary.txt"),
        "Data Sampling Rate: 256 Hz\n",
    )
    .unwrap();
}

#[test]
fn chb_mit_windows_carry_the_summary_s_seizures() {
    let tmp = tempfile::tempdir().unwrap();
    write_tree(&tmp.path().join("raw/chbmit"));
    let summary = run(&args(), &settings(tmp.path(), 16)).unwrap();
    // 120 s at 125 Hz = 15000 samples: ⌊(15000 − 2048)/1024⌋ + 1 = 13 windows per file, for
    // chb01_03, chb21_01 and chb02_01; chb02_02 lacks FT10-T8, chb03_01 is not in its summary.
    assert_eq!(summary.windows, 39, "{summary:?}");
    assert_eq!(summary.skipped.len(), 1);
    assert!(
        summary.skipped[0].0.ends_with("chb02_02.edf")
            && summary.skipped[0].1.contains("no channel FT10-T8"),
        "{:?}",
        summary.skipped
    );
    assert!(
        summary
            .warnings
            .iter()
            .any(|w| w.contains("chb03_01.edf: not listed in")),
        "{:?}",
        summary.warnings
    );
    let out = tmp.path().join("out/mit/stfts");
    let all = rows(&out.join("metadata.csv"));
    assert_eq!(
        all[0],
        [
            "file_name",
            "split",
            "gender",
            "health",
            "age",
            "case",
            "seizure",
            "mit_condition"
        ]
    );
    // Window i covers [8.192·i, 8.192·i + 16.384) s; a seizure window overlaps the seizure by
    // ≥ 1.6384 s (10 %). [40, 60): windows 4..=7 (window 3 overlaps 0.96 s, window 8 none).
    // [100, 119): windows 11 ([90.1, 106.5) s, 6.5 s inside) and 12 (14.7 s); window 10 ends
    // at 98.3 s.
    let labels = |case: &str| -> Vec<u8> {
        all[1..]
            .iter()
            .filter(|r| r[5] == case)
            .map(|r| r[6].parse().unwrap())
            .collect()
    };
    assert_eq!(labels("chb01"), [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0]);
    assert_eq!(labels("chb21"), [0; 13]);
    assert_eq!(labels("chb02"), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]);
    assert_eq!(
        (summary.seizure, summary.background, summary.left_out),
        (6, 33, 0)
    );
    for r in &all[1..] {
        // chb21 is chb01: same subject directory and split, its own age; every case is EP.
        let (dir, age) = (r[0].split('/').nth(1).unwrap(), &r[4]);
        match r[5].as_str() {
            "chb21" => assert_eq!((dir, age.as_str(), r[2].as_str()), ("chb01", "13", "F")),
            "chb01" => assert_eq!((dir, age.as_str()), ("chb01", "11")),
            _ => assert_eq!((dir, age.as_str(), r[2].as_str()), ("chb02", "11", "M")),
        }
        assert_eq!(r[3], "EP");
        let female = usize::from(r[2] == "F");
        assert_eq!(
            r[7],
            (2 * r[6].parse::<usize>().unwrap() + female).to_string()
        );
    }
    let split_of = |case: &str| all[1..].iter().find(|r| r[5] == case).unwrap()[1].clone();
    assert_eq!(split_of("chb01"), split_of("chb21"));

    // The background cap: 3 per recording, spread evenly; every seizure window kept. chb01's
    // background windows are 0–3 and 8–12 (9): kept ⌊i·9/3⌋ = 0, 3, 6 of them = windows 0, 3,
    // 10. File names keep their window numbers.
    let capped = run(&args(), &settings(tmp.path(), 3)).unwrap();
    assert_eq!(
        (capped.seizure, capped.background, capped.left_out),
        (6, 9, 24)
    );
    let all = rows(&out.join("metadata.csv"));
    let chb01: Vec<String> = all[1..]
        .iter()
        .filter(|r| r[5] == "chb01")
        .map(|r| r[0].rsplit('/').next().unwrap().to_string())
        .collect();
    assert_eq!(
        chb01,
        [0, 3, 4, 5, 6, 7, 10].map(|k| format!("spectrogram-{k}.png"))
    );

    // Time series: the same windows and labels, as z-scored (20, 2048) float32 `.npy`.
    let series = run(
        &PreprocessOptions {
            timeseries: true,
            ..args()
        },
        &settings(tmp.path(), 3),
    )
    .unwrap();
    assert_eq!((series.seizure, series.background), (6, 9));
    let ts = tmp.path().join("out/mit/timeseries");
    let first = &rows(&ts.join("metadata.csv"))[1];
    let (dims, x) = signal_diffusion_runtime::data::io::read_npy_f32(&ts.join(&first[0])).unwrap();
    assert_eq!(dims, [20, 2048]);
    assert!(x.iter().all(|v| v.is_finite()));
}

#[test]
fn the_montage_is_read_by_name_from_the_first_of_a_repeated_channel() {
    use signal_diffusion_runtime::data::signal::datasets::MIT_CHANNELS;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("chb01_01.edf");
    write_edf(&path, &MONTAGE, 4, &[]);
    let picked = signal_diffusion_runtime::data::signal::read_named(&path, &MIT_CHANNELS).unwrap();
    assert_eq!(picked.labels, MIT_CHANNELS.map(String::from));
    // T8-P8 is the 15th of the montage; the file's second (flat) copy is not the one read.
    let t8p8 = &picked.volts[14];
    assert!(t8p8.iter().any(|v| v.abs() > 1e-6), "read the flat repeat");
}
