//! `dataset.cache_dir`: a split's images decoded once into one file and read back raw.
//!
//! A Parquet split holds its images as PNG bytes and an image folder as PNG files; without a
//! cache every epoch decodes every image again. With one, the first run decodes the split (on
//! the loader's threads) into `<cache_dir>/<dataset>-<hash of its path>/<split>.u8` (pixels
//! back to back, 8-bit, as decoded) beside `<split>.json` (each image's offset and shape, and
//! the source's fingerprint); later runs read the pixels at their offsets, and the augmentations
//! apply to them exactly as to a decoded PNG, so a run with the cache trains on the same
//! numbers. The fingerprint covers what the split was read from (the table, or the metadata CSV
//! and every image file: path, size and modification time) and the image column; when it
//! changes, the files are written again. Both are written to temporary names and renamed, so an
//! interrupted run leaves the old cache or none. A Parquet split's encoded images are dropped
//! from memory once cached.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::loader::{Samples, Split};

/// Where each image of the cached file lies, and what the cache was made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Index {
    /// Bumped when the file layout changes.
    version: u32,
    fingerprint: String,
    /// (byte offset, channels, height, width) per image, in split order.
    images: Vec<(u64, usize, usize, usize)>,
}

const VERSION: u32 = 1;

/// The decoded images of a split, read from the cache file.
pub struct Decoded {
    path: PathBuf,
    file: File,
    images: Vec<(u64, usize, usize, usize)>,
}

impl Decoded {
    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    pub fn truncate(&mut self, n: usize) {
        self.images.truncate(n);
    }

    /// Image `i` as (pixels, channels, height, width), as `io::decode_png` returns it.
    pub fn get(&self, i: usize) -> Result<(Vec<u8>, usize, usize, usize)> {
        let (offset, c, h, w) = self.images[i];
        let mut pixels = vec![0u8; c * h * w];
        read_at(&self.file, &mut pixels, offset).with_context(|| {
            format!(
                "{}: cannot read image {i} (the cache is damaged: delete it to rebuild)",
                self.path.display()
            )
        })?;
        Ok((pixels, c, h, w))
    }
}

#[cfg(unix)]
pub(crate) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
pub(crate) fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_read(file, buf, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// What a split was read from: path, size and modification time of each source file.
pub(crate) fn fingerprint(split: &Split, image_column: Option<&str>) -> Result<String> {
    let files: Vec<&Path> = match &split.samples {
        Samples::Files(files) => std::iter::once(split.source.as_path())
            .chain(files.iter().map(PathBuf::as_path))
            .collect(),
        Samples::Encoded { table, .. } => vec![table.as_path()],
        Samples::Signals { .. } | Samples::Decoded(_) | Samples::Latents(_) => {
            bail!("only image splits are cached")
        }
    };
    let mut text = format!("column={}\n", image_column.unwrap_or("image"));
    for f in files {
        let meta = std::fs::metadata(f).with_context(|| format!("cannot stat {}", f.display()))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        text.push_str(&format!("{}\t{}\t{mtime}\n", f.display(), meta.len()));
    }
    Ok(format!(
        "{:016x}-{}",
        super::io::fnv(text.as_bytes()),
        split.len()
    ))
}

/// The split with its images read from the cache under `cache_dir` (made or remade first when
/// missing or stale); time series and already cached splits are returned as they are.
pub fn cached(
    mut split: Split,
    dataset_dir: &Path,
    cache_dir: &Path,
    image_column: Option<&str>,
    workers: usize,
) -> Result<Split> {
    if matches!(
        split.samples,
        Samples::Signals { .. } | Samples::Decoded(_) | Samples::Latents(_)
    ) || matches!(&split.samples, Samples::Files(f) if f.first().is_some_and(|p| p.extension().is_some_and(|e| e == "npy")))
    {
        return Ok(split);
    }
    let absolute = std::path::absolute(dataset_dir).unwrap_or_else(|_| dataset_dir.to_path_buf());
    let name = absolute
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dataset".into());
    let dir = cache_dir.join(format!(
        "{name}-{:08x}",
        super::io::fnv(absolute.to_string_lossy().as_bytes()) as u32
    ));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the cache directory {}", dir.display()))?;
    let (pixels_path, index_path) = (
        dir.join(format!("{}.u8", split.name)),
        dir.join(format!("{}.json", split.name)),
    );
    let fingerprint = fingerprint(&split, image_column)?;
    let existing: Option<Index> = std::fs::read_to_string(&index_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let index = match existing {
        Some(index)
            if index.version == VERSION
                && index.fingerprint == fingerprint
                && pixels_path.exists() =>
        {
            println!(
                "cache: the {} split's {} decoded images from {}",
                split.name,
                index.images.len(),
                pixels_path.display()
            );
            index
        }
        _ => {
            let started = Instant::now();
            let index = build(&split, &pixels_path, fingerprint, workers)?;
            let json = serde_json::to_string(&index)?;
            super::io::write_atomic(&index_path, |w| Ok(w.write_all(json.as_bytes())?))?;
            let bytes = index
                .images
                .last()
                .map_or(0, |&(o, c, h, w)| o + (c * h * w) as u64);
            println!(
                "cache: decoded the {} split's {} images into {} ({:.1} MB, {:.1} s)",
                split.name,
                index.images.len(),
                pixels_path.display(),
                bytes as f64 / 1e6,
                started.elapsed().as_secs_f64()
            );
            index
        }
    };
    let file = File::open(&pixels_path)
        .with_context(|| format!("cannot open {}", pixels_path.display()))?;
    split.samples = Samples::Decoded(Decoded {
        path: pixels_path,
        file,
        images: index.images,
    });
    Ok(split)
}

/// Decode every image of `split` on `workers` threads and write them, in order, to `path`.
fn build(split: &Split, path: &Path, fingerprint: String, workers: usize) -> Result<Index> {
    let n = split.len();
    let chunk = n.div_ceil(workers.max(1)).max(1);
    type Image = (Vec<u8>, usize, usize, usize);
    let decoded: Vec<Result<Vec<Image>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|start| {
                s.spawn(move || {
                    (start..(start + chunk).min(n))
                        .map(|i| split.decode(i))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a decoding thread panicked"))
            })
            .collect()
    });
    let mut images = Vec::with_capacity(n);
    super::io::write_atomic(path, |w| {
        let mut offset = 0u64;
        for part in decoded {
            for (pixels, c, h, wd) in part? {
                w.write_all(&pixels)?;
                images.push((offset, c, h, wd));
                offset += pixels.len() as u64;
            }
        }
        Ok(())
    })?;
    Ok(Index {
        version: VERSION,
        fingerprint,
        images,
    })
}
