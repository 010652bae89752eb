//! `sigdiff`: the toolkit's command line. Subcommands that need no compiled config live here:
//! validating configs, printing shape plans, and writing the synthetic demo dataset.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use signal_diffusion_config as config;
use signal_diffusion_config::choice::{self, Choice, OutputType};
use signal_diffusion_runtime::data::signal::meta::MetaOptions;
use signal_diffusion_runtime::data::signal::preprocess::PreprocessOptions;
use signal_diffusion_runtime::data::signal::synth::SynthOptions;
use signal_diffusion_runtime::train::sample::SampleOptions;

#[derive(Parser)]
#[command(
    name = "sigdiff",
    version,
    about = "EEG spectrogram datasets, classifiers and diffusion models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check training configs with the same diagnostics as the build (exit 1 on any error).
    Validate {
        /// Training config files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Check against a CUDA build's capabilities instead of a CPU build's.
        #[arg(long)]
        cuda: bool,
    },
    /// Print the shape plan of a config: layer shapes, parameters, FLOPs, memory.
    Plan { file: PathBuf },
    /// Turn raw recordings into the reference's spectrogram (or time-series) dataset.
    Preprocess(PreprocessArgs),
    /// Write the synthetic demo EEG dataset (clearly synthetic) as preprocessed spectrograms.
    Synth(SynthArgs),
    /// Merge preprocessed spectrogram datasets into the weighted meta-dataset (Parquet, in the
    /// Hugging Face `datasets` layout).
    MetaDataset(MetaArgs),
    /// Generate a labelled synthetic dataset (preprocessed layout) from a trained diffusion
    /// checkpoint.
    Sample(SampleArgs),
    /// Write a diffusion checkpoint's model in the layout of a run's final weights (diffusers'
    /// for a DiT or a UNet): a LoRA checkpoint's adapters, or with `--merge` the weights with
    /// them merged in.
    Export(ExportArgs),
    /// Encode a latent-space config's training and validation images once into its latent
    /// cache (its trainer does the same on first use, and reuses the cache after).
    CacheLatents { file: PathBuf },
}

#[derive(Debug, Clone, clap::Args)]
struct PreprocessArgs {
    /// Datasets to preprocess (names of `[datasets.*]` tables in the settings file; default:
    /// each of math, parkinsons, seed, longitudinal and mit whose raw directory exists).
    datasets: Vec<String>,
    /// Settings file (default: $SIGNAL_DIFFUSION_CONFIG, else config/default.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the settings' output type: db-only, db-iq or db-polar.
    #[arg(long, value_parser = choice_of::<OutputType>)]
    output_type: Option<OutputType>,
    /// Override the settings' `data.polar_layout` for db-polar: phase-cos-sin (dB, cos φ, sin φ;
    /// the configuration contract's) or magnitude-phase (the original implementation's).
    #[arg(long, value_parser = choice_of::<choice::PolarLayout>)]
    polar_layout: Option<choice::PolarLayout>,
    /// Write z-scored float32 time series instead of spectrograms.
    #[arg(long)]
    timeseries: bool,
    /// math: also use the arithmetic recordings (state 2).
    #[arg(long)]
    include_math_trials: bool,
    /// Recordings processed at once.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Delete the dataset's existing output first (otherwise existing files are kept and skipped).
    #[arg(long)]
    overwrite: bool,
    /// Seed of the subject split.
    #[arg(long, default_value_t = 205)]
    seed: u64,
}

#[derive(Debug, Clone, clap::Args)]
struct SynthArgs {
    /// Output directory: raw recordings go to `<out>/raw/parkinsons`, spectrograms to
    /// `<out>/stfts`.
    #[arg(long, default_value = "data/demo")]
    out: PathBuf,
    #[arg(long, default_value_t = 40)]
    subjects: usize,
    /// 2048-sample windows per subject (16.4 s each at 125 Hz, overlapping by half).
    #[arg(long, default_value_t = 16)]
    windows: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// dB window of the 8-bit mapping (the reference's `math` dataset bounds, which fit these
    /// signals).
    #[arg(long, default_value_t = -127.028, allow_hyphen_values = true)]
    min_db: f64,
    #[arg(long, default_value_t = -44.068, allow_hyphen_values = true)]
    max_db: f64,
    /// Replace an existing demo dataset at `<out>`.
    #[arg(long)]
    overwrite: bool,
    /// Recordings preprocessed at once.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
}

#[derive(Debug, Clone, clap::Args)]
struct MetaArgs {
    /// Datasets to merge, in order (names of `[datasets.*]` tables, preprocessed already).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "math,parkinsons,seed,longitudinal"
    )]
    datasets: Vec<String>,
    /// Settings file (default: $SIGNAL_DIFFUSION_CONFIG, else config/default.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output directory; relative paths are under the settings' output root
    /// (default: `reweighted_meta_dataset_log_n2048_fs125`).
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Splits to write.
    #[arg(long, value_delimiter = ',', default_value = "train,val,test")]
    copy_splits: Vec<String>,
    /// Cap on each weight (default: the settings' `max_sampling_weight`).
    #[arg(long)]
    max_sampling_weight: Option<f64>,
    /// Replace an existing output directory.
    #[arg(long)]
    overwrite: bool,
    /// Threads for re-encoding images.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
}

#[derive(Debug, Clone, clap::Args)]
struct ExportArgs {
    /// A checkpoint directory written by a diffusion trainer (it holds `sampling.json`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The directory to write.
    #[arg(long)]
    out: PathBuf,
    /// Export the checkpoint's EMA weights.
    #[arg(long)]
    ema: bool,
    /// Merge a LoRA checkpoint's adapters into the weights they adapt (diffusers'
    /// `from_pretrained` loads the result; the adapters are kept in `lora/`).
    #[arg(long)]
    merge: bool,
    /// Replace `--out` if it exists.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Debug, Clone, clap::Args)]
struct SampleArgs {
    /// A checkpoint directory written by a diffusion trainer (it holds `sampling.json`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Use the EMA weights of the checkpoint.
    #[arg(long)]
    ema: bool,
    /// Number of samples (default: one per `--like` row).
    #[arg(long)]
    n: Option<usize>,
    /// One condition for every sample, e.g. `gender=F,health=PD,age=63` or `class=3`; a part
    /// left out is unknown (sampled without it).
    #[arg(long, conflicts_with = "like")]
    condition: Option<String>,
    /// Take the conditions from the rows of this metadata CSV, in order, cycled to `--n`.
    #[arg(long)]
    like: Option<PathBuf>,
    /// One caption for every sample, for a caption-conditioned model (`--like` rows take the
    /// caption column instead).
    #[arg(long, conflicts_with_all = ["like", "condition"])]
    caption: Option<String>,
    /// The dataset directory to write.
    #[arg(long)]
    out: PathBuf,
    /// The split the samples belong to (file names and `{split}-metadata.csv`).
    #[arg(long, default_value = "train")]
    split: String,
    /// Denoising steps (default: the trained config's `denoising_steps`).
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale (default: the trained config's `cfg_scale`; 1 = no guidance).
    #[arg(long)]
    cfg_scale: Option<f64>,
    /// Sampler (default: the trained config's `inference.sampler`): euler or heun for a flow
    /// model, ddim for an epsilon/sample model, dpmpp_2m for either.
    #[arg(long, value_parser = choice_of::<choice::Sampler>)]
    sampler: Option<choice::Sampler>,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replace `--out` if it exists.
    #[arg(long)]
    overwrite: bool,
}

impl From<PreprocessArgs> for PreprocessOptions {
    fn from(a: PreprocessArgs) -> Self {
        PreprocessOptions {
            datasets: a.datasets,
            output_type: a.output_type,
            polar_layout: a.polar_layout,
            timeseries: a.timeseries,
            include_math_trials: a.include_math_trials,
            jobs: a.jobs,
            overwrite: a.overwrite,
            seed: a.seed,
        }
    }
}

impl From<SynthArgs> for SynthOptions {
    fn from(a: SynthArgs) -> Self {
        SynthOptions {
            out: a.out,
            subjects: a.subjects,
            windows: a.windows,
            seed: a.seed,
            min_db: a.min_db,
            max_db: a.max_db,
            overwrite: a.overwrite,
            jobs: a.jobs,
        }
    }
}

impl From<MetaArgs> for MetaOptions {
    fn from(a: MetaArgs) -> Self {
        MetaOptions {
            datasets: a.datasets,
            output_dir: a.output_dir,
            copy_splits: a.copy_splits,
            max_sampling_weight: a.max_sampling_weight,
            overwrite: a.overwrite,
            jobs: a.jobs,
        }
    }
}

impl From<SampleArgs> for SampleOptions {
    fn from(a: SampleArgs) -> Self {
        SampleOptions {
            checkpoint: a.checkpoint,
            ema: a.ema,
            n: a.n,
            condition: a.condition,
            like: a.like,
            caption: a.caption,
            out: a.out,
            split: a.split,
            steps: a.steps,
            cfg_scale: a.cfg_scale,
            sampler: a.sampler,
            batch_size: a.batch_size,
            seed: a.seed,
            overwrite: a.overwrite,
        }
    }
}

/// A closed-set value spelt as in TOML.
fn choice_of<C: Choice>(text: &str) -> Result<C, String> {
    choice::from_toml(text)
        .ok_or_else(|| format!("expected one of: {}", choice::names(C::ALL).join(", ")))
}

fn env() -> config::settings::Env {
    config::settings::Env::from_process(std::env::current_dir().unwrap_or_default())
}

/// The settings file chain, or its diagnostic printed.
fn settings(file: Option<&std::path::Path>) -> Option<config::settings::Settings> {
    config::load_settings(file, &env())
        .map_err(|e| eprintln!("{}", config::render(&e)))
        .ok()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = signal_diffusion_runtime::ops::cpu::check_max_cpu_isa() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    match cli.command {
        Command::Validate { files, cuda } => {
            let mut failed = 0;
            for f in &files {
                // Validate everything first; what this build cannot train yet is a note, not an
                // error: the config itself is right, and `cargo build` says the same thing.
                match config::plan_unchecked(f, &env()) {
                    Err(e) => {
                        failed += 1;
                        eprintln!("{}\n", config::render(&e));
                    }
                    Ok(r) => {
                        for w in &r.warnings {
                            eprintln!("{w}\n");
                        }
                        match config::resolve(f, &env(), config::Target { cuda }) {
                            Ok(_) => println!("{}: ok", f.display()),
                            Err(gate) => println!(
                                "{}: valid; building a trainer from it stops with:\n{}",
                                f.display(),
                                config::render(&gate)
                            ),
                        }
                    }
                }
            }
            if failed > 0 {
                eprintln!("{failed} of {} config(s) failed", files.len());
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Plan { file } => match config::plan_unchecked(&file, &env()) {
            Ok(r) => match &r.plan {
                Some(p) => {
                    print!("{}", p.render());
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("{}: no shape plan for this model yet", file.display());
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("{}", config::render(&e));
                ExitCode::FAILURE
            }
        },
        Command::Preprocess(args) => {
            let Some(settings) = settings(args.config.as_deref()) else {
                return ExitCode::FAILURE;
            };
            match signal_diffusion_runtime::data::signal::preprocess::run(&args.into(), &settings) {
                Ok(summary) if summary.skipped.is_empty() => ExitCode::SUCCESS,
                Ok(summary) => {
                    eprintln!(
                        "{} recording(s) skipped (listed above)",
                        summary.skipped.len()
                    );
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::MetaDataset(args) => {
            let Some(settings) = settings(args.config.as_deref()) else {
                return ExitCode::FAILURE;
            };
            let args = MetaOptions::from(args);
            match signal_diffusion_runtime::data::signal::meta::run(&args, &settings) {
                Ok(summary) => {
                    for (split, counts) in &summary.splits {
                        let parts: Vec<String> = args
                            .datasets
                            .iter()
                            .zip(counts)
                            .map(|(n, (o, g))| format!("{n} {o} -> {g}"))
                            .collect();
                        println!("{split}: {}", parts.join(", "));
                    }
                    println!("wrote {}", summary.output.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Synth(args) => report(signal_diffusion_runtime::data::signal::synth::run(
            &args.into(),
        )),
        Command::Sample(args) => report(signal_diffusion_runtime::train::sample::run(&args.into())),
        Command::Export(a) => report(signal_diffusion_runtime::train::export::export(
            &a.checkpoint,
            &a.out,
            a.ema,
            a.merge,
            a.overwrite,
        )),
        Command::CacheLatents { file } => match config::plan_unchecked(&file, &env()) {
            Err(e) => {
                eprintln!("{}", config::render(&e));
                ExitCode::FAILURE
            }
            Ok(r) => match &r.config.kind {
                config::Kind::Diffusion(d) => {
                    report(signal_diffusion_runtime::train::diffusion::cache_latents(d))
                }
                config::Kind::Classification(_) => {
                    eprintln!(
                        "error: {}: a classification config has no latents",
                        file.display()
                    );
                    ExitCode::FAILURE
                }
            },
        },
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
