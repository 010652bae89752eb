//! `sigdiff sample`: a labelled synthetic dataset from a trained diffusion model (decoded by its
//! VAE in latent space), in the preprocessed-dataset
//! layout (`{split}/synthetic/sample-NNNNN.png`, or `.npy` of (EEG channels, samples) float32
//! for a time-series model, and `{split}-metadata.csv`), so a classifier can train on real and
//! synthetic data together.
//!
//! The checkpoint directory is any the trainer writes (`checkpoints/<name>`, `best_eval/<name>`,
//! `final`, `final/ema`): its `sampling.json` rebuilds the model shape and sampler. Conditions
//! come from `--condition` (one for all samples) or `--like` (the rows of a metadata CSV, in
//! order, cycled). The dataset is written to a sibling temporary directory and renamed into
//! place, so an interrupted run leaves nothing half-written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use signal_diffusion_config::choice::{self, OutputType};

use crate::data::image::to_pixels;
use crate::diffusion::denoiser::Denoiser;
use crate::diffusion::path::normals;
use crate::diffusion::sampler::{conditions, SampleSpec};
use crate::models::dit::{Condition, Conditioning};
use crate::models::nn::Params;
use crate::tasks::{encode, TaskKind, TaskSpec};
use crate::train::checkpoint::restore;

#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// A checkpoint directory written by a diffusion trainer (it holds `sampling.json`).
    pub checkpoint: PathBuf,
    /// Use the EMA weights of the checkpoint.
    pub ema: bool,
    /// Number of samples (default: one per `--like` row).
    pub n: Option<usize>,
    /// One condition for every sample, e.g. `gender=F,health=PD,age=63` or `class=3`; a part
    /// left out is unknown (sampled without it).
    pub condition: Option<String>,
    /// Take the conditions from the rows of this metadata CSV, in order, cycled to `--n`.
    pub like: Option<PathBuf>,
    /// One caption for every sample (a caption-conditioned model).
    pub caption: Option<String>,
    /// The dataset directory to write.
    pub out: PathBuf,
    /// The split the samples belong to (file names and `{split}-metadata.csv`).
    pub split: String,
    /// Denoising steps (default: the trained config's `denoising_steps`).
    pub steps: Option<usize>,
    /// Guidance scale (default: the trained config's `cfg_scale`; 1 = no guidance).
    pub cfg_scale: Option<f64>,
    /// Sampler (default: the trained config's).
    pub sampler: Option<choice::Sampler>,
    pub batch_size: usize,
    pub seed: u64,
    /// Replace `--out` if it exists.
    pub overwrite: bool,
}

impl SampleOptions {
    /// Samples of `checkpoint` into `out` as `sigdiff sample` draws them by default: one per
    /// `--like` row (none given: set `n` and `condition` or `like`), the `train` split, the
    /// trained config's steps, guidance and sampler, the live weights, batches of 16, seed 0.
    pub fn new(checkpoint: PathBuf, out: PathBuf) -> Self {
        SampleOptions {
            checkpoint,
            ema: false,
            n: None,
            condition: None,
            like: None,
            caption: None,
            out,
            split: "train".into(),
            steps: None,
            cfg_scale: None,
            sampler: None,
            batch_size: 16,
            seed: 0,
            overwrite: false,
        }
    }
}

/// How each conditioning column is encoded: (name, encoder).
fn column_encoders(c: Conditioning) -> &'static [(&'static str, &'static str)] {
    match c {
        Conditioning::None => &[],
        Conditioning::Classes { .. } => &[("class", "int")],
        Conditioning::GenderHealthAge => &[
            ("gender", "gender?"),
            ("health", "health?"),
            ("age", "float?"),
        ],
        Conditioning::Caption { .. } => &[("caption", "caption")],
    }
}

/// Caption conditions of `rows` (each one caption): labels (k + 1 for the k-th distinct caption,
/// 0 for an empty one: the null caption) and the distinct captions' embeddings by the training's
/// text encoders: pooled, or for a UNet its text states, for an MMDiT its two encoders' states
/// and pooled vectors (and the empty caption's, set as the model's null caption).
fn caption_conditions(
    rows: &[Vec<String>],
    spec: &SampleSpec,
    model: &mut Denoiser,
    device: &Device,
) -> Result<(Vec<u32>, std::sync::Arc<Vec<f32>>)> {
    let cfg = spec
        .text_encoder
        .as_ref()
        .context("sampling.json names no text encoder for this caption model")?;
    let mut texts = crate::data::loader::TextTable::default();
    let labels = rows
        .iter()
        .map(|r| texts.id(&r[0]).map_or(0, |k| k as u32 + 1))
        .collect();
    let encoder = spec
        .shape
        .caption_encoder((cfg, spec.text_encoder_2.as_ref()), device)?;
    if model.needs_null_caption() {
        model.set_null_caption(&encoder.rows(&[String::new()])?, device)?;
    }
    let embeddings = encoder.rows(&texts.texts)?;
    Ok((labels, std::sync::Arc::new(embeddings)))
}

/// One sample's condition from the raw texts of its columns (in `column_encoders` order).
fn encode_condition(c: Conditioning, raw: &[String]) -> Result<(u32, f32), String> {
    let outputs = match c {
        Conditioning::Classes { num_classes } => num_classes,
        _ => 2,
    };
    let values: Vec<f32> = column_encoders(c)
        .iter()
        .zip(raw)
        .map(|((name, encoder), v)| {
            let spec = TaskSpec {
                name,
                kind: TaskKind::Classification,
                outputs,
                column: name,
                encoder,
            };
            encode(&spec, v)
        })
        .collect::<Result<_, _>>()?;
    let one = conditions(
        c,
        &values.iter().map(|v| vec![*v]).collect::<Vec<_>>(),
        &[0],
    );
    Ok((one.labels[0], one.ages[0]))
}

/// The raw condition texts for each of `n` samples.
fn condition_rows(
    args: &SampleOptions,
    spec: &SampleSpec,
    c: Conditioning,
) -> Result<Vec<Vec<String>>> {
    let cols = column_encoders(c);
    if args.like.is_some() && args.condition.is_some() {
        bail!("give the conditions either as `condition` or as `like` rows, not both");
    }
    let captioned = matches!(c, Conditioning::Caption { .. });
    match (&args.caption, captioned) {
        (Some(_), false) => bail!("this model is not conditioned on captions: drop `--caption`"),
        (Some(_), true) if args.like.is_some() => {
            bail!("give the captions either as `caption` or as `like` rows, not both")
        }
        (Some(caption), true) => {
            let n = args.n.context("give `--n N` with `--caption`")?;
            return Ok(vec![vec![caption.clone()]; n]);
        }
        (None, _) => {}
    }
    if let Some(path) = &args.like {
        let names: Vec<&str> = spec.columns.iter().map(String::as_str).collect();
        let rows = match read_like(path, &names) {
            // Metadata without captions: the reference's captions of its subjects.
            Err(_) if captioned => read_like(path, &SUBJECT)?
                .iter()
                .map(|r| Ok(vec![reference_caption(r)?]))
                .collect::<Result<_>>()?,
            rows => rows?,
        };
        let n = args.n.unwrap_or(rows.len());
        return Ok((0..n).map(|i| rows[i % rows.len()].clone()).collect());
    }
    if let (Some(text), true) = (&args.condition, captioned) {
        let n = args.n.context("give `--n N` with `--condition`")?;
        let mut subject = vec![String::new(); SUBJECT.len()];
        for part in text.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .with_context(|| format!("`--condition {text}`: `{part}` is not key=value"))?;
            let pos = SUBJECT.iter().position(|c| *c == k.trim()).with_context(|| {
                format!("`--condition`: unknown key `{}` (a caption model takes gender, health and age, written into the reference's caption, or `--caption TEXT`)", k.trim())
            })?;
            subject[pos] = v.trim().to_string();
        }
        return Ok(vec![vec![reference_caption(&subject)?]; n]);
    }
    let n = args
        .n
        .context("give `--n N` (or `--like METADATA.csv` to take one sample per row)")?;
    let mut one = vec![String::new(); cols.len()];
    if let Some(text) = &args.condition {
        if cols.is_empty() {
            bail!("this model is unconditional (`conditioning = \"none\"`): drop `--condition`");
        }
        for part in text.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .with_context(|| format!("`--condition {text}`: `{part}` is not key=value"))?;
            let pos = cols
                .iter()
                .position(|(name, _)| *name == k.trim())
                .with_context(|| {
                    let names: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
                    format!(
                        "`--condition`: unknown key `{}` (this model is conditioned on {})",
                        k.trim(),
                        names.join(", ")
                    )
                })?;
            one[pos] = v.trim().to_string();
        }
    }
    Ok(vec![one; n])
}

/// The metadata columns the reference builds its captions from.
const SUBJECT: [&str; 3] = ["gender", "health", "age"];

/// The rows of `path` (a metadata CSV), each the values of `columns` in order.
fn read_like(path: &Path, columns: &[&str]) -> Result<Vec<Vec<String>>> {
    let mut rdr =
        csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let headers = rdr.headers()?.clone();
    let idx: Vec<usize> = columns
        .iter()
        .map(|name| {
            headers.iter().position(|h| h == *name).with_context(|| {
                format!(
                    "{}: no `{name}` column (the model is conditioned on {})",
                    path.display(),
                    columns.join(", ")
                )
            })
        })
        .collect::<Result<_>>()?;
    let rows: Vec<Vec<String>> = rdr
        .records()
        .map(|r| r.map(|r| idx.iter().map(|&i| r[i].to_string()).collect()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot read {}", path.display()))?;
    if rows.is_empty() {
        bail!("{}: no rows to take conditions from", path.display());
    }
    Ok(rows)
}

/// The reference's caption of a subject (gender, health, age as the metadata writes them; an
/// empty one left out), as the meta-dataset captions its images.
fn reference_caption(subject: &[String]) -> Result<String> {
    let gender = match subject[0].trim().to_uppercase().as_str() {
        "" => None,
        "F" | "FEMALE" | "W" | "WOMAN" => Some("F"),
        "M" | "MALE" | "MAN" => Some("M"),
        other => bail!("gender `{other}` is neither M/male nor F/female"),
    };
    let health = match subject[1].trim().to_uppercase().as_str() {
        "" => "",
        "H" | "HEALTHY" | "HC" | "CONTROL" => "H",
        "PD" | "PARKINSONS" => "PD",
        "EP" | "EPILEPSY" => "EP",
        other => bail!("health `{other}` is not H, PD or EP"),
    };
    let age = match subject[2].trim() {
        "" => None,
        a => Some(
            a.parse::<f64>()
                .map_err(|_| anyhow::anyhow!("age `{a}` is not a number"))?
                .round() as i64,
        ),
    };
    Ok(crate::data::signal::meta::caption(age, health, gender))
}

/// Load the weights of `dir` (raw or EMA) into `vars`.
fn load_weights(
    dir: &Path,
    ema: bool,
    weights_file: &str,
    vars: &[(String, Var)],
    device: &Device,
) -> Result<()> {
    // A checkpoint's files, or the final export's.
    let candidates = match ema {
        true => ["ema.safetensors".to_string(), format!("ema/{weights_file}")],
        false => ["model.safetensors".to_string(), weights_file.to_string()],
    };
    let file = candidates
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists())
        .with_context(|| match ema {
            true => format!(
                "{}: no EMA weights (was EMA off, `ema_decay = 0`?); drop `--ema`",
                dir.display()
            ),
            false => format!("{}: no model.safetensors or {weights_file}", dir.display()),
        })?;
    let saved: HashMap<String, Tensor> = candle_core::safetensors::load(&file, device)
        .with_context(|| format!("cannot read {}", file.display()))?;
    restore(vars, &saved).with_context(|| {
        format!(
            "{}: not the weights of the model in sampling.json",
            file.display()
        )
    })
}

/// Write one sample's pixels (C, H, W) as a PNG: grey for db-only data (the model's 3 channels
/// are copies of it, averaged), else interleaved channels.
fn write_image(
    path: &Path,
    sample: &[u8],
    (ch, h, w): (usize, usize, usize),
    grey: bool,
) -> Result<()> {
    let (pixels, channels): (Vec<u8>, usize) = if grey {
        let v = (0..h * w)
            .map(|p| {
                ((0..ch).map(|c| sample[c * h * w + p] as u32).sum::<u32>() as f32 / ch as f32)
                    .round() as u8
            })
            .collect();
        (v, 1)
    } else {
        (
            (0..h * w)
                .flat_map(|p| (0..ch).map(move |c| sample[c * h * w + p]))
                .collect(),
            ch,
        )
    };
    crate::data::io::write_png(path, &pixels, channels, h, w)
}

/// A diffusion checkpoint (or final export) as written: its `sampling.json` and the parameters
/// of its model with its weights (the EMA's with `ema`), a LoRA run's over the pretrained
/// weights they adapt.
pub(crate) fn load_checkpoint(
    checkpoint: &Path,
    ema: bool,
    device: &Device,
) -> Result<(SampleSpec, Params)> {
    let spec_path = checkpoint.join("sampling.json");
    let spec: SampleSpec =
        serde_json::from_str(&std::fs::read_to_string(&spec_path).with_context(|| {
            format!(
                "cannot read {} (is {} a diffusion checkpoint?)",
                spec_path.display(),
                checkpoint.display()
            )
        })?)
        .with_context(|| format!("{}: not a sampling spec", spec_path.display()))?;
    let shape = &spec.shape;
    // A LoRA run's checkpoint holds what trained: the weights it adapted come first.
    let mut params = match &spec.lora {
        Some(lora) => Params::with_lora(0, device, lora.spec.clone()),
        None => Params::new(0, device),
    };
    Denoiser::new(shape, &mut params, device)?;
    if let Some(lora) = &spec.lora {
        super::export::load_pretrained(&lora.pretrained, shape, &params, device)?;
    }
    let vars: Vec<(String, Var)> = params
        .trainable
        .iter()
        .chain(&params.buffers)
        .cloned()
        .collect();
    load_weights(checkpoint, ema, shape.weights_file(), &vars, device)?;
    Ok((spec, params))
}

pub fn run(args: &SampleOptions) -> Result<()> {
    if args.out.exists() && !args.overwrite {
        bail!(
            "{} exists; pass `--overwrite` to replace it",
            args.out.display()
        );
    }
    let device = Device::Cpu;
    let (spec, params) = load_checkpoint(&args.checkpoint, args.ema, &device)?;
    let shape = &spec.shape;
    let c = shape.conditioning();
    // Sampled by a detached twin on the same storage: no autograd graph.
    let mut model = Denoiser::new(shape, &mut Params::sharing(&params), &device)?;
    let rows = condition_rows(args, &spec, c)?;
    let (conds, texts): (Vec<(u32, f32)>, _) = match c {
        Conditioning::Caption { .. } => {
            let (labels, texts) = caption_conditions(&rows, &spec, &mut model, &device)?;
            (
                labels.into_iter().map(|l| (l, f32::NAN)).collect(),
                Some(texts),
            )
        }
        _ => (
            rows.iter()
                .enumerate()
                .map(|(i, r)| {
                    encode_condition(c, r)
                        .map_err(|e| anyhow::anyhow!("condition of sample {i}: {e}"))
                })
                .collect::<Result<_>>()?,
            None,
        ),
    };
    let sampler = spec.sampler(
        args.sampler.unwrap_or(spec.sampler),
        args.steps.unwrap_or(spec.denoising_steps),
        args.cfg_scale.unwrap_or(spec.cfg_scale),
    )?;

    let tmp = crate::data::io::temp_path_for(&args.out)?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let images = tmp.join(&args.split).join("synthetic");
    std::fs::create_dir_all(&images)
        .with_context(|| format!("cannot create {}", images.display()))?;
    let grey = spec.output_type == OutputType::DbOnly;
    // Latent space: samples are drawn at the latent shape and decoded by the training's VAE.
    let vae = spec
        .vae
        .as_ref()
        .map(|v| crate::models::vae::Vae::load(v, spec.vae_tiling, &device))
        .transpose()?;
    let (lc, lh, lw) = shape.input();
    let (ch, h, w) = match &vae {
        Some(v) => {
            let down = v.config.downscale();
            (v.config.out_channels, lh * down, lw * down)
        }
        None => (lc, lh, lw),
    };
    let bar = indicatif::ProgressBar::new(rows.len() as u64);
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut csv = csv::Writer::from_writer(vec![]);
    let mut header = vec!["file_name".to_string(), "split".to_string()];
    header.extend(spec.columns.iter().cloned());
    csv.write_record(&header)?;
    for start in (0..rows.len()).step_by(args.batch_size.max(1)) {
        let b = args.batch_size.max(1).min(rows.len() - start);
        let cond = Condition {
            labels: conds[start..start + b].iter().map(|c| c.0).collect(),
            ages: conds[start..start + b].iter().map(|c| c.1).collect(),
            texts: texts.clone(),
        };
        let noise = Tensor::from_vec(
            normals(&mut rng, b * lc * lh * lw),
            (b, lc, lh, lw),
            &device,
        )?;
        let mut x = sampler.sample(&model, noise, &cond, c, &mut rng, |_, _| {})?;
        if let Some(vae) = &vae {
            x = vae.decode(&vae.from_model(&x)?)?;
        }
        let values = x.flatten_all()?.to_vec1::<f32>()?;
        let px = match spec.timeseries {
            true => vec![],
            false => to_pixels(&values, 1.0),
        };
        for k in 0..b {
            let i = start + k;
            let rel = if spec.timeseries {
                // As the preprocessing writes them: (EEG channels, samples), float32.
                let rel = format!("{}/synthetic/sample-{i:05}.npy", args.split);
                let signal = &values[k * h * w..(k + 1) * h * w];
                crate::data::io::write_npy_f32(&tmp.join(&rel), &[h, w], signal)?;
                rel
            } else {
                let rel = format!("{}/synthetic/sample-{i:05}.png", args.split);
                write_image(
                    &tmp.join(&rel),
                    &px[k * ch * h * w..(k + 1) * ch * h * w],
                    (ch, h, w),
                    grey,
                )?;
                rel
            };
            let mut record = vec![rel, args.split.clone()];
            record.extend(rows[i].iter().cloned());
            csv.write_record(&record)?;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let csv = csv.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::write(tmp.join(format!("{}-metadata.csv", args.split)), &csv)?;
    std::fs::write(tmp.join("metadata.csv"), &csv)?;
    if !spec.timeseries {
        // The samples are images of the kind the model learned: a trainer reading them checks.
        let layout = crate::data::layout::Layout::new(
            spec.output_type,
            spec.polar_layout
                .unwrap_or(choice::PolarLayout::PhaseCosSin),
        );
        crate::data::layout::write(&tmp, &layout)?;
    }
    if args.out.exists() {
        std::fs::remove_dir_all(&args.out)
            .with_context(|| format!("cannot replace {}", args.out.display()))?;
    }
    std::fs::rename(&tmp, &args.out)
        .with_context(|| format!("cannot move the samples into {}", args.out.display()))?;
    println!("wrote {} samples to {}", rows.len(), args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::reference_caption;

    #[test]
    fn subjects_are_captioned_as_the_reference_captions_them() {
        let caption =
            |g: &str, h: &str, a: &str| reference_caption(&[g.into(), h.into(), a.into()]).unwrap();
        assert_eq!(
            caption("F", "healthy", "63.4"),
            "a spectrogram image of a 63 year old, healthy, female subject"
        );
        assert_eq!(
            caption("male", "PD", ""),
            "a spectrogram image of a male subject with Parkinson's disease"
        );
        assert_eq!(caption("", "", ""), "a spectrogram image of a subject");
        assert!(reference_caption(&["X".into(), "".into(), "".into()]).is_err());
    }
}
