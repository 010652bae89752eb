//! `sigdiff`: the toolkit's command line. Subcommands that need no compiled config live here:
//! validating configs, printing shape plans, and writing the synthetic demo dataset.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use signal_diffusion_config as config;

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
    Preprocess(signal_diffusion_runtime::data::signal::preprocess::PreprocessArgs),
    /// Write the synthetic demo EEG dataset (clearly synthetic) as preprocessed spectrograms.
    Synth(signal_diffusion_runtime::data::signal::synth::SynthArgs),
    /// Merge preprocessed spectrogram datasets into the weighted meta-dataset (Parquet, in the
    /// Hugging Face `datasets` layout).
    MetaDataset(signal_diffusion_runtime::data::signal::meta::MetaArgs),
    /// Generate a labelled synthetic dataset (preprocessed layout) from a trained DiT checkpoint.
    Sample(signal_diffusion_runtime::train::sample::SampleArgs),
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
            match signal_diffusion_runtime::data::signal::preprocess::run(&args, &settings) {
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
        Command::Synth(args) => report(signal_diffusion_runtime::data::signal::synth::run(&args)),
        Command::Sample(args) => report(signal_diffusion_runtime::train::sample::run(&args)),
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
