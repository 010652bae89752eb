//! EEGLAB `.set` and Neuroscan `.cnt` readers against MNE's reading of the same files.
//!
//! The files in `fixtures/formats` are synthetic (no real recording of these formats may be
//! redistributed) and were written by the tools real files come from: MNE/eeglabio and scipy's
//! `savemat` for `.set`, the documented byte layout for `.cnt` (`generate.py` there says how).
//! The expected volts are MNE 1.13's `raw.get_data()`. Tolerance: exact (0 ulp) — both sides
//! compute the same f64 expressions in the same order.

use std::path::{Path, PathBuf};

use signal_diffusion_runtime::data::io::read_npy_f64;
use signal_diffusion_runtime::data::signal::{self, cnt, eeglab, mat};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/formats")
        .join(name)
}

struct Expected {
    names: Vec<String>,
    sfreq: f64,
    volts: Vec<Vec<f64>>,
}

fn expected(stem: &str) -> Expected {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("{stem}_meta.json"))).unwrap(),
    )
    .unwrap();
    let (shape, data) = read_npy_f64(&fixture(&format!("{stem}_volts.npy"))).unwrap();
    Expected {
        names: meta["ch_names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect(),
        sfreq: meta["sfreq"].as_f64().unwrap(),
        volts: data.chunks(shape[1]).map(<[f64]>::to_vec).collect(),
    }
}

/// Reads every channel through the format-independent entry point and compares with MNE.
fn check(file: &str, stem: &str) -> signal::Picked {
    let want = expected(stem);
    let all: Vec<usize> = (0..want.names.len()).collect();
    let got = signal::read_picks(&fixture(file), &all).unwrap();
    assert_eq!(got.labels, want.names, "{file}: channel names");
    assert!(got.sample_rates.iter().all(|&r| r == want.sfreq), "{file}");
    assert_eq!(got.volts.len(), want.volts.len());
    for (c, (g, w)) in got.volts.iter().zip(&want.volts).enumerate() {
        assert_eq!(g.len(), w.len(), "{file}: samples of channel {c}");
        let worst = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert_eq!(
            worst, 0.0,
            "{file}: channel {c} differs from MNE by {worst} V"
        );
    }
    // Picks in any order read the same values.
    let picks = [2, 0];
    let some = signal::read_picks(&fixture(file), &picks).unwrap();
    assert_eq!(some.volts[0], want.volts[2]);
    assert_eq!(some.volts[1], want.volts[0]);
    got
}

#[test]
fn eeglab_top_level_fields_embedded_single_precision() {
    check("eeglab_fields.set", "eeglab_fields");
}

#[test]
fn eeglab_compressed_struct_with_fdt_samples() {
    check("eeglab_struct.set", "eeglab_struct");
    let rec = eeglab::read(&fixture("eeglab_struct.set")).unwrap();
    assert_eq!((rec.samples, rec.sample_rate), (400, 500.0));
}

#[test]
fn mat_file_values() {
    let vars = mat::read(&fixture("eeglab_struct.set")).unwrap();
    let (name, eeg) = &vars[0];
    assert_eq!(name, "EEG");
    assert_eq!(eeg.field("srate").and_then(mat::Value::scalar), Some(500.0));
    assert_eq!(
        eeg.field("data").and_then(mat::Value::text),
        Some("eeglab_struct.fdt")
    );
    let locs = eeg.field("chanlocs").unwrap();
    assert_eq!(locs.len(), 5);
    assert_eq!(
        locs.field_of(4, "labels").and_then(mat::Value::text),
        Some("Cz")
    );
    assert!(eeg.field("event").unwrap().is_empty());
    // 1000/500 ms steps: a numeric row vector survives intact.
    match eeg.field("times").unwrap() {
        mat::Value::Numeric { dims, data } => {
            assert_eq!(dims, &[1, 400]);
            assert_eq!(data[3], 6.0);
        }
        other => panic!("times read as {other:?}"),
    }
}

#[test]
fn neuroscan_32_bit_interleaved() {
    let got = check("neuroscan_int32.cnt", "neuroscan_int32");
    assert!(got.warning.is_none());
}

#[test]
fn neuroscan_16_bit_in_blocks_of_40_samples() {
    let h = cnt::read_header(&fixture("neuroscan_int16_blocked.cnt")).unwrap();
    assert_eq!((h.width, h.channel_offset, h.samples), (2, 40, 480));
    check("neuroscan_int16_blocked.cnt", "neuroscan_int16_blocked");
}

#[test]
fn neuroscan_header_that_mne_1_6_refuses_reads_as_mne_1_5_did() {
    let got = check("neuroscan_broken_header.cnt", "neuroscan_broken_header");
    let warning = got.warning.expect("the repaired header is reported");
    assert!(warning.contains("MNE 1.5"), "{warning}");
}

#[test]
fn neuroscan_writer_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.cnt");
    let electrodes: Vec<cnt::Electrode> = ["FP1", "FPZ", "FP2"]
        .iter()
        .enumerate()
        .map(|(i, l)| cnt::Electrode {
            label: l.to_string(),
            baseline: i as i16 - 1,
            sensitivity: 0.0838,
            calibration: 1.0,
        })
        .collect();
    let raw: Vec<Vec<i32>> = (0..3)
        .map(|c| {
            (0..250)
                .map(|t| (t * 37 + c * 1000) % 5000 - 2500)
                .collect()
        })
        .collect();
    for width in [2, 4] {
        cnt::write(&path, 1000, &electrodes, &raw, width).unwrap();
        let got = signal::read_picks(&path, &[0, 1, 2]).unwrap();
        assert!(got.warning.is_none());
        for (c, ch) in got.volts.iter().enumerate() {
            let e = &electrodes[c];
            let want: Vec<f64> = raw[c]
                .iter()
                .map(|&d| (d as f64 - e.baseline as f64) * e.volts_per_count())
                .collect();
            assert_eq!(ch, &want, "width {width}, channel {c}");
        }
    }
}

#[test]
fn corrupt_and_truncated_files_are_errors_naming_the_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let cut = |src: &str, len: usize| {
        let bytes = std::fs::read(fixture(src)).unwrap();
        let path = dir.path().join(src);
        std::fs::write(&path, &bytes[..len.min(bytes.len())]).unwrap();
        path
    };
    // A .set cut inside its first variable.
    let p = cut("eeglab_fields.set", 600);
    let e = format!("{:#}", signal::read_picks(&p, &[0]).unwrap_err());
    assert!(
        e.contains("eeglab_fields.set") && e.contains("truncated"),
        "{e}"
    );
    assert!(e.contains("at byte 128"), "{e}");
    // A compressed .set whose stream is damaged.
    let mut bytes = std::fs::read(fixture("eeglab_struct.set")).unwrap();
    for b in &mut bytes[200..260] {
        *b ^= 0x5a;
    }
    let p = dir.path().join("damaged.set");
    std::fs::write(&p, &bytes).unwrap();
    let e = format!("{:#}", signal::read_picks(&p, &[0]).unwrap_err());
    assert!(e.contains("damaged.set") && e.contains("byte 128"), "{e}");
    // The .fdt next to it is missing.
    std::fs::copy(fixture("eeglab_struct.set"), dir.path().join("alone.set")).unwrap();
    let e = format!(
        "{:#}",
        signal::read_picks(&dir.path().join("alone.set"), &[0]).unwrap_err()
    );
    assert!(
        e.contains("eeglab_struct.fdt") && e.contains("missing"),
        "{e}"
    );
    // Not a MAT-file at all, and an HDF5 (v7.3) one.
    let p = dir.path().join("text.set");
    std::fs::write(&p, vec![b'x'; 200]).unwrap();
    let e = format!("{:#}", signal::read_picks(&p, &[0]).unwrap_err());
    assert!(e.contains("not a MAT-file"), "{e}");
    let mut v73 = b"MATLAB 7.3 MAT-file, Platform: GLNXA64".to_vec();
    v73.resize(512, 0);
    std::fs::write(&p, &v73).unwrap();
    let e = format!("{:#}", signal::read_picks(&p, &[0]).unwrap_err());
    assert!(e.contains("v7.3") && e.contains("'version', '7'"), "{e}");
    // A .cnt cut in its header, in its electrode records, and in its samples.
    let p = cut("neuroscan_int32.cnt", 380);
    let e = format!("{:#}", signal::read_picks(&p, &[0]).unwrap_err());
    assert!(
        e.contains("neuroscan_int32.cnt") && e.contains("`number of samples` needs bytes 864..868"),
        "{e}"
    );
    let p = cut("neuroscan_int32.cnt", 1000);
    let e = format!("{:#}", signal::read_picks(&p, &[0]).unwrap_err());
    assert!(e.contains("electrode records need bytes 900..1500"), "{e}");
    let p = cut("neuroscan_int32.cnt", 1500 + 8 * 4 * 100);
    let got = signal::read_picks(&p, &[0]).unwrap();
    assert_eq!(got.volts[0].len(), 100, "reads the samples that are there");
    assert!(got.warning.unwrap().contains("truncated"));
    // A channel the map needs but the file lacks.
    let e = format!(
        "{:#}",
        signal::read_picks(&fixture("neuroscan_int32.cnt"), &[8]).unwrap_err()
    );
    assert!(e.contains("has 8 channels; channel index 8"), "{e}");
}

#[test]
fn eeglab_writer_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub-001_task-Rest_eeg.set");
    let labels: Vec<String> = ["Fp1", "Fz", "Cz"].map(String::from).to_vec();
    let volts: Vec<Vec<f64>> = (0..3)
        .map(|c| {
            (0..700)
                .map(|t| ((t * (c + 1)) as f64 * 0.01).sin() * 3e-5)
                .collect()
        })
        .collect();
    eeglab::write(&path, &labels, 500.0, &volts).unwrap();
    let rec = eeglab::read(&path).unwrap();
    assert_eq!(
        (rec.labels.clone(), rec.sample_rate, rec.samples),
        (labels, 500.0, 700)
    );
    let got = rec.volts(&[0, 1, 2]).unwrap();
    for (g, w) in got.iter().zip(&volts) {
        for (a, b) in g.iter().zip(w) {
            // float32 microvolts in the .fdt: relative error below 2^-24.
            assert!((a - b).abs() <= 6e-8 * b.abs() + 1e-15, "{a} vs {b}");
        }
    }
}
