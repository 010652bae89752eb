//! Raw dataset layouts: which files are recordings, which subject each belongs to, its labels,
//! and which 20 channels to take. Each adapter turns a raw directory into [`Subject`]s.
//!
//! Implemented: `math` (PhysioNet EEG during mental arithmetic, "eegmat": EDF at 500 Hz).
//! `parkinsons` (EEGLAB), `seed` (Neuroscan CNT) and `longitudinal` need readers or layout
//! details that are not built yet and are refused with a message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The reference's 20-channel map: output row order, with each row's index in the raw file and
/// the 10-20 name expected there (a mismatch is reported, as the reference warns).
pub struct ChannelMap {
    pub rows: [(&'static str, usize); 20],
}

pub const MATH_CHANNELS: ChannelMap = ChannelMap {
    rows: [
        ("Fp1", 0),
        ("Fp2", 1),
        ("F3", 2),
        ("F4", 3),
        ("Fz", 16),
        ("F7", 4),
        ("F8", 5),
        ("C3", 8),
        ("C4", 9),
        ("Cz", 17),
        ("P3", 12),
        ("P4", 13),
        ("Pz", 18),
        ("O1", 14),
        ("O2", 15),
        ("T3", 6),
        ("T4", 7),
        ("T5", 10),
        ("T6", 11),
        ("A2-A1", 19),
    ],
};

/// One raw file to cut into windows, with the metadata every window of it carries.
#[derive(Debug, Clone)]
pub struct Recording {
    pub path: PathBuf,
    /// (column, value) in the reference's column order.
    pub metadata: Vec<(String, String)>,
    /// Where its time-series windows go under the split (math: `Subject{NN}/state-{s}`).
    pub timeseries_dir: String,
}

#[derive(Debug, Clone)]
pub struct Subject {
    /// Directory name under each split (`sub00`).
    pub dir: String,
    pub recordings: Vec<Recording>,
}

/// A dataset adapter: layout, sample rate, channels.
pub struct Adapter {
    pub name: &'static str,
    pub native_rate: f64,
    pub channels: &'static ChannelMap,
}

pub fn adapter(name: &str) -> Result<Adapter> {
    match name {
        "math" => Ok(Adapter {
            name: "math",
            native_rate: 500.0,
            channels: &MATH_CHANNELS,
        }),
        "parkinsons" => {
            bail!("dataset `parkinsons` needs the EEGLAB .set reader, which is not built yet")
        }
        "seed" => bail!("dataset `seed` needs the Neuroscan .cnt reader, which is not built yet"),
        "longitudinal" => bail!("dataset `longitudinal` (BIDS sessions) is not built yet"),
        other => bail!(
            "unknown dataset `{other}`: the datasets are math, parkinsons, seed and longitudinal"
        ),
    }
}

impl Adapter {
    /// The subjects found under `root`, sorted, with their recordings and labels.
    pub fn subjects(&self, root: &Path, include_math_trials: bool) -> Result<Vec<Subject>> {
        math_subjects(root, include_math_trials)
    }
}

/// eegmat: `<root>/raw_eeg/Subject{NN}_{state}.edf` (state 1 = background, 2 = arithmetic) and
/// `<root>/raw_eeg/subject-info.csv` (columns `Subject`, `Age`, `Gender`, ...).
///
/// Fixed on purpose: the reference looks a subject up by row `NN − 1` of subject-info.csv, but
/// eegmat counts from Subject00, so every subject got the previous one's age and gender; here
/// the row is found by its `Subject` value.
fn math_subjects(root: &Path, include_math_trials: bool) -> Result<Vec<Subject>> {
    let raw = root.join("raw_eeg");
    let info_path = raw.join("subject-info.csv");
    let mut info: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut rdr = csv::Reader::from_path(&info_path).with_context(|| {
        format!(
            "cannot read {} (the math dataset's subject table)",
            info_path.display()
        )
    })?;
    let headers = rdr.headers()?.clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(name))
            .with_context(|| format!("{}: no `{name}` column", info_path.display()))
    };
    let (c_subject, c_age, c_gender) = (col("Subject")?, col("Age")?, col("Gender")?);
    for (i, row) in rdr.records().enumerate() {
        let row = row.with_context(|| format!("{}: row {}", info_path.display(), i + 2))?;
        let subject = row[c_subject].trim().trim_end_matches(".edf").to_string();
        info.insert(
            subject,
            (
                row[c_age].trim().to_string(),
                row[c_gender].trim().to_string(),
            ),
        );
    }
    let states: &[u32] = if include_math_trials { &[1, 2] } else { &[1] };
    let mut names: Vec<String> = std::fs::read_dir(&raw)
        .with_context(|| format!("cannot list {}", raw.display()))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix("_1.edf"))
                .map(String::from)
        })
        .filter(|n| n.starts_with("Subject"))
        .collect();
    names.sort();
    let mut subjects = vec![];
    for name in names {
        if !states
            .iter()
            .all(|s| raw.join(format!("{name}_{s}.edf")).exists())
        {
            continue; // the reference keeps only subjects with every required state
        }
        let (age, gender) = info
            .get(&name)
            .with_context(|| format!("{}: no row for `{name}`", info_path.display()))?;
        let nn = &name[name.len().saturating_sub(2)..];
        let female = gender.eq_ignore_ascii_case("F");
        let recordings = states
            .iter()
            .map(|&s| {
                let doingmath = s == 2;
                Recording {
                    path: raw.join(format!("{name}_{s}.edf")),
                    metadata: vec![
                        ("state".into(), s.to_string()),
                        ("gender".into(), gender.clone()),
                        (
                            "doingmath".into(),
                            if doingmath { "True" } else { "False" }.into(),
                        ),
                        ("age".into(), age.clone()),
                        (
                            "math_condition".into(),
                            (2 * usize::from(doingmath) + usize::from(female)).to_string(),
                        ),
                    ],
                    timeseries_dir: format!("{name}/state-{s}"),
                }
            })
            .collect();
        subjects.push(Subject {
            dir: format!("sub{nn}"),
            recordings,
        });
    }
    if subjects.is_empty() {
        bail!(
            "{}: no `Subject{{NN}}_1.edf` recordings found",
            raw.display()
        );
    }
    Ok(subjects)
}
