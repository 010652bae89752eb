//! EEGLAB `.set` recordings (continuous data), read as MNE's `read_raw_eeglab` reads them.
//!
//! A `.set` is a MAT-file holding the EEG structure, either as one variable `EEG` (older
//! EEGLAB, and scipy/MNE writers) or as its fields at the top level (EEGLAB ≥ 2019). `EEG.data`
//! is either the samples (channels × points, any numeric class) or the name of a `.fdt` file of
//! float32 samples stored point by point (all channels of sample 0, then of sample 1, ...).
//! EEGLAB stores microvolts: volts = value · 1e-6, as MNE computes it (in f64, after the cast).
//! If the `.fdt` named inside was renamed on disk, the `.fdt` next to the `.set` with the same
//! stem is used, as MNE does.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::mat::{self, Value};

const VOLTS_PER_UNIT: f64 = 1e-6;

#[derive(Debug)]
pub struct Recording {
    pub path: PathBuf,
    pub labels: Vec<String>,
    pub sample_rate: f64,
    pub samples: usize,
    data: Data,
}

#[derive(Debug)]
enum Data {
    /// Channels × samples, column-major (as MATLAB stores it).
    Embedded(Vec<f64>),
    Fdt(PathBuf),
}

pub fn read(path: &Path) -> Result<Recording> {
    let p = path.display();
    let vars = mat::read(path)?;
    let top = Value::Struct {
        dims: vec![1, 1],
        fields: vars.iter().map(|(n, _)| n.clone()).collect(),
        values: vars.into_iter().map(|(_, v)| v).collect(),
    };
    if top.field("ALLEEG").is_some() {
        bail!("{p}: holds an ALLEEG array (several datasets); save one dataset per .set file");
    }
    let eeg = top.field("EEG").unwrap_or(&top);
    let number = |name: &str, default: Option<f64>| -> Result<f64> {
        match eeg.field(name) {
            Some(v) => v
                .scalar()
                .with_context(|| format!("{p}: EEG.{name} is not a number ({})", describe(v))),
            None => default.with_context(|| format!("{p}: no EEG.{name} field")),
        }
    };
    let nbchan = number("nbchan", Some(1.0))? as usize;
    let pnts = number("pnts", Some(1.0))? as usize;
    let trials = number("trials", Some(1.0))? as usize;
    let sample_rate = number("srate", None)?;
    if nbchan == 0 || nbchan > 100_000 {
        bail!("{p}: EEG.nbchan is {nbchan}; a recording has 1 to 100000 channels");
    }
    if trials != 1 {
        bail!(
            "{p}: holds {trials} epochs (EEG.trials); a continuous recording (1 trial) is needed"
        );
    }
    if !sample_rate.is_finite() || sample_rate <= 0.0 {
        bail!("{p}: EEG.srate is {sample_rate}, not a positive sampling rate");
    }
    let labels = match eeg.field("chanlocs") {
        Some(locs @ Value::Struct { .. }) if locs.len() == nbchan => (0..nbchan)
            .map(|i| {
                locs.field_of(i, "labels")
                    .and_then(Value::text)
                    .map(str::to_string)
                    .unwrap_or_else(|| (i + 1).to_string())
            })
            .collect(),
        _ => (1..=nbchan).map(|i| i.to_string()).collect(),
    };
    let data = match eeg.field("data") {
        Some(Value::Char(name)) => Data::Fdt(fdt_path(path, name)?),
        Some(Value::Numeric { dims, data }) => {
            if Some(data.len()) != nbchan.checked_mul(pnts) {
                bail!("{p}: EEG.data is {dims:?}, but EEG.nbchan × EEG.pnts = {nbchan} × {pnts}");
            }
            Data::Embedded(data.clone())
        }
        Some(other) => bail!(
            "{p}: EEG.data is {}, expected samples or a .fdt file name",
            describe(other)
        ),
        None => bail!("{p}: no EEG.data field"),
    };
    Ok(Recording {
        path: path.to_path_buf(),
        labels,
        sample_rate,
        samples: pnts,
        data,
    })
}

fn fdt_path(set: &Path, name: &str) -> Result<PathBuf> {
    let dir = set.parent().unwrap_or(Path::new("."));
    let named = dir.join(name);
    if named.extension().and_then(|e| e.to_str()) == Some("dat") {
        bail!("{}: EEG.data names `{name}`, the old .dat format; resave the dataset with a current EEGLAB (.fdt)", set.display());
    }
    if named.exists() {
        return Ok(named);
    }
    let sibling = set.with_extension("fdt");
    if sibling.exists() {
        return Ok(sibling);
    }
    bail!(
        "{}: its samples are in `{name}`, which is missing (tried {} and {})",
        set.display(),
        named.display(),
        sibling.display()
    )
}

impl Recording {
    /// The channels `picks` (file order indices), in volts.
    pub fn volts(&self, picks: &[usize]) -> Result<Vec<Vec<f64>>> {
        let n = self.labels.len();
        if let Some(&bad) = picks.iter().find(|&&c| c >= n) {
            bail!(
                "{}: has {n} channels; channel index {bad} was asked for",
                self.path.display()
            );
        }
        let mut out = vec![vec![]; picks.len()];
        match &self.data {
            Data::Embedded(data) => {
                // The sizes were checked against the data when it was read.
                for t in 0..self.samples {
                    let frame = &data[t * n..(t + 1) * n];
                    for (o, &c) in out.iter_mut().zip(picks) {
                        o.push(frame[c] * VOLTS_PER_UNIT);
                    }
                }
            }
            Data::Fdt(fdt) => {
                let frame_bytes = 4 * n;
                let expected = (frame_bytes as u64).saturating_mul(self.samples as u64);
                let len = std::fs::metadata(fdt)
                    .with_context(|| format!("cannot read {}", fdt.display()))?
                    .len();
                if len < expected {
                    bail!("{}: truncated: {n} channels × {} points of float32 need {expected} bytes, the file has {len}; sample {} is incomplete", fdt.display(), self.samples, len / frame_bytes as u64);
                }
                let mut reader = std::io::BufReader::with_capacity(
                    1 << 20,
                    std::fs::File::open(fdt)
                        .with_context(|| format!("cannot read {}", fdt.display()))?,
                );
                for o in &mut out {
                    o.reserve_exact(self.samples); // the file holds them: checked above
                }
                let mut frame = vec![0u8; frame_bytes];
                for t in 0..self.samples {
                    reader
                        .read_exact(&mut frame)
                        .with_context(|| format!("{}: cannot read sample {t}", fdt.display()))?;
                    for (o, &c) in out.iter_mut().zip(picks) {
                        let v = f32::from_le_bytes(
                            frame[4 * c..4 * c + 4].try_into().expect("4 bytes"),
                        );
                        o.push(v as f64 * VOLTS_PER_UNIT);
                    }
                }
            }
        }
        Ok(out)
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Numeric { dims, .. } => format!("a numeric array of size {dims:?}"),
        Value::Char(s) => format!("the text {s:?}"),
        Value::Struct { dims, .. } => format!("a struct array of size {dims:?}"),
        Value::Cell { dims, .. } => format!("a cell array of size {dims:?}"),
        Value::Unsupported { class } => format!("an array of MATLAB class {class}"),
    }
}

/// Writes a continuous recording as EEGLAB's "save as two files" does: `path` (`.set`, a
/// MAT-file with the `EEG` struct: sizes, rate, channel labels, the data file's name) and the
/// `.fdt` next to it (float32 microvolts, sample by sample). Both are written atomically.
pub fn write(path: &Path, labels: &[String], sample_rate: f64, volts: &[Vec<f64>]) -> Result<()> {
    let samples = volts.first().map_or(0, Vec::len);
    if labels.len() != volts.len() || volts.iter().any(|v| v.len() != samples) {
        bail!(
            "{}: {} labels for {} channels of unequal or mismatched lengths",
            path.display(),
            labels.len(),
            volts.len()
        );
    }
    let fdt = path.with_extension("fdt");
    crate::data::io::write_atomic(&fdt, |w| {
        let mut frame = Vec::with_capacity(4 * volts.len());
        for t in 0..samples {
            frame.clear();
            for ch in volts {
                frame.extend_from_slice(&((ch[t] / VOLTS_PER_UNIT) as f32).to_le_bytes());
            }
            w.write_all(&frame)?;
        }
        Ok(())
    })?;
    let scalar = |v: f64| Value::Numeric {
        dims: vec![1, 1],
        data: vec![v],
    };
    let chanlocs = Value::Struct {
        dims: vec![1, labels.len()],
        fields: vec!["labels".into(), "type".into()],
        values: labels
            .iter()
            .flat_map(|l| [Value::Char(l.clone()), Value::Char("EEG".into())])
            .collect(),
    };
    let fields = [
        (
            "setname",
            Value::Char(
                path.file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("")
                    .into(),
            ),
        ),
        ("nbchan", scalar(labels.len() as f64)),
        ("trials", scalar(1.0)),
        ("pnts", scalar(samples as f64)),
        ("srate", scalar(sample_rate)),
        ("xmin", scalar(0.0)),
        (
            "xmax",
            scalar(samples.saturating_sub(1) as f64 / sample_rate),
        ),
        (
            "data",
            Value::Char(
                fdt.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("")
                    .into(),
            ),
        ),
        ("chanlocs", chanlocs),
        ("ref", Value::Char("common".into())),
    ];
    let eeg = Value::Struct {
        dims: vec![1, 1],
        fields: fields.iter().map(|(n, _)| n.to_string()).collect(),
        values: fields.into_iter().map(|(_, v)| v).collect(),
    };
    mat::write(path, &[("EEG", &eeg)])
}
