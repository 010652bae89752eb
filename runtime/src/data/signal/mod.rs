//! EEG signal processing: readers, decimation, the reference's log-frequency spectrogram and
//! its images, time-series normalisation, dataset layouts, preprocessing, and the synthetic demo.
pub mod cnt;
pub mod datasets;
pub mod decimate;
pub mod edf;
pub mod eeglab;
pub mod mat;
pub mod meta;
pub mod preprocess;
pub mod resample;
pub mod spectrogram;
pub mod synth;
pub mod timeseries;

use std::path::Path;

use anyhow::{bail, Result};

/// Channels picked from a raw recording, in volts, whatever its format.
#[derive(Debug)]
pub struct Picked {
    /// The picked channels' labels, as written in the file.
    pub labels: Vec<String>,
    pub sample_rates: Vec<f64>,
    pub volts: Vec<Vec<f64>>,
    /// Something about the file worth telling the user (a header repaired on reading).
    pub warning: Option<String>,
}

/// Reads the channels `picks` (indices in file order, data channels only) of an EDF/BDF
/// (`.edf`, `.bdf`), EEGLAB (`.set`) or Neuroscan (`.cnt`) recording. Only the picked channels
/// are converted to volts, so memory follows the picks, not the file.
pub fn read_picks(path: &Path, picks: &[usize]) -> Result<Picked> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let out_of_range = |n: usize| -> Result<()> {
        if let Some(&bad) = picks.iter().find(|&&c| c >= n) {
            bail!(
                "{}: has {n} channels; channel index {bad} was asked for",
                path.display()
            );
        }
        Ok(())
    };
    match ext.as_str() {
        "edf" | "bdf" => {
            let rec = edf::read(path)?;
            out_of_range(rec.signals.len())?;
            let signals: Vec<_> = picks.iter().map(|&c| &rec.signals[c]).collect();
            Ok(Picked {
                labels: signals.iter().map(|s| s.label.clone()).collect(),
                sample_rates: signals.iter().map(|s| s.sample_rate).collect(),
                volts: signals.iter().map(|s| s.volts()).collect(),
                warning: None,
            })
        }
        "set" => {
            let rec = eeglab::read(path)?;
            out_of_range(rec.labels.len())?;
            Ok(Picked {
                labels: picks.iter().map(|&c| rec.labels[c].clone()).collect(),
                sample_rates: vec![rec.sample_rate; picks.len()],
                volts: rec.volts(picks)?,
                warning: None,
            })
        }
        "cnt" => {
            let header = cnt::read_header(path)?;
            out_of_range(header.electrodes.len())?;
            Ok(Picked {
                labels: picks
                    .iter()
                    .map(|&c| header.electrodes[c].label.clone())
                    .collect(),
                sample_rates: vec![header.sample_rate; picks.len()],
                volts: header.volts(picks)?,
                warning: header.warning.clone(),
            })
        }
        _ => bail!(
            "{}: unknown recording format; readable are EDF/BDF (.edf, .bdf), EEGLAB (.set) and Neuroscan (.cnt)",
            path.display()
        ),
    }
}

/// Reads the channels called `names` (case-insensitive, surrounding spaces ignored; the first of
/// a repeated name) of an EDF/BDF recording, in the order of `names`. A missing one is an error
/// naming it and the file's channels.
pub fn read_named(path: &Path, names: &[&str]) -> Result<Picked> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ext != "edf" && ext != "bdf" {
        bail!(
            "{}: channels are picked by name from EDF/BDF recordings only",
            path.display()
        );
    }
    let rec = edf::read(path)?;
    let index = |name: &str| {
        rec.signals
            .iter()
            .position(|s| s.label.trim().eq_ignore_ascii_case(name))
    };
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| index(n).is_none())
        .collect();
    if !missing.is_empty() {
        bail!(
            "{}: no channel {} (it has: {})",
            path.display(),
            missing.join(", "),
            rec.signals
                .iter()
                .map(|s| s.label.trim())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let signals: Vec<_> = names
        .iter()
        .map(|n| &rec.signals[index(n).expect("checked above")])
        .collect();
    Ok(Picked {
        labels: signals.iter().map(|s| s.label.clone()).collect(),
        sample_rates: signals.iter().map(|s| s.sample_rate).collect(),
        volts: signals.iter().map(|s| s.volts()).collect(),
        warning: None,
    })
}
