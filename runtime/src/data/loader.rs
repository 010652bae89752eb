//! Preprocessed datasets on disk and the threaded batch loader.
//!
//! Two layouts, as the reference trains on them:
//! - an image folder (as `sigdiff synth` and `sigdiff preprocess` write it):
//!   `<dir>/{split}-metadata.csv` with a `file_name` column relative to `<dir>` and one column
//!   per label; samples are 8-bit PNGs (L or RGB) or float32 `.npy` time series;
//! - a Parquet table per split (as `sigdiff meta-dataset` or Hugging Face `datasets` write it):
//!   `<dir>/{split}.parquet` (`val` and `validation` name the same split) with an `image`
//!   column of PNG bytes (another name with `dataset.image_column`), or for time series a
//!   `signal` column of (channels, samples) float lists (the reference's time-series
//!   meta-dataset), and one column per label; held in memory (or decoded once into
//!   `dataset.cache_dir`, see `cache`).
//!
//! Pixels map to [-1, 1] like the reference's `ToDtype(scale) + Normalize(0.5, 0.5)`. Every
//! sample must have the compiled input shape; one that does not is an error naming it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::data::image::{Augment, Image};
use crate::tasks::{encode, TaskSpec};

fn is_npy(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "npy")
}

/// One split: its samples and their encoded targets (task-major: `targets[task][sample]`).
pub struct Split {
    pub name: String,
    /// What the split was read from: its metadata CSV or its Parquet table.
    pub source: PathBuf,
    pub samples: Samples,
    pub targets: Vec<Vec<f32>>,
    /// Resize, crop and flip applied to images as they load (none: they must fit exactly).
    pub augment: Augment,
    /// The distinct texts of a `caption` task's column, in order of appearance: its target is
    /// the text's index here, NaN for an empty one.
    pub texts: Vec<String>,
}

pub enum Samples {
    /// Image or `.npy` files.
    Files(Vec<PathBuf>),
    /// PNG bytes of the rows of a Parquet table.
    Encoded {
        table: PathBuf,
        images: Vec<Vec<u8>>,
    },
    /// Time series of the rows of a Parquet table.
    Signals {
        table: PathBuf,
        signals: Vec<crate::data::table::Array2>,
    },
    /// Images decoded once into `dataset.cache_dir` (see `cache`).
    Decoded(crate::data::cache::Decoded),
    /// Images encoded once by a VAE: each sample is its latent mean then log-variance (see
    /// `latents`).
    Latents(crate::data::latents::Latents),
}

impl Split {
    pub fn len(&self) -> usize {
        match &self.samples {
            Samples::Files(f) => f.len(),
            Samples::Encoded { images, .. } => images.len(),
            Samples::Signals { signals, .. } => signals.len(),
            Samples::Decoded(d) => d.len(),
            Samples::Latents(l) => l.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep the first `n` samples (`max_train_samples`, `max_eval_samples`).
    pub fn truncate(&mut self, n: usize) {
        match &mut self.samples {
            Samples::Files(f) => f.truncate(n),
            Samples::Encoded { images, .. } => images.truncate(n),
            Samples::Signals { signals, .. } => signals.truncate(n),
            Samples::Decoded(d) => d.truncate(n),
            Samples::Latents(l) => l.truncate(n),
        }
        for t in &mut self.targets {
            t.truncate(n);
        }
    }

    /// Decode sample `i` into `out`. `salt` varies the random augmentations (by epoch); the same
    /// (salt, i) always gives the same crop and flip.
    pub fn load(&self, i: usize, shape: &[usize], salt: u64, out: &mut Vec<f32>) -> Result<()> {
        let draw = crate::ops::cpu::splitmix64(salt ^ crate::ops::cpu::splitmix64(i as u64));
        match &self.samples {
            Samples::Files(files) if is_npy(&files[i]) => {
                return load_sample(&files[i], shape, out)
            }
            Samples::Signals { table, signals } => {
                let what = || format!("{} row {i}", table.display());
                check_series_shape(&signals[i].shape, shape, what)?;
                out.clear();
                out.extend_from_slice(&signals[i].values);
                return Ok(());
            }
            // The mirror image half the time, by the draw a flip of the image would use.
            Samples::Latents(latents) => return latents.get(i, draw >> 63 == 1, out),
            _ => {}
        }
        let decoded = self.decode(i)?;
        let decoded = if self.augment == Augment::default() {
            decoded
        } else {
            let (pixels, channels, height, width) = decoded;
            let img = Image {
                pixels,
                channels,
                height,
                width,
            };
            let img = self.augment.apply(img, shape[1], draw);
            (img.pixels, img.channels, img.height, img.width)
        };
        image_to_input(decoded, shape, &self.describe(i), out)
    }

    /// Image `i` decoded, before any augmentation: (pixels, channels, height, width).
    pub fn decode(&self, i: usize) -> Result<(Vec<u8>, usize, usize, usize)> {
        match &self.samples {
            Samples::Files(files) => crate::data::io::read_png(&files[i]),
            Samples::Encoded { images, .. } => {
                crate::data::io::decode_png(&images[i], &self.describe(i))
            }
            Samples::Decoded(d) => d.get(i),
            Samples::Signals { .. } => bail!("{} is a time series", self.describe(i)),
            Samples::Latents(_) => bail!("{} is encoded into latents", self.describe(i)),
        }
    }

    /// Sample `i` in messages: its file, or its table row.
    fn describe(&self, i: usize) -> String {
        match &self.samples {
            Samples::Files(files) => files[i].display().to_string(),
            _ => format!("{} row {i}", self.source.display()),
        }
    }
}

/// The Parquet table of a split, if `dir` has one (`val` and `validation` name the same split).
fn parquet_split(dir: &Path, split: &str) -> Option<PathBuf> {
    let aliases: &[&str] = match split {
        "val" | "validation" => &["val", "validation"],
        other => &[other][..],
    };
    aliases
        .iter()
        .map(|a| dir.join(format!("{a}.parquet")))
        .find(|p| p.exists())
}

/// Whether `dir` has the split, in either form.
pub fn has_split(dir: &Path, split: &str) -> bool {
    dir.join(format!("{split}-metadata.csv")).exists() || parquet_split(dir, split).is_some()
}

/// Read a split of `dir` (image folder or Parquet, see the module docs) and encode every task's
/// column. `image_column`: the Parquet column of the images when it is not `image`.
pub fn read_split(
    dir: &Path,
    split: &str,
    tasks: &[TaskSpec],
    image_column: Option<&str>,
) -> Result<Split> {
    let csv_path = dir.join(format!("{split}-metadata.csv"));
    if !csv_path.exists() {
        if let Some(table) = parquet_split(dir, split) {
            return read_parquet_split(&table, split, tasks, image_column);
        }
    }
    if let Some(column) = image_column {
        bail!(
            "`dataset.image_column` = \"{column}\" names a Parquet column, but {} is an image folder, whose images are the files of its `file_name` column (expected {} for a Parquet split)",
            csv_path.display(),
            dir.join(format!("{split}.parquet")).display()
        );
    }
    let mut rdr = csv::Reader::from_path(&csv_path).with_context(|| {
        format!("cannot read {} (expected a preprocessed dataset: `sigdiff synth` or preprocessing writes it; check `dataset.name` and the split name)", csv_path.display())
    })?;
    let headers = rdr
        .headers()
        .with_context(|| format!("{}: no header row", csv_path.display()))?
        .clone();
    let col = |name: &str| headers.iter().position(|h| h == name);
    let file_col = col("file_name")
        .with_context(|| format!("{}: no `file_name` column", csv_path.display()))?;
    let task_cols: Vec<usize> = tasks
        .iter()
        .map(|t| {
            col(t.column).with_context(|| {
                format!(
                    "{}: no `{}` column for task `{}` (columns: {})",
                    csv_path.display(),
                    t.column,
                    t.name,
                    headers.iter().collect::<Vec<_>>().join(", ")
                )
            })
        })
        .collect::<Result<_>>()?;
    let mut files = vec![];
    let mut targets = vec![vec![]; tasks.len()];
    let mut texts = TextTable::default();
    for (i, row) in rdr.records().enumerate() {
        let row = row.with_context(|| format!("{}: row {}", csv_path.display(), i + 2))?;
        files.push(dir.join(&row[file_col]));
        for (t, (&c, spec)) in task_cols.iter().zip(tasks).enumerate() {
            let v = encode_or_intern(spec, &row[c], &mut texts).map_err(|e| {
                anyhow::anyhow!(
                    "{}:{}: column `{}`: {e}",
                    csv_path.display(),
                    i + 2,
                    spec.column
                )
            })?;
            targets[t].push(v);
        }
    }
    if files.is_empty() {
        bail!("{}: the split `{split}` has no samples", csv_path.display());
    }
    Ok(Split {
        name: split.to_string(),
        source: csv_path,
        samples: Samples::Files(files),
        texts: texts.texts,
        targets,
        augment: Augment::default(),
    })
}

fn read_parquet_split(
    path: &Path,
    split: &str,
    tasks: &[TaskSpec],
    image_column: Option<&str>,
) -> Result<Split> {
    let mut table = crate::data::table::read(path)?;
    let found = match image_column {
        Some(c) => table.names.iter().position(|n| n == c),
        None => table
            .names
            .iter()
            .position(|n| n == "image" || n == "signal"),
    };
    let Some(at) = found else {
        bail!(
            "{}: no column {} (columns: {})",
            path.display(),
            match image_column {
                Some(c) => format!("`{c}` (`dataset.image_column`)"),
                None => "`image` or `signal`".into(),
            },
            table.names.join(", ")
        );
    };
    let name = table.names.swap_remove(at);
    let column = table.columns.swap_remove(at);
    let rows = column.len();
    let missing = |i: usize| format!("{} row {i}: no {name}", path.display());
    let samples = match column {
        crate::data::table::Column::Image(v) => Samples::Encoded {
            table: path.to_path_buf(),
            images: v
                .into_iter()
                .enumerate()
                .map(|(i, b)| b.with_context(|| missing(i)))
                .collect::<Result<_>>()?,
        },
        crate::data::table::Column::Array2(v) => Samples::Signals {
            table: path.to_path_buf(),
            signals: v
                .into_iter()
                .enumerate()
                .map(|(i, b)| b.with_context(|| missing(i)))
                .collect::<Result<_>>()?,
        },
        _ => bail!(
            "{}: the `{name}` column holds neither image structs nor lists of float lists",
            path.display()
        ),
    };
    let mut targets = vec![];
    let mut texts = TextTable::default();
    for spec in tasks {
        let column = table.column(spec.column).with_context(|| {
            format!(
                "{}: no `{}` column for task `{}` (columns: {})",
                path.display(),
                spec.column,
                spec.name,
                table.names.join(", ")
            )
        })?;
        let values = (0..rows)
            .map(|i| {
                encode_or_intern(spec, &column.text(i).unwrap_or_default(), &mut texts).map_err(
                    |e| {
                        anyhow::anyhow!("{} row {i}: column `{}`: {e}", path.display(), spec.column)
                    },
                )
            })
            .collect::<Result<Vec<f32>>>()?;
        targets.push(values);
    }
    if rows == 0 {
        bail!("{}: the split `{split}` has no samples", path.display());
    }
    Ok(Split {
        name: split.to_string(),
        source: path.to_path_buf(),
        samples,
        targets,
        augment: Augment::default(),
        texts: texts.texts,
    })
}

/// Distinct texts (captions) in order of first appearance, each with its index.
#[derive(Default)]
pub struct TextTable {
    pub texts: Vec<String>,
    index: HashMap<String, usize>,
}

impl TextTable {
    /// The index of `raw` (trimmed), added when new; `None` for an empty text (the null).
    pub fn id(&mut self, raw: &str) -> Option<usize> {
        let text = raw.trim();
        if text.is_empty() {
            return None;
        }
        if let Some(&i) = self.index.get(text) {
            return Some(i);
        }
        self.texts.push(text.to_string());
        self.index.insert(text.to_string(), self.texts.len() - 1);
        Some(self.texts.len() - 1)
    }
}

/// A task's value of `raw`: its encoding, or for a `caption` task the index of the text among
/// the split's distinct texts (NaN for an empty text, the null condition).
fn encode_or_intern(
    spec: &TaskSpec,
    raw: &str,
    texts: &mut TextTable,
) -> std::result::Result<f32, String> {
    match spec.encoder {
        "caption" => Ok(texts.id(raw).map_or(f32::NAN, |i| i as f32)),
        _ => encode(spec, raw),
    }
}

/// Decode one sample into `out` (length = product of `shape`), values in [-1, 1] for images.
pub fn load_sample(path: &Path, shape: &[usize], out: &mut Vec<f32>) -> Result<()> {
    out.clear();
    match is_npy(path) {
        true => {
            let (dims, data) = crate::data::io::read_npy_f32(path)?;
            check_series_shape(&dims, shape, || path.display().to_string())?;
            out.extend_from_slice(&data);
        }
        _ => image_to_input(
            crate::data::io::read_png(path)?,
            shape,
            &path.display().to_string(),
            out,
        )?,
    }
    Ok(())
}

/// A time series of `dims` fits the compiled input `shape`: equal, or (channels, samples) where
/// the model reads (1, channels, samples) as DiT does.
fn check_series_shape(dims: &[usize], shape: &[usize], what: impl Fn() -> String) -> Result<()> {
    if dims != shape && !(shape.first() == Some(&1) && dims == &shape[1..]) {
        bail!(
            "{}: shape {dims:?}, but this trainer was compiled for {shape:?}",
            what()
        );
    }
    Ok(())
}

/// Decoded pixels (pixels, channels, height, width) to the model's input in [-1, 1]: L for
/// 1-channel models, RGB for 3 (grey images are replicated), as the reference's
/// `convert("L" | "RGB")`.
fn image_to_input(
    (pixels, pc, ph, pw): (Vec<u8>, usize, usize, usize),
    shape: &[usize],
    what: &str,
    out: &mut Vec<f32>,
) -> Result<()> {
    out.clear();
    let (c, h, w) = (shape[0], shape[1], shape[2]);
    if (ph, pw) != (h, w) {
        bail!("{what}: image is {pw}×{ph}, but this trainer was compiled for {w}×{h}");
    }
    for ch in 0..c {
        for i in 0..h * w {
            let v = match (pc, c) {
                (1, _) => pixels[i],
                (_, 1) => luma(&pixels[i * pc..i * pc + 3]),
                _ => pixels[i * pc + ch.min(pc - 1)],
            };
            out.push(v as f32 / 127.5 - 1.0);
        }
    }
    Ok(())
}

/// PIL's RGB -> L: (299 R + 587 G + 114 B) / 1000, rounded.
fn luma(rgb: &[u8]) -> u8 {
    ((rgb[0] as u32 * 299 + rgb[1] as u32 * 587 + rgb[2] as u32 * 114 + 500) / 1000) as u8
}

/// A decoded batch: inputs flattened (B × shape) and per-task targets.
pub struct Batch {
    pub inputs: Vec<f32>,
    pub targets: Vec<Vec<f32>>,
    pub size: usize,
}

/// Decode batches on `workers` threads, in order, at most `2 × workers` ahead of the consumer.
pub struct Loader {
    rx: mpsc::Receiver<(usize, Result<Batch>)>,
    pending: BTreeMap<usize, Result<Batch>>,
    next: usize,
    total: usize,
}

impl Loader {
    /// `order` is the sample order for this epoch; the last batch may be short (drop_last = false).
    /// `salt` seeds the split's random augmentations for this pass.
    pub fn new(
        split: Arc<Split>,
        order: Vec<usize>,
        batch_size: usize,
        shape: Vec<usize>,
        workers: usize,
        salt: u64,
    ) -> Self {
        let batches: Vec<Vec<usize>> = order.chunks(batch_size).map(<[usize]>::to_vec).collect();
        let total = batches.len();
        let workers = workers.max(1).min(total.max(1));
        let (tx, rx) = mpsc::sync_channel(2 * workers);
        let batches = Arc::new(batches);
        for w in 0..workers {
            let (tx, batches, split, shape) =
                (tx.clone(), batches.clone(), split.clone(), shape.clone());
            std::thread::spawn(move || {
                let mut buf = vec![];
                for b in (w..batches.len()).step_by(workers) {
                    let result = (|| {
                        let idx = &batches[b];
                        let mut inputs =
                            Vec::with_capacity(idx.len() * shape.iter().product::<usize>());
                        for &i in idx {
                            split.load(i, &shape, salt, &mut buf)?;
                            inputs.extend_from_slice(&buf);
                        }
                        let targets = split
                            .targets
                            .iter()
                            .map(|t| idx.iter().map(|&i| t[i]).collect())
                            .collect();
                        Ok(Batch {
                            inputs,
                            targets,
                            size: idx.len(),
                        })
                    })();
                    if tx.send((b, result)).is_err() {
                        return; // the consumer stopped early
                    }
                }
            });
        }
        Loader {
            rx,
            pending: BTreeMap::new(),
            next: 0,
            total,
        }
    }

    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.total {
            return None;
        }
        while !self.pending.contains_key(&self.next) {
            match self.rx.recv() {
                Ok((i, b)) => {
                    self.pending.insert(i, b);
                }
                Err(_) => {
                    return Some(Err(anyhow::anyhow!(
                        "a data loader thread stopped unexpectedly"
                    )))
                }
            }
        }
        let b = self.pending.remove(&self.next);
        self.next += 1;
        b
    }
}
