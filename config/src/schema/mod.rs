//! The training configs: every key of `spec/configuration.md` with its documented default, the
//! keys the reference's shipped configs use beyond it, and every rule that relates two keys.
//!
//! Defaults follow the reference's loader where it and the documentation disagree (listed in
//! `docs/config.md`). Keys the reference silently ignores (`flow_match_timesteps`,
//! `ema_use_warmup`, `eval_gen_seed`) are accepted with a warning; every other unknown key is an
//! error.
//!
//! One file per trainer kind (`classification`, `diffusion`), each with its sections' structs
//! and its reader; the sections both kinds share (optimizer, scheduler, data overrides) are here.

mod classification;
mod diffusion;
mod diffusion_rules;
mod extras;
mod skeleton;

pub use classification::*;
pub use diffusion::*;

use serde::Serialize;

use crate::choice::{
    Choice, CompileMode, DataType, LrSchedule, OptimizerName, OutputType, PolarLayout,
};
use crate::literal::literal;
use crate::settings::Settings;
use crate::tree::{Ctx, Section};

// ------------------------------------------------------------------------------------------
// Shared sections

literal! {
    #[derive(Debug, Clone, Serialize)]
    pub struct Optimizer {
        pub name: OptimizerName,
        pub learning_rate: f64,
        pub weight_decay: f64,
        pub betas: [f64; 2],
        pub eps: f64,
        /// SGD momentum (the reference hard-codes 0.9).
        pub momentum: f64,
    }
}

literal! {
    #[derive(Debug, Clone, Serialize)]
    pub struct Scheduler {
        pub name: LrSchedule,
        pub warmup_steps: usize,
        pub min_lr_ratio: f64,
        pub num_cycles: f64,
        /// Polynomial decay power (diffusers' default 1.0).
        pub power: f64,
    }
}

pub(crate) fn read_optimizer(
    root: &Section,
    ctx: &mut Ctx,
    names: &[OptimizerName],
    lr: f64,
    wd: f64,
) -> Optimizer {
    let s = root.section(ctx, "optimizer");
    let name = s.pick(ctx, "name", OptimizerName::AdamW, names);
    let learning_rate = s.float(ctx, "learning_rate").unwrap_or(lr);
    if learning_rate <= 0.0 {
        ctx.error(
            "optimizer.learning_rate",
            format!("`optimizer.learning_rate` = {learning_rate} must be positive"),
        );
    }
    let weight_decay = s.float_in(ctx, "weight_decay", wd, 0.0, 1.0);
    let betas = match s.float_list(ctx, "betas") {
        None => [0.9, 0.999],
        Some(b) if b.len() == 2 && b.iter().all(|x| (0.0..1.0).contains(x)) => [b[0], b[1]],
        Some(b) => {
            ctx.error(
                "optimizer.betas",
                format!("`optimizer.betas` must be two numbers in [0, 1), found {b:?}"),
            )
            .help = Some("for example `betas = [0.9, 0.999]`".into());
            [0.9, 0.999]
        }
    };
    let eps = s.float(ctx, "eps").unwrap_or(1e-8);
    if eps <= 0.0 {
        ctx.error("optimizer.eps", "`optimizer.eps` must be positive");
    }
    let momentum = s.float_in(ctx, "momentum", 0.9, 0.0, 1.0);
    if s.has("momentum") && name != OptimizerName::Sgd {
        ctx.error(
            "optimizer.momentum",
            format!("`optimizer.momentum` applies to sgd only, but `optimizer.name` = \"{name}\""),
        );
    }
    s.finish(ctx, &[]);
    Optimizer {
        name,
        learning_rate,
        weight_decay,
        betas,
        eps,
        momentum,
    }
}

pub(crate) fn read_scheduler(root: &Section, ctx: &mut Ctx, names: &[LrSchedule]) -> Scheduler {
    let s = root.section(ctx, "scheduler");
    let name = s.pick(ctx, "name", LrSchedule::Constant, names);
    let warmup_steps = s.count(ctx, "warmup_steps", 0, 0);
    // The classification reference puts extra arguments under [scheduler.kwargs]; accept them
    // there and at the top level of [scheduler].
    let kw = s.section(ctx, "kwargs");
    let pick = |ctx: &mut Ctx, key: &str, default: f64, lo: f64, hi: f64| -> f64 {
        if kw.has(key) {
            kw.float_in(ctx, key, default, lo, hi)
        } else {
            s.float_in(ctx, key, default, lo, hi)
        }
    };
    let min_lr_ratio = pick(ctx, "min_lr_ratio", 0.0, 0.0, 1.0);
    let num_cycles = pick(ctx, "num_cycles", 0.5, 0.0, 1000.0);
    let power = pick(ctx, "power", 1.0, 0.0, 100.0);
    for (key, applies) in [
        (
            "min_lr_ratio",
            matches!(
                name,
                LrSchedule::Linear | LrSchedule::Cosine | LrSchedule::Polynomial
            ),
        ),
        ("num_cycles", name == LrSchedule::Cosine),
        ("power", name == LrSchedule::Polynomial),
    ] {
        if !applies && (kw.has(key) || s.has(key)) {
            let path = if kw.has(key) {
                format!("scheduler.kwargs.{key}")
            } else {
                format!("scheduler.{key}")
            };
            ctx.error(
                &path,
                format!("`{path}` has no effect with `scheduler.name` = \"{name}\""),
            )
            .help = Some("remove it, or pick a scheduler that uses it".into());
        }
    }
    kw.finish(ctx, &[]);
    s.finish(ctx, &[]);
    Scheduler {
        name,
        warmup_steps,
        min_lr_ratio,
        num_cycles,
        power,
    }
}

/// What the data is: the settings' `[data]` keys with the training config's `[data]` overrides.
#[derive(Debug, Clone, Copy)]
pub struct Data {
    pub output_type: OutputType,
    pub data_type: DataType,
    pub polar_layout: PolarLayout,
}

/// The `[data]` overrides of a training config.
pub(crate) fn read_data_overrides(root: &Section, ctx: &mut Ctx, settings: &Settings) -> Data {
    let d = root.section(ctx, "data");
    let output_type = d.pick(ctx, "output_type", settings.output_type, OutputType::ALL);
    let data_type = d.pick(ctx, "data_type", settings.data_type, DataType::ALL);
    let polar_layout = d.pick(ctx, "polar_layout", settings.polar_layout, PolarLayout::ALL);
    if d.has("polar_layout")
        && (output_type != OutputType::DbPolar || data_type != DataType::Spectrogram)
    {
        ctx.warn(
            "data.polar_layout",
            format!("`data.polar_layout` has no effect: only db-polar spectrograms have a polar layout (this config trains on {output_type} {data_type})"),
        );
    }
    d.finish(ctx, &[]);
    Data {
        output_type,
        data_type,
        polar_layout,
    }
}

/// `training.compile_model` / `compile_mode` (torch.compile in the reference) are read so that
/// the reference's configs build, with a warning where they are written: they change nothing.
pub(crate) fn read_compile_keys(
    t: &Section,
    ctx: &mut Ctx,
    compile_model_default: bool,
) -> (bool, CompileMode) {
    let compile_model = t.bool_or(ctx, "compile_model", compile_model_default);
    let compile_mode = t.pick(ctx, "compile_mode", CompileMode::Default, CompileMode::ALL);
    for key in ["compile_model", "compile_mode"] {
        if t.has(key) {
            ctx.warn(
                &format!("training.{key}"),
                format!("`training.{key}` has no effect: the build already compiles this config into a trainer specialised to it"),
            )
            .help = Some("remove it (torch.compile has no counterpart to switch here)".into());
        }
    }
    (compile_model, compile_mode)
}

/// Where `dataset.name` points: a `[datasets.*]` entry of the settings (its preprocessed
/// spectrograms, or its time series for `data.data_type = "timeseries"`), else a directory
/// (relative to where the trainer runs). Returns (the directory, the entry's name if it is one).
pub(crate) fn dataset_dir(
    settings: &Settings,
    name: &str,
    data_type: DataType,
) -> (std::path::PathBuf, Option<String>) {
    match settings.datasets.get(name) {
        Some(ds) => {
            let dir = match data_type {
                DataType::Timeseries => ds.timeseries_output.clone(),
                DataType::Spectrogram => ds.output.clone(),
            };
            (dir, Some(name.to_string()))
        }
        None => (std::path::PathBuf::from(name), None),
    }
}
