//! Preprocessed datasets on disk and the threaded batch loader.
//!
//! Layout (the reference's, as `sigdiff synth` and preprocessing write it):
//! `<dir>/{split}-metadata.csv` with a `file_name` column relative to `<dir>` and one column per
//! label; samples are 8-bit PNGs (L or RGB), mapped to [-1, 1] like the reference's
//! `ToDtype(scale) + Normalize(0.5, 0.5)`, or float32 `.npy` time series. Every sample must have
//! the compiled input shape; one that does not is an error naming its file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::tasks::{encode, TaskSpec};

/// One split: sample files and their encoded targets (task-major: `targets[task][sample]`).
pub struct Split {
    pub name: String,
    pub files: Vec<PathBuf>,
    pub targets: Vec<Vec<f32>>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.files.len()
    }
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// Read `<dir>/<split>-metadata.csv` and encode every task's column.
pub fn read_split(dir: &Path, split: &str, tasks: &[TaskSpec]) -> Result<Split> {
    let csv_path = dir.join(format!("{split}-metadata.csv"));
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
    for (i, row) in rdr.records().enumerate() {
        let row = row.with_context(|| format!("{}: row {}", csv_path.display(), i + 2))?;
        files.push(dir.join(&row[file_col]));
        for (t, (&c, spec)) in task_cols.iter().zip(tasks).enumerate() {
            let v = encode(spec, &row[c]).map_err(|e| {
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
        files,
        targets,
    })
}

/// Decode one sample into `out` (length = product of `shape`), values in [-1, 1] for images.
pub fn load_sample(path: &Path, shape: &[usize], out: &mut Vec<f32>) -> Result<()> {
    out.clear();
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => {
            let (dims, data) = crate::io::read_npy_f32(path)?;
            if dims != shape {
                bail!(
                    "{}: shape {dims:?}, but this trainer was compiled for {shape:?}",
                    path.display()
                );
            }
            out.extend_from_slice(&data);
        }
        _ => {
            let (c, h, w) = (shape[0], shape[1], shape[2]);
            let (pixels, pc, ph, pw) = crate::io::read_png(path)?;
            if (ph, pw) != (h, w) {
                bail!(
                    "{}: image is {pw}×{ph}, but this trainer was compiled for {w}×{h}",
                    path.display()
                );
            }
            // L for 1-channel models, RGB for 3 (grey images are replicated), as the reference's
            // `convert("L" | "RGB")`.
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
    pub fn new(
        split: Arc<Split>,
        order: Vec<usize>,
        batch_size: usize,
        shape: Vec<usize>,
        workers: usize,
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
                            load_sample(&split.files[i], &shape, &mut buf)?;
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
