//! Raw dataset layouts: which files are recordings, which subject each belongs to, its labels,
//! and which 20 channels to take. Each adapter turns a raw directory into [`Subject`]s.
//!
//! | dataset | layout | format, rate |
//! |---|---|---|
//! | `math` (PhysioNet eegmat) | `raw_eeg/Subject{NN}_{state}.edf`, `raw_eeg/subject-info.csv` | EDF, 500 Hz |
//! | `parkinsons` (OpenNeuro ds004584) | `sub-XXX/eeg/*eeg.set`, `participants.tsv` | EEGLAB, 500 Hz |
//! | `seed` (SEED-V) | `EEG_raw/{subject}_{session}_{date}.cnt`, `participants_info.csv` | Neuroscan, 1000 Hz |
//! | `longitudinal` (Dortmund Vital Study, BIDS) | `sub-XXX/ses-{1,2}/eeg/sub-XXX_ses-N_task-EyesOpen_acq-{pre,post}_eeg.edf`, `participants.tsv`, `sub-XXX/sub-XXX_sessions.tsv` | EDF, 1000 Hz |
//! | `mit` (PhysioNet CHB-MIT) | `chbNN/chbNN_MM.edf`, `chbNN/chbNN-summary.txt`, `SUBJECT-INFO` | EDF, 256 Hz (resampled) |
//!
//! Labels, column order and file names follow the reference (data.md §2.3, §3.6). Where the
//! reference finds a subject's row by position, here it is found by its id (math, parkinsons),
//! and a missing or unreadable gender or age is written empty with a warning instead of
//! silently becoming "M" or 0 (the trainer then refuses or masks it; never a wrong label).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The reference's 20-channel map: output row order, with each row's index in the raw file and
/// the 10-20 name expected there (a mismatch is reported, as the reference warns).
pub struct ChannelMap {
    pub rows: [(&'static str, usize); 20],
}

/// Which 20 channels an adapter takes, in output order.
pub enum Channels {
    /// By position in the file (the reference's maps; names only checked).
    Indexed(&'static ChannelMap),
    /// By name, wherever the file has them (the first of a repeated name); a file without one of
    /// them is skipped with the reason.
    Named(&'static [&'static str; 20]),
}

/// CHB-MIT's bipolar montage, as taken here: the 18 double-banana derivations every case
/// records (left temporal, left parasagittal, right parasagittal, right temporal chains, then
/// the midline), and the two temporal-chain extensions of its 23-channel files, T7-FT9 and
/// FT10-T8, to make the pipeline's 20 rows. Recordings whose montage lacks one (a few files of
/// chb12, chb13, chb15, chb16 and chb18 change montage) are skipped, naming the channel.
pub const MIT_CHANNELS: [&str; 20] = [
    "FP1-F7", "F7-T7", "T7-P7", "P7-O1", "FP1-F3", "F3-C3", "C3-P3", "P3-O1", "FP2-F4", "F4-C4",
    "C4-P4", "P4-O2", "FP2-F8", "F8-T8", "T8-P8", "P8-O2", "FZ-CZ", "CZ-PZ", "T7-FT9", "FT10-T8",
];

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

pub const PARKINSONS_CHANNELS: ChannelMap = ChannelMap {
    rows: [
        ("Fp1", 0),
        ("Fp2", 30),
        ("F3", 2),
        ("F4", 28),
        ("Fz", 1),
        ("F7", 3),
        ("F8", 29),
        ("C3", 7),
        ("C4", 23),
        ("Cz", 22),
        ("P3", 12),
        ("P4", 17),
        ("Pz", 51),
        ("O1", 14),
        ("O2", 16),
        ("T7", 8),
        ("T8", 24),
        ("TP7", 40),
        ("TP8", 53),
        ("TP10", 19),
    ],
};

pub const SEED_CHANNELS: ChannelMap = ChannelMap {
    rows: [
        ("FP1", 0),
        ("FP2", 2),
        ("F3", 7),
        ("F4", 11),
        ("FZ", 9),
        ("F7", 5),
        ("F8", 13),
        ("C3", 25),
        ("C4", 29),
        ("CZ", 27),
        ("P3", 45),
        ("P4", 49),
        ("PZ", 47),
        ("O1", 60),
        ("O2", 62),
        ("T7", 23),
        ("T8", 31),
        ("TP7", 33),
        ("TP8", 41),
        ("P8", 51),
    ],
};

pub const LONGITUDINAL_CHANNELS: ChannelMap = ChannelMap {
    rows: [
        ("Fp1", 0),
        ("Fp2", 1),
        ("F3", 3),
        ("F4", 5),
        ("Fz", 4),
        ("F7", 2),
        ("F8", 6),
        ("C3", 12),
        ("C4", 14),
        ("Cz", 13),
        ("P3", 23),
        ("P4", 25),
        ("Pz", 24),
        ("O1", 28),
        ("O2", 30),
        ("T7", 11),
        ("T8", 15),
        ("TP7", 50),
        ("TP8", 54),
        ("TP10", 21),
    ],
};

/// How the windows of a piece of recording are named (the reference's file names).
#[derive(Debug, Clone, PartialEq)]
pub enum Naming {
    /// `<subject>/spectrogram-{k}.png` / `<subject>/timeseries-{k}.npy`, k counting windows
    /// across the subject's recordings (parkinsons, longitudinal).
    Counter,
    /// math: spectrograms as `Counter`; time series `{dir}/timeseries-{i}.npy` (`Subject{NN}/
    /// state-{s}`), i counting the recording's windows.
    MathState { dir: String },
    /// seed: `<subject>/spectrogram-{tag}-{block}.png` / `timeseries-{tag}-{block}.npy` with
    /// tag `s{session+1}-t{trial}`, block counting the trial's windows.
    Trial { tag: String },
}

/// A stretch of a recording whose windows share labels: the whole recording, or a SEED trial.
#[derive(Debug, Clone)]
pub struct Segment {
    /// `[start, end)` in seconds (cut as `int(seconds · 125)` samples after decimation, as the
    /// reference does); `None` for the whole recording.
    pub seconds: Option<(f64, f64)>,
    /// (column, value) in the reference's column order.
    pub metadata: Vec<(String, String)>,
    pub naming: Naming,
    /// CHB-MIT: the recording's seizures, which label each window (preprocess.rs).
    pub seizures: Option<Seizures>,
}

/// The seizures of a recording, `[start, end)` in seconds from its start, and whether the
/// subject is female (for `mit_condition`). A window is a seizure window when it overlaps them
/// by at least [`SEIZURE_OVERLAP`] of its length.
#[derive(Debug, Clone)]
pub struct Seizures {
    pub intervals: Vec<(f64, f64)>,
    pub female: bool,
}

/// The share of a window that must lie in a seizure for the window to be labelled one: 10 %
/// (1.64 s of a 16.4 s window), as the removed reference adapter counted (max(1 sample, 10 %)).
pub const SEIZURE_OVERLAP: f64 = 0.1;

impl Seizures {
    /// 1 when the window `[start, end)` (seconds) overlaps the seizures by the threshold.
    pub fn label(&self, start: f64, end: f64) -> usize {
        let overlap: f64 = self
            .intervals
            .iter()
            .map(|&(a, b)| (end.min(b) - start.max(a)).max(0.0))
            .sum();
        usize::from(overlap >= SEIZURE_OVERLAP * (end - start))
    }
}

/// One raw file to cut into windows.
#[derive(Debug, Clone)]
pub struct Recording {
    pub path: PathBuf,
    pub segments: Vec<Segment>,
}

#[derive(Debug, Clone)]
pub struct Subject {
    /// Directory name under each split (`sub00`, `sub-001`).
    pub dir: String,
    pub recordings: Vec<Recording>,
}

/// A dataset adapter: layout, sample rate, channels.
pub struct Adapter {
    pub name: &'static str,
    pub native_rate: f64,
    pub channels: Channels,
    /// The hop of the spectrogram is the smallest multiple of this that fits the strips
    /// (8 for seed, 4 for the others, as the reference's per-dataset `_derive_hop_length`).
    pub hop_step: usize,
}

/// The datasets with an adapter.
pub const DATASETS: [&str; 5] = ["math", "parkinsons", "seed", "longitudinal", "mit"];

pub fn adapter(name: &str) -> Result<Adapter> {
    use Channels::{Indexed, Named};
    let (native_rate, channels, hop_step) = match name {
        "math" => (500.0, Indexed(&MATH_CHANNELS), 4),
        "parkinsons" => (500.0, Indexed(&PARKINSONS_CHANNELS), 4),
        "seed" => (1000.0, Indexed(&SEED_CHANNELS), 8),
        "longitudinal" => (1000.0, Indexed(&LONGITUDINAL_CHANNELS), 4),
        "mit" => (256.0, Named(&MIT_CHANNELS), 4),
        other => bail!(
            "unknown dataset `{other}`: the datasets are {}",
            DATASETS.join(", ")
        ),
    };
    let name = DATASETS
        .into_iter()
        .find(|n| *n == name)
        .expect("matched above");
    Ok(Adapter {
        name,
        native_rate,
        channels,
        hop_step,
    })
}

impl Adapter {
    /// The subjects found under `root`, sorted, with their recordings and labels, and warnings
    /// about their metadata.
    pub fn subjects(
        &self,
        root: &Path,
        include_math_trials: bool,
    ) -> Result<(Vec<Subject>, Vec<String>)> {
        let mut warnings = vec![];
        let subjects = match self.name {
            "math" => math_subjects(root, include_math_trials)?,
            "parkinsons" => parkinsons_subjects(root, &mut warnings)?,
            "seed" => seed_subjects(root, &mut warnings)?,
            "mit" => mit_subjects(root, &mut warnings)?,
            _ => longitudinal_subjects(root, &mut warnings)?,
        };
        if subjects.is_empty() {
            bail!(
                "{}: no {} recordings found (expected {})",
                root.display(),
                self.name,
                match self.name {
                    "math" => "raw_eeg/Subject{NN}_1.edf",
                    "parkinsons" => "sub-XXX/eeg/*eeg.set",
                    "seed" => "EEG_raw/{subject}_{session}_{date}.cnt",
                    "mit" => "chbNN/chbNN_MM.edf with chbNN/chbNN-summary.txt",
                    _ => "sub-XXX/ses-N/eeg/sub-XXX_ses-N_task-EyesOpen_acq-{pre,post}_eeg.edf",
                }
            );
        }
        Ok((subjects, warnings))
    }
}

/// A CSV or TSV table with its header, read whole; columns are found case-insensitively.
struct Table {
    path: PathBuf,
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn read(path: &Path, what: &str) -> Result<Table> {
        let tsv = path.extension().is_some_and(|e| e == "tsv");
        let mut rdr = csv::ReaderBuilder::new()
            .delimiter(if tsv { b'\t' } else { b',' })
            .flexible(true)
            .from_path(path)
            .with_context(|| format!("cannot read {} ({what})", path.display()))?;
        let headers = rdr
            .headers()
            .with_context(|| format!("{}: no header row", path.display()))?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        let rows = rdr
            .records()
            .enumerate()
            .map(|(i, r)| {
                r.map(|r| r.iter().map(|v| v.trim().to_string()).collect())
                    .with_context(|| format!("{}: row {}", path.display(), i + 2))
            })
            .collect::<Result<_>>()?;
        Ok(Table {
            path: path.to_path_buf(),
            headers,
            rows,
        })
    }

    fn column(&self, name: &str) -> Option<usize> {
        self.headers
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name))
    }

    fn require(&self, name: &str) -> Result<usize> {
        self.column(name).with_context(|| {
            format!(
                "{}: no `{name}` column (it has: {})",
                self.path.display(),
                self.headers.join(", ")
            )
        })
    }

    /// The value in `row` of the column `name`; empty when the column or the cell is missing
    /// or holds `n/a`/`NaN` (BIDS and pandas spellings of nothing).
    fn get(&self, row: usize, name: &str) -> String {
        let v = self
            .column(name)
            .and_then(|c| self.rows.get(row)?.get(c))
            .map(String::as_str)
            .unwrap_or("");
        if ["n/a", "na", "nan", "none"].contains(&v.to_ascii_lowercase().as_str()) {
            String::new()
        } else {
            v.to_string()
        }
    }

    /// The row whose `column` equals `id`.
    fn find(&self, column: &str, id: &str) -> Result<Option<usize>> {
        let c = self.require(column)?;
        Ok(self
            .rows
            .iter()
            .position(|r| r.get(c).is_some_and(|v| v == id)))
    }
}

/// "F"/"M" as the reference writes them; empty (with a warning) when the value says neither,
/// where the reference would silently write "M".
fn gender(value: &str, whose: &str, warnings: &mut Vec<String>) -> String {
    match value.to_ascii_lowercase().as_str() {
        "f" | "female" | "1" | "true" => "F".into(),
        "m" | "male" | "0" | "false" => "M".into(),
        other => {
            warnings.push(format!(
                "{whose}: gender `{other}` is neither F nor M; written empty (the reference wrote M)"
            ));
            String::new()
        }
    }
}

/// A whole-year age as the reference writes it (`int(float)`); empty (with a warning) when
/// missing, where the reference wrote 0.
fn age(value: &str, whose: &str, warnings: &mut Vec<String>) -> String {
    match value.parse::<f64>() {
        Ok(a) if a.is_finite() && a >= 0.0 => (a.trunc() as i64).to_string(),
        _ => {
            warnings.push(format!(
                "{whose}: age `{value}` is not a number; written empty (the reference wrote 0)"
            ));
            String::new()
        }
    }
}

/// Sorted subdirectories of `root` whose names start with `prefix`.
fn subject_dirs(root: &Path, prefix: &str) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .with_context(|| format!("cannot list {}", root.display()))?
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    Ok(names)
}

fn whole(metadata: Vec<(String, String)>, naming: Naming) -> Vec<Segment> {
    vec![Segment {
        seconds: None,
        metadata,
        naming,
        seizures: None,
    }]
}

fn kv(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
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
                    segments: whole(
                        kv(&[
                            ("state", s.to_string()),
                            ("gender", gender.clone()),
                            ("doingmath", if doingmath { "True" } else { "False" }.into()),
                            ("age", age.clone()),
                            (
                                "math_condition",
                                (2 * usize::from(doingmath) + usize::from(female)).to_string(),
                            ),
                        ]),
                        Naming::MathState {
                            dir: format!("{name}/state-{s}"),
                        },
                    ),
                }
            })
            .collect();
        subjects.push(Subject {
            dir: format!("sub{nn}"),
            recordings,
        });
    }
    Ok(subjects)
}

/// ds004584: `<root>/sub-XXX/eeg/*eeg.set` (the first in name order; subjects without one are
/// left out, as the reference does) and `<root>/participants.tsv` (`participant_id`, `GENDER`,
/// `AGE`, `GROUP`). Health is PD when GROUP is PD/PARKINSONS/1/TRUE, else H.
///
/// Fixed on purpose: the reference reads row `XXX − 1` of participants.tsv (right only while the
/// rows are complete and in order); here the row is found by `participant_id`.
fn parkinsons_subjects(root: &Path, warnings: &mut Vec<String>) -> Result<Vec<Subject>> {
    let table = Table::read(
        &root.join("participants.tsv"),
        "the parkinsons subject table",
    )?;
    let mut subjects = vec![];
    for dir in subject_dirs(root, "sub")? {
        let eeg = root.join(&dir).join("eeg");
        let mut sets: Vec<PathBuf> = std::fs::read_dir(&eeg)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.ends_with("eeg.set"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        sets.sort();
        let Some(set) = sets.into_iter().next() else {
            continue;
        };
        let row = table
            .find("participant_id", &dir)?
            .with_context(|| format!("{}: no row for `{dir}`", table.path.display()))?;
        let whose = format!("{} ({dir})", table.path.display());
        let gender = gender(&table.get(row, "GENDER"), &whose, warnings);
        let pd = matches!(
            table.get(row, "GROUP").to_ascii_uppercase().as_str(),
            "PD" | "PARKINSONS" | "1" | "TRUE"
        );
        let condition = 2 * usize::from(pd) + usize::from(gender == "F");
        subjects.push(Subject {
            dir: dir.clone(),
            recordings: vec![Recording {
                path: set,
                segments: whole(
                    kv(&[
                        ("gender", gender),
                        ("health", if pd { "PD" } else { "H" }.into()),
                        ("age", age(&table.get(row, "AGE"), &whose, warnings)),
                        ("parkinsons_condition", condition.to_string()),
                    ]),
                    Naming::Counter,
                ),
            }],
        });
    }
    Ok(subjects)
}

/// SEED-V's emotion of each trial, per session (0 disgust, 1 fear, 2 sad, 3 neutral, 4 happy),
/// and the trials' start and end seconds, as the reference hard-codes them.
const SEED_EMOTIONS: [[usize; 15]; 3] = [
    [4, 1, 3, 2, 0, 4, 1, 3, 2, 0, 4, 1, 3, 2, 0],
    [2, 1, 3, 0, 4, 4, 0, 3, 2, 1, 3, 4, 1, 2, 0],
    [2, 1, 3, 0, 4, 4, 0, 3, 2, 1, 3, 4, 1, 2, 0],
];
const SEED_EMOTION_NAMES: [&str; 5] = ["disgust", "fear", "sad", "neutral", "happy"];
const SEED_START: [[u32; 15]; 3] = [
    [
        30, 132, 287, 555, 773, 982, 1271, 1628, 1730, 2025, 2227, 2435, 2667, 2932, 3204,
    ],
    [
        30, 299, 548, 646, 836, 1000, 1091, 1392, 1657, 1809, 1966, 2186, 2333, 2490, 2741,
    ],
    [
        30, 353, 478, 674, 825, 908, 1200, 1346, 1451, 1711, 2055, 2307, 2457, 2726, 2888,
    ],
];
const SEED_END: [[u32; 15]; 3] = [
    [
        102, 228, 524, 742, 920, 1240, 1568, 1697, 1994, 2166, 2401, 2607, 2901, 3172, 3359,
    ],
    [
        267, 488, 614, 773, 967, 1059, 1331, 1622, 1777, 1908, 2153, 2302, 2428, 2709, 2817,
    ],
    [
        321, 418, 643, 764, 877, 1147, 1284, 1418, 1679, 1996, 2275, 2425, 2664, 2857, 3066,
    ],
];

/// SEED-V: `<root>/EEG_raw/{subject}_{session}_{date}.cnt` (sessions 1–3) and
/// `<root>/participants_info.csv` (`Sex`, `Age`; row `subject − 1`, as the reference reads it:
/// the table has no id column). Each session's 15 trials are cut by the hard-coded tables and
/// windowed separately; trials shorter than a window give nothing.
fn seed_subjects(root: &Path, warnings: &mut Vec<String>) -> Result<Vec<Subject>> {
    let raw = root.join("EEG_raw");
    let table = Table::read(&root.join("participants_info.csv"), "SEED's subject table")?;
    let mut sessions: BTreeMap<u32, Vec<(usize, PathBuf)>> = BTreeMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&raw)
        .with_context(|| format!("cannot list {}", raw.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cnt"))
        .collect();
    files.sort();
    for path in files {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let mut parts = stem.split('_');
        let (Some(subject), Some(session)) = (parts.next(), parts.next()) else {
            continue; // the reference skips names without `_`
        };
        let parsed = subject
            .parse::<u32>()
            .ok()
            .zip(session.parse::<usize>().ok());
        let Some((subject, session)) = parsed.filter(|(_, s)| (1..=3).contains(s)) else {
            bail!(
                "{}: a SEED file name is {{subject}}_{{session 1-3}}_{{date}}.cnt",
                path.display()
            );
        };
        sessions
            .entry(subject)
            .or_default()
            .push((session - 1, path));
    }
    let mut subjects = vec![];
    for (number, files) in sessions {
        let dir = format!("sub-{number:02}");
        let row = (number as usize)
            .checked_sub(1)
            .filter(|&r| r < table.rows.len());
        let whose = format!("{} (row {} for {dir})", table.path.display(), number);
        let (gender, age) = match row {
            Some(r) => (
                gender(&table.get(r, "Sex"), &whose, warnings),
                age(&table.get(r, "Age"), &whose, warnings),
            ),
            None => bail!(
                "{}: has {} rows; subject {number} reads row {number}",
                table.path.display(),
                table.rows.len()
            ),
        };
        let female = usize::from(gender == "F");
        let recordings = files
            .into_iter()
            .map(|(session, path)| Recording {
                path,
                segments: (0..15)
                    .map(|trial| {
                        let emotion = SEED_EMOTIONS[session][trial];
                        Segment {
                            seconds: Some((
                                SEED_START[session][trial] as f64,
                                SEED_END[session][trial] as f64,
                            )),
                            metadata: kv(&[
                                ("session", session.to_string()),
                                ("trial", trial.to_string()),
                                ("gender", gender.clone()),
                                ("health", "H".into()),
                                ("age", age.clone()),
                                ("emotion_id", emotion.to_string()),
                                ("emotion", emotion.to_string()),
                                ("emotion_label", SEED_EMOTION_NAMES[emotion].into()),
                                ("seed_condition", (2 * emotion + female).to_string()),
                            ]),
                            naming: Naming::Trial {
                                tag: format!("s{}-t{trial}", session + 1),
                            },
                            seizures: None,
                        }
                    })
                    .collect(),
            })
            .collect();
        subjects.push(Subject { dir, recordings });
    }
    Ok(subjects)
}

/// Dortmund Vital Study (BIDS): `<root>/participants.tsv` (`participant_id`, `sex`, `age` at
/// session 1, `handedness`, `session1`/`session2` = yes/no), `sub-XXX/sub-XXX_sessions.tsv`
/// (`session_id`, `recording_year`), and the EyesOpen recordings before (`pre`) and after
/// (`post`) the cognitive tasks of each session held. The session-2 age is the baseline plus
/// the years between the sessions' recordings, or plus 5 when a year is unknown (with a
/// warning, as the reference logs). A missing recording file is left out.
fn longitudinal_subjects(root: &Path, warnings: &mut Vec<String>) -> Result<Vec<Subject>> {
    let table = Table::read(
        &root.join("participants.tsv"),
        "the longitudinal subject table",
    )?;
    let mut subjects = vec![];
    for dir in subject_dirs(root, "sub-")? {
        let row = table.find("participant_id", &dir)?.with_context(|| {
            format!(
                "{}: no row for `{dir}` (the reference stops here too)",
                table.path.display()
            )
        })?;
        let whose = format!("{} ({dir})", table.path.display());
        let gender = gender(&table.get(row, "sex"), &whose, warnings);
        let baseline = age(&table.get(row, "age"), &whose, warnings);
        let handedness = match table.column("handedness") {
            None => "right".to_string(), // the reference's default for a missing column
            Some(_) => table.get(row, "handedness"),
        };
        let sessions_path = root.join(&dir).join(format!("{dir}_sessions.tsv"));
        let years = if sessions_path.exists() {
            Some(Table::read(&sessions_path, "the subject's session table")?)
        } else {
            None
        };
        let year = |session: &str| -> Option<i64> {
            let t = years.as_ref()?;
            let r = t.find("session_id", session).ok()??;
            t.get(r, "recording_year")
                .parse::<f64>()
                .ok()
                .map(|y| y as i64)
        };
        let mut recordings = vec![];
        for (n, flag) in [(1, "session1"), (2, "session2")] {
            if !table.get(row, flag).eq_ignore_ascii_case("yes") {
                continue;
            }
            let session = format!("ses-{n}");
            let age = match (n, baseline.parse::<i64>()) {
                (1, _) | (_, Err(_)) => baseline.clone(),
                (_, Ok(b)) => match (year("ses-1"), year("ses-2")) {
                    (Some(y1), Some(y2)) if y1 != 0 && y2 != 0 => (b + y2 - y1).to_string(),
                    _ => {
                        warnings.push(format!("{dir}/{session}: recording years unknown in {}; age assumed 5 years after session 1, as the reference does", sessions_path.display()));
                        (b + 5).to_string()
                    }
                },
            };
            let recording_year = year(&session).map(|y| y.to_string()).unwrap_or_default();
            for acquisition in ["pre", "post"] {
                let path = root.join(&dir).join(&session).join("eeg").join(format!(
                    "{dir}_{session}_task-EyesOpen_acq-{acquisition}_eeg.edf"
                ));
                if !path.exists() {
                    continue;
                }
                recordings.push(Recording {
                    path,
                    segments: whole(
                        kv(&[
                            ("gender", gender.clone()),
                            ("age", age.clone()),
                            ("acquisition", acquisition.into()),
                            ("handedness", handedness.clone()),
                            ("health", "H".into()),
                            ("session", session.clone()),
                            ("recording_year", recording_year.clone()),
                        ]),
                        Naming::Counter,
                    ),
                });
            }
        }
        if !recordings.is_empty() {
            subjects.push(Subject { dir, recordings });
        }
    }
    Ok(subjects)
}

/// CHB-MIT's cases recorded again: chb21 is chb01 1.5 years later, one person for the split.
const MIT_SAME_PERSON: [(&str, &str); 1] = [("chb21", "chb01")];

/// CHB-MIT (PhysioNet chbmit 1.0.0): `<root>/chbNN/*.edf`, each case's `chbNN-summary.txt`
/// (per file: `File Name:`, `Number of Seizures in File:` and each seizure's `Seizure Start
/// Time: S seconds` / `Seizure End Time:`, also spelt `Seizure 1 Start Time:`), and
/// `<root>/SUBJECT-INFO` (tab-separated `Case`, `Gender`, `Age (years)`). chb21's recordings
/// join chb01's subject (one person; each keeps its own age). Every case has epilepsy: health
/// is `EP`. A file the summary does not list is skipped with a warning (its seizures are
/// unknown), never labelled background.
fn mit_subjects(root: &Path, warnings: &mut Vec<String>) -> Result<Vec<Subject>> {
    let info = mit_subject_info(&root.join("SUBJECT-INFO"))?;
    let mut by_person: BTreeMap<String, Vec<Recording>> = BTreeMap::new();
    for case in subject_dirs(root, "chb")? {
        let dir = root.join(&case);
        let summary_path = dir.join(format!("{case}-summary.txt"));
        let summary = std::fs::read_to_string(&summary_path).with_context(|| {
            format!(
                "cannot read {} (each CHB-MIT case has one)",
                summary_path.display()
            )
        })?;
        let seizures = mit_summary(&summary, &summary_path, warnings)?;
        let whose = format!("{} ({case})", root.join("SUBJECT-INFO").display());
        let (g, a) = match info.get(&case) {
            Some((g, a)) => (gender(g, &whose, warnings), age(a, &whose, warnings)),
            None => {
                warnings.push(format!(
                    "{whose}: no row for `{case}`; gender and age written empty"
                ));
                (String::new(), String::new())
            }
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("edf")))
            .collect();
        files.sort();
        let person = MIT_SAME_PERSON
            .iter()
            .find(|(c, _)| *c == case)
            .map_or(case.clone(), |(_, p)| p.to_string());
        for path in files {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string();
            let Some(intervals) = seizures.get(&name) else {
                warnings.push(format!(
                    "{}: not listed in {}; skipped (its seizures are unknown)",
                    path.display(),
                    summary_path.display()
                ));
                continue;
            };
            by_person
                .entry(person.clone())
                .or_default()
                .push(Recording {
                    path,
                    segments: vec![Segment {
                        seconds: None,
                        metadata: kv(&[
                            ("gender", g.clone()),
                            ("health", "EP".into()),
                            ("age", a.clone()),
                            ("case", case.clone()),
                        ]),
                        naming: Naming::Counter,
                        seizures: Some(Seizures {
                            intervals: intervals.clone(),
                            female: g == "F",
                        }),
                    }],
                });
        }
    }
    Ok(by_person
        .into_iter()
        .map(|(dir, recordings)| Subject { dir, recordings })
        .collect())
}

/// `SUBJECT-INFO`: case → (gender, age), from its tab-separated rows after the header.
fn mit_subject_info(path: &Path) -> Result<BTreeMap<String, (String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {} (CHB-MIT's subject table)", path.display()))?;
    let mut rows = text.lines().filter(|l| !l.trim().is_empty());
    let header = rows.next().unwrap_or("");
    if !header.to_ascii_lowercase().starts_with("case") {
        bail!(
            "{}: expected a header `Case<TAB>Gender<TAB>Age (years)`, found `{header}`",
            path.display()
        );
    }
    Ok(rows
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').map(str::trim).collect();
            (f.len() >= 3).then(|| (f[0].to_string(), (f[1].to_string(), f[2].to_string())))
        })
        .collect())
}

/// A case summary: file name → its seizures `[start, end)` in seconds. A file whose listed
/// count differs from the intervals found, or an end before its start, is an error naming the
/// line (a wrong label is worse than no dataset).
fn mit_summary(
    text: &str,
    path: &Path,
    warnings: &mut Vec<String>,
) -> Result<BTreeMap<String, Vec<(f64, f64)>>> {
    let mut files: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut current: Option<(String, usize, Vec<f64>, Vec<f64>)> = None;
    let finish = |c: Option<(String, usize, Vec<f64>, Vec<f64>)>,
                  files: &mut BTreeMap<String, Vec<(f64, f64)>>|
     -> Result<()> {
        let Some((name, count, starts, ends)) = c else {
            return Ok(());
        };
        if starts.len() != count || ends.len() != count {
            bail!(
                "{}: `{name}` lists {count} seizures but {} start and {} end times",
                path.display(),
                starts.len(),
                ends.len()
            );
        }
        let intervals: Vec<(f64, f64)> = starts.into_iter().zip(ends).collect();
        if let Some((a, b)) = intervals.iter().find(|(a, b)| b <= a) {
            bail!(
                "{}: `{name}` has a seizure ending at {b} s, not after its start {a} s",
                path.display()
            );
        }
        files.insert(name, intervals);
        Ok(())
    };
    for (i, line) in text.lines().enumerate() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        let seconds = || -> Result<f64> {
            value
                .trim_end_matches("seconds")
                .trim()
                .parse::<f64>()
                .with_context(|| {
                    format!(
                        "{}:{}: `{line}` is not a time in seconds",
                        path.display(),
                        i + 1
                    )
                })
        };
        if key == "File Name" {
            finish(current.take(), &mut files)?;
            current = Some((value.to_string(), 0, vec![], vec![]));
        } else if let Some(c) = current.as_mut() {
            if key == "Number of Seizures in File" {
                c.1 = value
                    .parse()
                    .with_context(|| format!("{}:{}: `{line}`", path.display(), i + 1))?;
            } else if key.starts_with("Seizure") && key.ends_with("Start Time") {
                c.2.push(seconds()?);
            } else if key.starts_with("Seizure") && key.ends_with("End Time") {
                c.3.push(seconds()?);
            }
        }
    }
    finish(current, &mut files)?;
    if files.is_empty() {
        warnings.push(format!("{}: lists no files", path.display()));
    }
    Ok(files)
}
