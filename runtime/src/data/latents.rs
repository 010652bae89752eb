//! The latent cache: a split's images encoded once by the frozen VAE, kept on disk as the
//! latent distribution's mean and log-variance, so training never runs the encoder again (the
//! reference encodes every image at every step). Each step draws z = mean + exp(logvar / 2)·ε
//! from the cached distribution, as the reference samples `latent_dist` each step.
//!
//! Layout: `<root>/latents-<dataset>-<key>/<split>-<source>/shard-NNNNN.f32`, `SHARD` samples
//! per shard, each
//! sample's variants back to back (the image, then, with `random_flip`, its mirror image), each
//! variant its mean then its log-variance (f32, little-endian), and `index.json` once every
//! shard is there. `<root>` is `dataset.cache_dir`, else the dataset's own directory. `<key>`
//! hashes the encoder (the VAE's weights, the resolution) and `<source>` the split (what it was
//! read from: paths, sizes, modification times; its crop and flip settings), so a rerun reuses
//! the cache and any change encodes into a new directory (old ones stay until deleted). Shards are written to a temporary name
//! and renamed: an interrupted run leaves whole shards, and the next run encodes only the
//! missing ones.
//!
//! Images are resized as in pixel space and centre-cropped; random crops cannot be cached, so a
//! split whose images are not square after the resize needs `center_crop = true` (square
//! images have one crop, and random crops of them are the same image).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::image::Augment;
use super::loader::{Loader, Samples, Split};

/// Samples per shard file in training (a shard is what an interrupted run may lose).
pub const SHARD: usize = 64;
const VERSION: u32 = 1;

/// What `index.json` records: enough to read the shards and to know they are complete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Index {
    version: u32,
    key: String,
    samples: usize,
    shard_size: usize,
    /// 2 with `random_flip` (the image and its mirror), else 1.
    variants: usize,
    /// (latent channels, height, width).
    latent: [usize; 3],
}

/// A split's cached latent distributions, read at their offsets.
pub struct Latents {
    dir: PathBuf,
    shards: Vec<File>,
    samples: usize,
    shard_size: usize,
    variants: usize,
    /// Floats of one mean (or one log-variance).
    per: usize,
}

impl Latents {
    pub fn len(&self) -> usize {
        self.samples
    }

    pub fn is_empty(&self) -> bool {
        self.samples == 0
    }

    pub fn truncate(&mut self, n: usize) {
        self.samples = self.samples.min(n);
    }

    /// Sample `i`'s mean then log-variance into `out` (2 × latent floats): its mirror image's
    /// when `flip` (and the cache has one).
    pub fn get(&self, i: usize, flip: bool, out: &mut Vec<f32>) -> Result<()> {
        let variant = usize::from(flip && self.variants == 2);
        let floats = 2 * self.per;
        let offset = ((i % self.shard_size) * self.variants + variant) * floats;
        let mut bytes = vec![0u8; floats * 4];
        super::cache::read_at(
            &self.shards[i / self.shard_size],
            &mut bytes,
            offset as u64 * 4,
        )
        .with_context(|| {
            format!(
                "{}: cannot read sample {i} (the cache is damaged: delete it to encode again)",
                self.dir.display()
            )
        })?;
        out.clear();
        out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        Ok(())
    }
}

/// The cache of a dataset for this VAE: (the dataset's directory name, with a hash of the VAE
/// and the resolution; the split's, with a hash of its sources and its crop and flip).
fn key(split: &Split, vae: &Encoder, spec: &Encoding) -> Result<(String, String)> {
    let encoder = format!(
        "v{VERSION}\nvae={}\nresolution={}",
        vae.hash, spec.resolution
    );
    let source = format!(
        "{}\ncenter_crop={}\nflip={}",
        super::cache::fingerprint(split, spec.image_column.as_deref())?,
        !spec.random_crop,
        spec.random_flip
    );
    let absolute =
        std::path::absolute(&spec.dataset_dir).unwrap_or_else(|_| spec.dataset_dir.clone());
    let name = absolute
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dataset".into());
    Ok((
        format!(
            "latents-{name}-{:012x}",
            super::io::fnv(encoder.as_bytes()) >> 16
        ),
        format!(
            "{}-{:08x}",
            split.name,
            super::io::fnv(source.as_bytes()) >> 32
        ),
    ))
}

/// The frozen encoder (the VAE; `data` knows no models): images (B, 3, H, W) in [-1, 1] to the
/// latent distribution's mean and log-variance (B, C, h, w).
pub struct Encoder<'a> {
    /// Identifies the encoder's weights (part of the cache key).
    pub hash: &'a str,
    /// (C, h, w) of one latent.
    pub latent: [usize; 3],
    pub encode: &'a dyn Fn(&Tensor) -> Result<(Tensor, Tensor)>,
}

/// How images become latents, and where the cache goes.
pub struct Encoding {
    /// `dataset.cache_dir`, else the dataset's directory.
    pub root: PathBuf,
    pub dataset_dir: PathBuf,
    /// Training asked for random crops (`center_crop = false`): images must be square.
    pub random_crop: bool,
    /// Training flips at random: each image's mirror image is cached as a second variant.
    pub random_flip: bool,
    pub resolution: usize,
    pub image_column: Option<String>,
    pub workers: usize,
    /// Samples per shard ([`SHARD`]).
    pub shard_size: usize,
}

/// `split` (its images, resized and centre-cropped as it loads them) as a split of cached
/// latents: encoded by `vae` into `spec.root` first unless a complete cache for the same VAE,
/// settings and sources is there; shards an earlier run finished are kept. With
/// `random_flip` the mirror images are cached as a second variant, which the loader picks per
/// step.
pub fn cached(
    split: &Arc<Split>,
    vae: &Encoder,
    spec: &Encoding,
    device: &Device,
) -> Result<Split> {
    let (dataset_key, split_key) = key(split, vae, spec)?;
    let dir = spec.root.join(&dataset_key).join(&split_key);
    std::fs::create_dir_all(&dir).with_context(|| {
        format!(
            "cannot create the latent cache {} (set `dataset.cache_dir` to a writable directory)",
            dir.display()
        )
    })?;
    let latent = vae.latent;
    let index = Index {
        version: VERSION,
        key: format!("{dataset_key}/{split_key}"),
        samples: split.len(),
        shard_size: spec.shard_size,
        variants: if spec.random_flip { 2 } else { 1 },
        latent,
    };
    let index_path = dir.join("index.json");
    let existing: Option<Index> = std::fs::read_to_string(&index_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    if existing.as_ref() == Some(&index) {
        println!(
            "latents: the {} split's {} samples from {}",
            split.name,
            index.samples,
            dir.display()
        );
    } else {
        encode(split, vae, &dir, &index, spec, device)?;
        let json = serde_json::to_string(&index)?;
        super::io::write_atomic(&index_path, |w| Ok(w.write_all(json.as_bytes())?))?;
    }
    let shards = (0..index.samples.div_ceil(index.shard_size))
        .map(|s| {
            let p = shard_path(&dir, s);
            File::open(&p).with_context(|| format!("cannot open {}", p.display()))
        })
        .collect::<Result<_>>()?;
    Ok(Split {
        name: split.name.clone(),
        source: split.source.clone(),
        samples: Samples::Latents(Latents {
            dir,
            shards,
            samples: index.samples,
            shard_size: index.shard_size,
            variants: index.variants,
            per: latent.iter().product(),
        }),
        targets: split.targets.clone(),
        augment: Augment::default(),
        texts: split.texts.clone(),
    })
}

fn shard_path(dir: &Path, s: usize) -> PathBuf {
    dir.join(format!("shard-{s:05}.f32"))
}

/// Encode the shards of `dir` that are missing (or the wrong size), in order.
fn encode(
    split: &Arc<Split>,
    vae: &Encoder,
    dir: &Path,
    index: &Index,
    spec: &Encoding,
    device: &Device,
) -> Result<()> {
    let resolution = spec.resolution;
    let per: usize = index.latent.iter().product();
    let (n, size) = (index.samples, index.shard_size);
    let sample_bytes = (index.variants * 2 * per * 4) as u64;
    let todo: Vec<usize> = (0..n.div_ceil(size))
        .filter(|&s| {
            let want = (size.min(n - s * size)) as u64 * sample_bytes;
            std::fs::metadata(shard_path(dir, s)).map(|m| m.len()).ok() != Some(want)
        })
        .collect();
    if todo.is_empty() {
        return Ok(());
    }
    let kept = n.div_ceil(size) - todo.len();
    println!(
        "latents: encoding the {} split ({n} images{}, {} shards to write{}) into {}",
        split.name,
        if index.variants == 2 {
            " and their mirror images"
        } else {
            ""
        },
        todo.len(),
        if kept > 0 {
            format!(", {kept} kept from an interrupted run")
        } else {
            String::new()
        },
        dir.display()
    );
    let started = Instant::now();
    let image = [3, resolution, resolution];
    for s in todo {
        let rows: Vec<usize> = (s * size..n.min((s + 1) * size)).collect();
        if spec.random_crop {
            for &i in &rows {
                let (_, _, h, w) = split.decode(i)?;
                if h != w {
                    bail!(
                        "sample {i} of {} is {w}×{h}: random crops of non-square images cannot be cached as latents; set `dataset.center_crop = true`",
                        split.source.display()
                    );
                }
            }
        }
        let mut out = Vec::with_capacity(rows.len() * sample_bytes as usize / 4);
        let loader = Loader::new(split.clone(), rows, 8, image.to_vec(), spec.workers, 0);
        for batch in loader {
            let batch = batch?;
            let b = batch.size;
            let x = Tensor::from_slice(&batch.inputs, (b, 3, resolution, resolution), device)?;
            let mut variants = vec![(vae.encode)(&x)?];
            if index.variants == 2 {
                let mirrored: Vec<f32> = batch
                    .inputs
                    .chunks_exact(resolution)
                    .flat_map(|row| row.iter().rev().copied())
                    .collect();
                let x = Tensor::from_vec(mirrored, (b, 3, resolution, resolution), device)?;
                variants.push((vae.encode)(&x)?);
            }
            let flat: Vec<Vec<Vec<f32>>> = variants
                .iter()
                .map(|(m, l)| {
                    Ok(vec![
                        m.flatten_all()?.to_vec1()?,
                        l.flatten_all()?.to_vec1()?,
                    ])
                })
                .collect::<Result<_>>()?;
            for k in 0..b {
                for v in &flat {
                    for t in v {
                        out.extend_from_slice(&t[k * per..(k + 1) * per]);
                    }
                }
            }
        }
        let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
        super::io::write_atomic(&shard_path(dir, s), |w| Ok(w.write_all(&bytes)?))?;
    }
    println!(
        "latents: encoded the {} split in {:.1} s",
        split.name,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
