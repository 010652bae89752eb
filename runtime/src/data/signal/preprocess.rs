//! `sigdiff preprocess`: raw recordings -> the reference's on-disk dataset.
//!
//! Per recording: read, take the dataset's 20 channels (volts), decimate to 125 Hz, cut 2048-sample
//! windows every 1024 samples, and write each window as a spectrogram PNG (or a z-scored `.npy`),
//! then `{split}-metadata.csv` and `metadata.csv`. Subjects are split 80/10/10, seeded.
//!
//! Recordings run in parallel (`--jobs`) and stream: memory holds the recordings in flight, not
//! the dataset. Every file is written through a temporary file and a rename, so an interrupted
//! run leaves no half file; a rerun keeps what exists and writes the rest (without
//! `--overwrite`, nothing is deleted). A summary lists recordings, windows and what was skipped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use signal_diffusion_config::settings::{DatasetPaths, Settings};

use super::datasets::{adapter, Adapter, Channels, Naming, Subject};
use super::decimate::{decimate, decimate_channels};
use super::resample::resample_poly;
use super::{read_named, read_picks};
use signal_diffusion_config::choice::{OutputType, PolarLayout};

use crate::data::layout::Layout;

use super::spectrogram::{derive_hop, image, LogStft};
use super::timeseries::{normalize, Stats, Welford};

/// CSV rows of a subject: (file_name, metadata columns).
type Rows = Vec<(String, Vec<(String, String)>)>;

pub const TARGET_RATE: f64 = 125.0;
pub const NSAMPS: usize = 2048;
pub const SHIFT: usize = 1024;
pub const RESOLUTION: usize = 256;

#[derive(Debug, Clone)]
pub struct PreprocessOptions {
    /// Datasets to preprocess (names of `[datasets.*]` tables in the settings file; default:
    /// each of math, parkinsons, seed, longitudinal and mit whose raw directory exists).
    pub datasets: Vec<String>,
    /// Override the settings' output type: db-only, db-iq or db-polar.
    pub output_type: Option<OutputType>,
    /// Override the settings' `data.polar_layout` (db-polar only).
    pub polar_layout: Option<PolarLayout>,
    /// Write z-scored float32 time series instead of spectrograms.
    pub timeseries: bool,
    /// math: also use the arithmetic recordings (state 2).
    pub include_math_trials: bool,
    /// Recordings processed at once.
    pub jobs: usize,
    /// Delete the dataset's existing output first (otherwise existing files are kept and skipped).
    pub overwrite: bool,
    /// Seed of the subject split.
    pub seed: u64,
}

/// What a run did, for the summary and for tests.
#[derive(Debug, Default)]
pub struct Summary {
    pub recordings: usize,
    pub windows: usize,
    pub written: usize,
    pub existing: usize,
    /// (file, reason) of recordings that produced nothing.
    pub skipped: Vec<(PathBuf, String)>,
    pub warnings: Vec<String>,
    /// Labelled windows (CHB-MIT): seizure windows, background windows written, and background
    /// windows left out by `max_background_windows`.
    pub seizure: usize,
    pub background: usize,
    pub left_out: usize,
}

pub fn run(args: &PreprocessOptions, settings: &Settings) -> Result<Summary> {
    let mut total = Summary::default();
    let names: Vec<String> = if args.datasets.is_empty() {
        let known = super::datasets::DATASETS;
        let found: Vec<String> = known
            .iter()
            .filter(|n| settings.datasets.get(**n).is_some_and(|d| d.root.is_dir()))
            .map(|n| n.to_string())
            .collect();
        if found.is_empty() {
            bail!(
                "no raw dataset found: looked for {}; name a dataset or fix `[datasets.*] root` in the settings",
                known
                    .iter()
                    .filter_map(|n| settings.datasets.get(*n).map(|d| format!("{n} at {}", d.root.display())))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        println!(
            "preprocessing {} (the raw datasets found)",
            found.join(", ")
        );
        found
    } else {
        args.datasets.clone()
    };
    for name in &names {
        let paths = settings.datasets.get(name).with_context(|| {
            format!(
                "no `[datasets.{name}]` in the settings ({}); the settings define: {}",
                settings
                    .files
                    .last()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                settings
                    .datasets
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        let layout = Layout::new(
            args.output_type.unwrap_or(settings.output_type),
            args.polar_layout.unwrap_or(settings.polar_layout),
        );
        let s = preprocess_dataset(&adapter(name)?, paths, layout, args)?;
        println!(
            "{name}: {} recordings, {} windows ({} written, {} already there), {} skipped",
            s.recordings,
            s.windows,
            s.written,
            s.existing,
            s.skipped.len()
        );
        for (p, why) in &s.skipped {
            println!("  skipped {}: {why}", p.display());
        }
        for w in &s.warnings {
            println!("  warning: {w}");
        }
        if s.seizure + s.background > 0 {
            println!(
                "  seizure windows {}, background windows {} ({} more left out by `max_background_windows` = {})",
                s.seizure,
                s.background,
                s.left_out,
                paths.max_background_windows
            );
        }
        total.recordings += s.recordings;
        total.windows += s.windows;
        total.written += s.written;
        total.existing += s.existing;
        total.skipped.extend(s.skipped);
        total.warnings.extend(s.warnings);
        total.seizure += s.seizure;
        total.background += s.background;
        total.left_out += s.left_out;
    }
    Ok(total)
}

/// Subject-level split with the reference's counts (min(remaining, round_half_even(f·n)) per
/// split in order, the last takes the rest), over a seeded shuffle of the sorted subjects.
pub fn assign_splits<T>(mut subjects: Vec<T>, seed: u64) -> Vec<(&'static str, T)> {
    subjects.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n = subjects.len();
    let n_train = ((n as f64) * 0.8).round_ties_even() as usize;
    let n_val = (((n as f64) * 0.1).round_ties_even() as usize).min(n - n_train.min(n));
    subjects
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            (
                if i < n_train {
                    "train"
                } else if i < n_train + n_val {
                    "val"
                } else {
                    "test"
                },
                s,
            )
        })
        .collect()
}

/// The 20 mapped channels of a recording at 125 Hz, in volts: decimated (scipy's `decimate`)
/// when the rate is an integer multiple of 125 Hz, as the reference does; else resampled
/// (scipy's `resample_poly`, e.g. 125/256 for CHB-MIT), which the reference could not do.
fn load(adapter: &Adapter, path: &Path, warnings: &Mutex<Vec<String>>) -> Result<Vec<Vec<f64>>> {
    let warn = |w: String| warnings.lock().expect("no panics hold it").push(w);
    let rec = match &adapter.channels {
        Channels::Indexed(map) => {
            let picks: Vec<usize> = map.rows.iter().map(|&(_, i)| i).collect();
            let rec = read_picks(path, &picks).map_err(|e| {
                anyhow::anyhow!(
                    "{e:#} (the {} channel map takes channels {picks:?})",
                    adapter.name
                )
            })?;
            let norm = |l: &str| {
                let l = l.trim();
                let l = match l.get(..3) {
                    Some(p) if p.eq_ignore_ascii_case("EEG") => &l[3..],
                    _ => l,
                };
                l.trim().trim_end_matches('.').to_uppercase()
            };
            for (&(name, idx), label) in map.rows.iter().zip(&rec.labels) {
                if norm(label) != norm(name) {
                    warn(format!("{}: channel {idx} is `{label}`, the map expects `{name}` (used by index, as the reference)", path.display()));
                }
            }
            rec
        }
        Channels::Named(names) => read_named(path, &names[..])
            .map_err(|e| anyhow::anyhow!("{e:#} (the {} montage)", adapter.name))?,
    };
    if let Some(w) = &rec.warning {
        warn(format!("{}: {w}", path.display()));
    }
    for (label, &rate) in rec.labels.iter().zip(&rec.sample_rates) {
        if decimation_factor(rate).is_none() && !(rate.fract() == 0.0 && rate >= 1.0) {
            bail!(
                "{}: channel {label} is sampled at {rate} Hz, neither a multiple of {TARGET_RATE} Hz nor a whole number of Hz",
                path.display()
            );
        }
        if rate != adapter.native_rate {
            warn(format!(
                "{}: channel {label} is sampled at {rate} Hz; {} recordings are {} Hz",
                path.display(),
                adapter.name,
                adapter.native_rate
            ));
        }
    }
    let failed = |e: String| anyhow::anyhow!("{}: {e}", path.display());
    let rates = &rec.sample_rates;
    let same_length = rec.volts.iter().all(|v| v.len() == rec.volts[0].len());
    if let (Some(q), true, true) = (
        decimation_factor(rates[0]),
        rates.iter().all(|&r| r == rates[0]),
        same_length,
    ) {
        return decimate_channels(&rec.volts, q).map_err(failed);
    }
    // A different rate per channel (EDF allows it), or resampling: one channel at a time.
    rec.volts
        .iter()
        .zip(rates)
        .map(|(v, &rate)| match decimation_factor(rate) {
            Some(q) => decimate(v, q).map_err(failed),
            None => Ok(resample_poly(v, TARGET_RATE as usize, rate as usize)),
        })
        .collect()
}

/// `rate / 125` when it is a whole number ≥ 1: the rates the reference's decimation handles.
fn decimation_factor(rate: f64) -> Option<usize> {
    let q = rate / TARGET_RATE;
    (q.fract() == 0.0 && q >= 1.0).then_some(q as usize)
}

/// Which windows to write, given each one's seizure label: every seizure window, and at most
/// `cap` background windows spread evenly over the recording (the i-th of `cap` at position
/// ⌊i·n/cap⌋ of the n background windows); `cap` 0 keeps them all.
fn background_cap(labels: &[usize], cap: usize) -> Vec<bool> {
    let background: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == 0).collect();
    let mut keep: Vec<bool> = labels.iter().map(|&l| l == 1).collect();
    let n = background.len();
    if cap == 0 || n <= cap {
        for &i in &background {
            keep[i] = true;
        }
    } else {
        for i in 0..cap {
            keep[background[i * n / cap]] = true;
        }
    }
    keep
}

fn preprocess_dataset(
    adapter: &Adapter,
    paths: &DatasetPaths,
    layout: Layout,
    args: &PreprocessOptions,
) -> Result<Summary> {
    let out_dir = if args.timeseries {
        &paths.timeseries_output
    } else {
        &paths.output
    };
    let (subjects, metadata_warnings) = adapter.subjects(&paths.root, args.include_math_trials)?;
    if args.overwrite && out_dir.exists() {
        std::fs::remove_dir_all(out_dir)
            .with_context(|| format!("cannot remove {}", out_dir.display()))?;
    }
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let warnings = Mutex::new(metadata_warnings);

    // Time series need statistics over every recording first (computed after the overwrite, so
    // they are never deleted: a reference bug), written where the writers and readers look.
    let stats = if args.timeseries {
        let mut acc = Welford::new(20);
        for r in subjects.iter().flat_map(|s| &s.recordings) {
            if let Ok(x) = load(adapter, &r.path, &warnings) {
                acc.add(&x);
            }
        }
        let stats = acc.stats();
        let json = serde_json::to_string_pretty(&stats)?;
        for dir in [&paths.timeseries_output, &paths.output] {
            crate::data::io::write_atomic(
                &dir.join(format!("{}_normalization_stats.json", adapter.name)),
                |w| Ok(w.write_all(json.as_bytes())?),
            )?;
        }
        Some(stats)
    } else {
        let (Some(_), Some(_)) = (paths.min_db, paths.max_db) else {
            bail!("spectrograms need `[datasets.{}] min_db` and `max_db` in the settings (the dB window of the 8-bit mapping)", adapter.name);
        };
        // Images already there are kept: they must be of the kind this run writes.
        crate::data::layout::check(
            out_dir,
            &layout,
            "this run (the settings' `[data] output_type`/`polar_layout`, or --output-type/--polar-layout)",
        )
        .map_err(|e| anyhow::anyhow!("{e:#}; or pass --overwrite to replace it"))?;
        crate::data::layout::write(out_dir, &layout)?;
        None
    };

    let split_subjects = assign_splits(subjects, args.seed);
    let n_recordings: usize = split_subjects.iter().map(|(_, s)| s.recordings.len()).sum();
    let bar = indicatif::ProgressBar::new(n_recordings as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} recordings {elapsed} (eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(adapter.name);
    let stft = LogStft::new(
        RESOLUTION,
        derive_hop(NSAMPS, RESOLUTION, 20, adapter.hop_step),
    );
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<(Rows, Summary)>>> =
        Mutex::new((0..split_subjects.len()).map(|_| None).collect());
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..args.jobs.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((split, subject)) = split_subjects.get(i) else {
                    break;
                };
                match process_subject(
                    adapter,
                    subject,
                    split,
                    out_dir,
                    layout,
                    paths,
                    stats.as_ref(),
                    &stft,
                    &warnings,
                    &bar,
                ) {
                    Ok(r) => results.lock().expect("no panics hold it")[i] = Some(r),
                    Err(e) => {
                        failure.lock().expect("no panics hold it").get_or_insert(e);
                        break;
                    }
                }
            });
        }
    });
    bar.finish_and_clear();
    if let Some(e) = failure.into_inner().expect("threads joined") {
        return Err(e);
    }

    // CSVs in the reference's order: train, val, test; subjects in split order.
    let mut summary = Summary {
        warnings: warnings.into_inner().expect("threads joined"),
        ..Default::default()
    };
    let results = results.into_inner().expect("threads joined");
    let mut all = String::new();
    let mut header = String::new();
    for split in ["train", "val", "test"] {
        let mut body = String::new();
        for ((s, _), r) in split_subjects.iter().zip(&results) {
            let Some((rows, sub)) = r else { continue };
            if *s != split {
                continue;
            }
            for (file, meta) in rows {
                if header.is_empty() {
                    header = std::iter::once("file_name")
                        .chain(std::iter::once("split"))
                        .chain(meta.iter().map(|(k, _)| k.as_str()))
                        .collect::<Vec<_>>()
                        .join(",");
                }
                let values: Vec<String> = meta.iter().map(|(_, v)| csv_field(v)).collect();
                body.push_str(&format!("{file},{split},{}\n", values.join(",")));
            }
            summary.recordings += sub.recordings;
            summary.windows += sub.windows;
            summary.written += sub.written;
            summary.existing += sub.existing;
            summary.skipped.extend(sub.skipped.iter().cloned());
            summary.seizure += sub.seizure;
            summary.background += sub.background;
            summary.left_out += sub.left_out;
        }
        write_csv(
            &out_dir.join(format!("{split}-metadata.csv")),
            &header,
            &body,
        )?;
        all.push_str(&body);
    }
    write_csv(&out_dir.join("metadata.csv"), &header, &all)?;
    Ok(summary)
}

fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\n']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

fn write_csv(path: &Path, header: &str, body: &str) -> Result<()> {
    crate::data::io::write_atomic(path, |w| {
        writeln!(w, "{header}")?;
        w.write_all(body.as_bytes())?;
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
fn process_subject(
    adapter: &Adapter,
    subject: &Subject,
    split: &str,
    out_dir: &Path,
    layout: Layout,
    paths: &DatasetPaths,
    stats: Option<&Stats>,
    stft: &LogStft,
    warnings: &Mutex<Vec<String>>,
    bar: &indicatif::ProgressBar,
) -> Result<(Rows, Summary)> {
    let mut rows = vec![];
    let mut s = Summary::default();
    let mut k = 0;
    for rec in &subject.recordings {
        bar.inc(1);
        s.recordings += 1;
        let signal = match load(adapter, &rec.path, warnings) {
            Ok(x) => x,
            Err(e) => {
                s.skipped.push((rec.path.clone(), format!("{e:#}")));
                continue;
            }
        };
        let before = s.windows;
        let len = signal[0].len();
        for segment in &rec.segments {
            // The reference cuts trials at int(seconds · fs) and slices past the end to nothing.
            let (from, to) = match segment.seconds {
                None => (0, len),
                Some((a, b)) => (
                    ((a * TARGET_RATE) as usize).min(len),
                    ((b * TARGET_RATE) as usize).min(len),
                ),
            };
            let starts: Vec<usize> = (from..)
                .step_by(SHIFT)
                .take_while(|s| s + NSAMPS <= to)
                .collect();
            // CHB-MIT: each window's seizure label, and which background windows are written.
            let labels: Option<Vec<usize>> = segment.seizures.as_ref().map(|sz| {
                starts
                    .iter()
                    .map(|&st| {
                        sz.label(st as f64 / TARGET_RATE, (st + NSAMPS) as f64 / TARGET_RATE)
                    })
                    .collect()
            });
            let keep = match &labels {
                Some(l) => background_cap(l, paths.max_background_windows),
                None => vec![true; starts.len()],
            };
            for (block, &start) in starts.iter().enumerate() {
                let kind = if stats.is_some() {
                    "timeseries"
                } else {
                    "spectrogram"
                };
                let ext = if stats.is_some() { "npy" } else { "png" };
                let rel = match &segment.naming {
                    Naming::MathState { dir } if stats.is_some() => {
                        format!("{split}/{dir}/timeseries-{block}.{ext}")
                    }
                    Naming::Counter | Naming::MathState { .. } => {
                        format!("{split}/{}/{kind}-{k}.{ext}", subject.dir)
                    }
                    Naming::Trial { tag } => {
                        format!("{split}/{}/{kind}-{tag}-{block}.{ext}", subject.dir)
                    }
                };
                // Every window takes a number, written or not: a name always means the same
                // window, whatever the cap (a rerun skips the files that exist).
                k += 1;
                if !keep[block] {
                    s.left_out += 1;
                    continue;
                }
                let w: Vec<Vec<f64>> = signal
                    .iter()
                    .map(|ch| ch[start..start + NSAMPS].to_vec())
                    .collect();
                s.windows += 1;
                let path = out_dir.join(&rel);
                // An empty file is what a power loss can leave of an unsynced write.
                if path.metadata().is_ok_and(|m| m.len() > 0) {
                    s.existing += 1;
                } else {
                    match stats {
                        Some(st) => crate::data::io::write_npy_f32(
                            &path,
                            &[20, NSAMPS],
                            &normalize(&w, st),
                        )?,
                        None => {
                            let px = image(
                                stft,
                                &w,
                                layout.output_type,
                                layout.polar(),
                                paths.min_db.expect("checked"),
                                paths.max_db.expect("checked"),
                            );
                            crate::data::io::write_png(
                                &path,
                                &px,
                                layout.output_type.channels(),
                                RESOLUTION,
                                RESOLUTION,
                            )?;
                        }
                    }
                    s.written += 1;
                }
                let mut metadata = segment.metadata.clone();
                if let (Some(l), Some(sz)) = (&labels, &segment.seizures) {
                    let seizure = l[block];
                    if seizure == 1 {
                        s.seizure += 1;
                    } else {
                        s.background += 1;
                    }
                    metadata.push(("seizure".into(), seizure.to_string()));
                    let condition = 2 * seizure + usize::from(sz.female);
                    metadata.push(("mit_condition".into(), condition.to_string()));
                }
                rows.push((rel, metadata));
            }
        }
        if s.windows == before {
            s.skipped.push((
                rec.path.clone(),
                format!(
                    "no window fits ({len} samples at 125 Hz; a window needs {NSAMPS}{})",
                    if rec.segments.iter().any(|g| g.seconds.is_some()) {
                        " inside a trial"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    Ok((rows, s))
}
