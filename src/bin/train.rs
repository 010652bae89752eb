//! `train`: the trainer compiled from `SD_CONFIG` (default: the classification quickstart).
//! build.rs writes the generated items to `$OUT_DIR/pipeline.rs`; this file only parses flags.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, chosen for the compiled model (`allocator_conf` in
/// config/src/codegen.rs says why). The process keeps what it maps until it exits.
#[cfg(all(unix, not(target_env = "musl")))]
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8] = pipeline::ALLOCATOR_CONF;

mod pipeline {
    include!(concat!(env!("OUT_DIR"), "/pipeline.rs"));
}

#[derive(Parser)]
#[command(
    name = "train",
    version,
    about = "Train the model this binary was compiled for (see --print-config)"
)]
struct Args {
    /// Print the resolved config (JSON) this trainer was compiled from, then exit.
    #[arg(long)]
    print_config: bool,
    /// Print the shape plan: layer shapes, parameter counts, FLOPs, memory estimate.
    #[arg(long)]
    plan: bool,
    /// Override a non-structural key, e.g. `--set optimizer.learning_rate=1e-3`. Structural keys
    /// (shapes, model, tasks, batch size...) are refused: change the TOML and rebuild.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Where run directories go (default: training.output_dir, else runs/classification).
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Continue from a checkpoint directory (`<run>/checkpoints/<name>`).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Time N optimizer steps of this model on random data already on the device (after 3
    /// warm-up steps): steps/s, samples/s, FLOP/s. No dataset, run directory or checkpoint.
    #[arg(long, value_name = "N")]
    benchmark: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = signal_diffusion_runtime::ops::cpu::check_max_cpu_isa() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let mut sets = vec![];
    for s in &args.sets {
        match s.split_once('=') {
            Some((k, v)) => sets.push((k.trim().to_string(), v.to_string())),
            None => {
                eprintln!(
                    "error: `--set {s}` needs the form key=value, e.g. --set training.epochs=3"
                );
                return ExitCode::FAILURE;
            }
        }
    }
    pipeline::run(signal_diffusion_runtime::train::RunOptions {
        print_config: args.print_config,
        plan: args.plan,
        sets,
        output_dir: args.output_dir,
        resume: args.resume,
        benchmark: args.benchmark,
    })
}
