//! `sigdiff meta-dataset`: the weighted meta-dataset (reference data.md §3.9).
//!
//! Per split, the preprocessed datasets' `{split}-metadata.csv` are merged in list order
//! (columns `file_name`, `gender`, `health`, `age`; a missing health is "H"). Each dataset `i`
//! with share `d_i` of the split's samples gets the pair `(pF + d_i, pM + d_i)` (pF, pM: the
//! split's female and male shares), capped at `max_sampling_weight`; a sample's weight is the
//! first element if female, else the second, taken from the pair of the dataset at the mirrored
//! size rank, so the smallest dataset gets the largest dataset's pair and vice versa. Weights
//! are normalised, divided by their minimum, and each weight bucket (ascending) gets
//! `floor(w)` copies per sample plus one whenever the accumulated fraction reaches 1. Rows go
//! out bucket by bucket, copies adjacent, each with an RGB PNG and a caption, as Parquet in the
//! Hugging Face `datasets` layout: `train.parquet`, `val.parquet` (loaded as `validation`),
//! `test.parquet`, and a README whose `configs` maps the files to the splits.
//!
//! Fixed on purpose: the reference takes the mirrored pair by the datasets' list positions, not
//! their size ranks, so its "inversion" holds only when the list is in ascending size order.
//! Not written: the reference's matplotlib weight plots.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use signal_diffusion_config::settings::Settings;

use crate::data::table::{Cell, Kind, Table, TableWriter};

#[derive(Debug, Clone)]
pub struct MetaOptions {
    /// Datasets to merge, in order (names of `[datasets.*]` tables, preprocessed already).
    pub datasets: Vec<String>,
    /// Output directory; relative paths are under the settings' output root
    /// (default: `reweighted_meta_dataset_log_n2048_fs125`).
    pub output_dir: Option<PathBuf>,
    /// Splits to write.
    pub copy_splits: Vec<String>,
    /// Cap on each weight (default: the settings' `max_sampling_weight`).
    pub max_sampling_weight: Option<f64>,
    /// Replace an existing output directory.
    pub overwrite: bool,
    /// Threads for re-encoding images.
    pub jobs: usize,
}

/// One sample of a source dataset.
#[derive(Debug, Clone)]
pub struct Sample {
    pub dataset: usize,
    pub file_name: String,
    /// F or M, None when missing or unrecognised.
    pub gender: Option<&'static str>,
    /// H, PD (Parkinson's) or EP (epilepsy, CHB-MIT).
    pub health: &'static str,
    pub age: Option<i64>,
}

/// Per split: (source dataset, generated rows) counts, for the summary and README.
#[derive(Debug, Default)]
pub struct MetaSummary {
    pub output: PathBuf,
    /// (split, per dataset (original, generated)).
    pub splits: Vec<(String, Vec<(usize, usize)>)>,
}

/// The female flag of the weighting: the reference's registry encoder.
fn is_female(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_uppercase().as_str(),
        "F" | "FEMALE" | "1" | "TRUE"
    )
}

/// Sample weights (summing to 1) by dataset and gender; see the module docs.
pub fn weights(samples: &[Sample], n_datasets: usize, cap: Option<f64>) -> Vec<f64> {
    let total = samples.len() as f64;
    if samples.is_empty() {
        return vec![];
    }
    let females = samples.iter().filter(|s| s.gender == Some("F")).count() as f64;
    let (p_f, p_m) = (females / total, 1.0 - females / total);
    let share: Vec<f64> = (0..n_datasets)
        .map(|d| samples.iter().filter(|s| s.dataset == d).count() as f64 / total)
        .collect();
    let pairs: Vec<(f64, f64)> = share.iter().map(|d| (p_f + d, p_m + d)).collect();
    // Datasets by size (score 1 + 2·d_i), ascending; rank r takes the pair of rank n−1−r.
    let mut by_size: Vec<usize> = (0..n_datasets).collect();
    by_size.sort_by(|&a, &b| share[a].total_cmp(&share[b]));
    let mut pair_of = vec![(0.0, 0.0); n_datasets];
    for (rank, &d) in by_size.iter().enumerate() {
        let (f, m) = pairs[by_size[n_datasets - 1 - rank]];
        let c = |x: f64| cap.map_or(x, |c| x.min(c));
        pair_of[d] = (c(f), c(m));
    }
    let raw: Vec<f64> = samples
        .iter()
        .map(|s| {
            let (f, m) = pair_of[s.dataset];
            if s.gender == Some("F") {
                f
            } else {
                m
            }
        })
        .collect();
    let sum: f64 = raw.iter().sum();
    if sum <= 0.0 {
        return vec![1.0 / total; samples.len()];
    }
    raw.iter().map(|w| w / sum).collect()
}

/// Copies per sample of one bucket of weight `w`: `floor(w)` each plus one whenever the
/// accumulated fractional part reaches 1 (1e-8 slack), e.g. w = 1.8 over 5: 1, 2, 2, 2, 2.
pub fn assign_copies(w: f64, count: usize) -> Vec<usize> {
    let base = w.floor();
    let frac = w - base;
    let mut acc = 0.0;
    (0..count)
        .map(|_| {
            acc += frac;
            if acc >= 1.0 - 1e-8 {
                acc -= 1.0;
                base as usize + 1
            } else {
                base as usize
            }
        })
        .collect()
}

/// (sample index, copies) in output order: buckets of equal scaled weight (atol 1e-6, rtol
/// 1e-5) in ascending weight, samples in their global order within a bucket.
pub fn plan_copies(weights: &[f64]) -> Result<Vec<(usize, usize)>> {
    let min = weights.iter().copied().fold(f64::INFINITY, f64::min);
    if weights.is_empty() {
        return Ok(vec![]);
    }
    if min <= 0.0 {
        bail!("a sampling weight is {min}; every weight must be positive");
    }
    let scaled: Vec<f64> = weights.iter().map(|w| w / min).collect();
    let mut levels: Vec<f64> = vec![];
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 + 1e-5 * b.abs();
    for &w in &scaled {
        if !levels.iter().any(|&l| close(w, l)) {
            levels.push(w);
        }
    }
    levels.sort_by(f64::total_cmp);
    let mut out = vec![];
    for level in levels {
        let members: Vec<usize> = (0..scaled.len())
            .filter(|&i| close(scaled[i], level))
            .collect();
        let copies = assign_copies(level, members.len());
        out.extend(members.into_iter().zip(copies).filter(|&(_, c)| c > 0));
    }
    Ok(out)
}

/// "a spectrogram image of a 25 year old, healthy, female subject", "... with Parkinson's
/// disease" for PD, as the reference's `build_caption`; "... with epilepsy" for CHB-MIT's EP.
pub fn caption(age: Option<i64>, health: &str, gender: Option<&str>) -> String {
    let mut parts = vec![];
    if let Some(a) = age {
        parts.push(format!("{a} year old"));
    }
    if health == "H" {
        parts.push("healthy".into());
    }
    match gender {
        Some("F") => parts.push("female".into()),
        Some("M") => parts.push("male".into()),
        _ => {}
    }
    let who = if parts.is_empty() {
        "subject".to_string()
    } else {
        format!("{} subject", parts.join(", "))
    };
    let condition = match health {
        "PD" => " with Parkinson's disease",
        "EP" => " with epilepsy",
        _ => "",
    };
    format!("a spectrogram image of a {who}{condition}")
}

fn read_split(dir: &Path, dataset: usize, split: &str) -> Result<Vec<Sample>> {
    let path = dir.join(format!("{split}-metadata.csv"));
    let mut rdr = csv::Reader::from_path(&path).with_context(|| {
        format!(
            "cannot read {} (preprocess the dataset first)",
            path.display()
        )
    })?;
    let headers = rdr.headers()?.clone();
    let col = |name: &str| headers.iter().position(|h| h == name);
    let file =
        col("file_name").with_context(|| format!("{}: no `file_name` column", path.display()))?;
    let (g, h, a) = (col("gender"), col("health"), col("age"));
    let mut out = vec![];
    for (i, row) in rdr.records().enumerate() {
        let row = row.with_context(|| format!("{}: row {}", path.display(), i + 2))?;
        let get = |c: Option<usize>| c.and_then(|c| row.get(c)).map(str::trim).unwrap_or("");
        let gender = match get(g).to_ascii_uppercase().as_str() {
            "" | "NA" | "NAN" | "NONE" => None,
            v if is_female(v) => Some("F"),
            _ => Some("M"),
        };
        let health = match get(h).to_ascii_uppercase().as_str() {
            "PD" | "PARKINSONS" | "1" | "TRUE" => "PD",
            "EP" | "EPILEPSY" => "EP",
            _ => "H",
        };
        out.push(Sample {
            dataset,
            file_name: row[file].to_string(),
            gender,
            health,
            age: get(a)
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .map(|x| x as i64),
        });
    }
    Ok(out)
}

/// The RGB PNG of a sample (grey images replicated, as PIL's `convert("RGB")`).
fn rgb_png(path: &Path) -> Result<Vec<u8>> {
    let (px, c, h, w) = crate::data::io::read_png(path)?;
    if c == 3 {
        return crate::data::io::encode_png(&px, 3, h, w);
    }
    let rgb: Vec<u8> = px.iter().flat_map(|&v| [v, v, v]).collect();
    crate::data::io::encode_png(&rgb, 3, h, w)
}

pub fn run(args: &MetaOptions, settings: &Settings) -> Result<MetaSummary> {
    let dirs: Vec<PathBuf> = args
        .datasets
        .iter()
        .map(|name| {
            settings
                .datasets
                .get(name)
                .map(|d| d.output.clone())
                .with_context(|| format!("no `[datasets.{name}]` in the settings"))
        })
        .collect::<Result<_>>()?;
    let out = match &args.output_dir {
        Some(p) if p.is_absolute() => p.clone(),
        Some(p) => settings.output_root.join(p),
        None => settings
            .output_root
            .join("reweighted_meta_dataset_log_n2048_fs125"),
    };
    if out.exists() && !args.overwrite {
        bail!("{} exists; pass --overwrite to replace it", out.display());
    }
    // Everything goes to a sibling directory first, moved into place at the end: an
    // interrupted run leaves the previous dataset (or nothing), never half of one.
    let partial = out.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    std::fs::create_dir_all(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let cap = args.max_sampling_weight.or(settings.max_sampling_weight);
    let mut summary = MetaSummary {
        output: out.clone(),
        ..Default::default()
    };
    for split in &args.copy_splits {
        let mut samples = vec![];
        for (d, dir) in dirs.iter().enumerate() {
            samples.extend(read_split(dir, d, split)?);
        }
        let w = weights(&samples, dirs.len(), cap);
        let plan = plan_copies(&w)?;
        let mut counts = vec![(0, 0); dirs.len()];
        for s in &samples {
            counts[s.dataset].0 += 1;
        }
        let template = Table::empty(&[
            ("file_name", Kind::Text),
            ("split", Kind::Text),
            ("gender", Kind::Text),
            ("health", Kind::Text),
            ("age", Kind::Int),
            ("caption", Kind::Text),
            ("image", Kind::Image),
        ]);
        let mut writer = TableWriter::create(&partial.join(format!("{split}.parquet")), &template)?;
        // Row groups of about 4096 rows (the reference's chunk), images encoded in parallel.
        let mut start = 0;
        while start < plan.len() {
            let mut end = start;
            let mut rows = 0;
            while end < plan.len() && rows < 4096 {
                rows += plan[end].1;
                end += 1;
            }
            let chunk = &plan[start..end];
            let images = encode_parallel(chunk, &samples, &dirs, args.jobs)?;
            let mut t = template.clone();
            for (&(i, copies), png) in chunk.iter().zip(images) {
                let s = &samples[i];
                counts[s.dataset].1 += copies;
                for _ in 0..copies {
                    t.push_row(vec![
                        Cell::Text(Some(s.file_name.clone())),
                        Cell::Text(Some(split.clone())),
                        Cell::Text(s.gender.map(String::from)),
                        Cell::Text(Some(s.health.to_string())),
                        Cell::Int(s.age),
                        Cell::Text(Some(caption(s.age, s.health, s.gender))),
                        Cell::Image(Some(png.clone())),
                    ])?;
                }
            }
            writer.write(&t)?;
            start = end;
        }
        writer.finish()?;
        summary.splits.push((split.clone(), counts));
    }
    write_readme(&partial.join("README.md"), args, &summary)?;
    if out.exists() {
        std::fs::remove_dir_all(&out)
            .with_context(|| format!("cannot remove {}", out.display()))?;
    }
    std::fs::rename(&partial, &out)
        .with_context(|| format!("cannot move {} into place", out.display()))?;
    Ok(summary)
}

fn encode_parallel(
    chunk: &[(usize, usize)],
    samples: &[Sample],
    dirs: &[PathBuf],
    jobs: usize,
) -> Result<Vec<Vec<u8>>> {
    let per = chunk.len().div_ceil(jobs.max(1)).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunk
            .chunks(per)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|&(i, _)| {
                            let s = &samples[i];
                            rgb_png(&dirs[s.dataset].join(&s.file_name))
                        })
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        let mut out = vec![];
        for h in handles {
            out.extend(h.join().expect("image threads do not panic")?);
        }
        Ok(out)
    })
}

fn write_readme(path: &Path, args: &MetaOptions, summary: &MetaSummary) -> Result<()> {
    let hf_split = |s: &str| if s == "val" { "validation" } else { s }.to_string();
    let mut text = String::from("---\nconfigs:\n- config_name: default\n  data_files:\n");
    for (split, _) in &summary.splits {
        text.push_str(&format!(
            "  - split: {}\n    path: {split}.parquet\n",
            hf_split(split)
        ));
    }
    text.push_str(&format!(
        "pretty_name: Weighted Meta Dataset ({})\nlanguage: [en]\nlicense: unknown\ntags: [eeg, spectrogram]\n---\n\n",
        args.datasets.join(", ")
    ));
    text.push_str("# Weighted meta-dataset\n\nWritten by `sigdiff meta-dataset`: the datasets' spectrograms (RGB PNG), duplicated by (dataset, gender) weight so small datasets are not drowned out, with captions. The `split` column keeps the file's split name (`val` is loaded as `validation`).\n\n| split | dataset | original | generated |\n|---|---|---|---|\n");
    for (split, counts) in &summary.splits {
        for (name, (orig, generated)) in args.datasets.iter().zip(counts) {
            text.push_str(&format!("| {split} | {name} | {orig} | {generated} |\n"));
        }
    }
    crate::data::io::write_atomic(path, |w| Ok(w.write_all(text.as_bytes())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_follow_the_accumulated_fraction() {
        assert_eq!(assign_copies(1.8, 5), [1, 2, 2, 2, 2]);
        assert_eq!(assign_copies(1.0, 3), [1, 1, 1]);
        assert_eq!(assign_copies(2.5, 4), [2, 3, 2, 3]);
    }

    #[test]
    fn captions_as_the_reference_writes_them() {
        assert_eq!(
            caption(Some(25), "H", Some("F")),
            "a spectrogram image of a 25 year old, healthy, female subject"
        );
        assert_eq!(
            caption(Some(60), "PD", Some("M")),
            "a spectrogram image of a 60 year old, male subject with Parkinson's disease"
        );
        assert_eq!(caption(None, "X", None), "a spectrogram image of a subject");
        // CHB-MIT (ours; the reference had no mit dataset).
        assert_eq!(
            caption(Some(11), "EP", Some("F")),
            "a spectrogram image of a 11 year old, female subject with epilepsy"
        );
    }

    fn sample(dataset: usize, female: bool) -> Sample {
        Sample {
            dataset,
            file_name: String::new(),
            gender: Some(if female { "F" } else { "M" }),
            health: "H",
            age: None,
        }
    }

    #[test]
    fn the_smaller_dataset_gets_the_larger_weight_whatever_the_list_order() {
        // Dataset 0 is large (8 samples), dataset 1 small (2): listed large first, the
        // reference's position indexing would keep each dataset's own pair.
        let mut s: Vec<Sample> = (0..8).map(|i| sample(0, i % 2 == 0)).collect();
        s.extend((0..2).map(|i| sample(1, i == 0)));
        let w = weights(&s, 2, None);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // pF = pM = 0.5; d = (0.8, 0.2): dataset 1 takes (1.3, 1.3), dataset 0 (0.7, 0.7).
        assert!((w[9] / w[0] - 1.3 / 0.7).abs() < 1e-12, "{w:?}");
        let plan = plan_copies(&w).unwrap();
        // Scaled weights 1 (dataset 0) and 1.857 (dataset 1): 8 single copies, then 1, 2.
        let copies: Vec<usize> = plan.iter().map(|&(_, c)| c).collect();
        assert_eq!(copies, [1, 1, 1, 1, 1, 1, 1, 1, 1, 2]);
        assert_eq!(plan[8].0, 8);
        // A cap applies to each element of the pairs.
        let capped = weights(&s, 2, Some(1.0));
        assert!((capped[9] / capped[0] - 1.0 / 0.7).abs() < 1e-12);
    }
}
