//! The training configs: every key of `spec/configuration.md` with its documented default, the
//! keys the reference's shipped configs use beyond it, and every rule that relates two keys.
//!
//! Defaults follow the reference's loader where it and the documentation disagree (listed in
//! `docs/config.md`). Keys the reference silently ignores (`flow_match_timesteps`,
//! `ema_use_warmup`, `eval_gen_seed`) are accepted with a warning; every other unknown key is an
//! error.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::settings::{Settings, DATA_TYPES, OUTPUT_TYPES};
use crate::tree::{Ctx, Section};

// ------------------------------------------------------------------------------------------
// Shared sections

#[derive(Debug, Clone, Serialize)]
pub struct Optimizer {
    pub name: String,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// SGD momentum (the reference hard-codes 0.9).
    pub momentum: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Scheduler {
    pub name: String,
    pub warmup_steps: usize,
    pub min_lr_ratio: f64,
    pub num_cycles: f64,
    /// Polynomial decay power (diffusers' default 1.0).
    pub power: f64,
}

fn read_optimizer(root: &Section, ctx: &mut Ctx, names: &[&str], lr: f64, wd: f64) -> Optimizer {
    let s = root.section(ctx, "optimizer");
    let name = s.choice(ctx, "name", "adamw", names);
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
    if s.has("momentum") && name != "sgd" {
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

fn read_scheduler(root: &Section, ctx: &mut Ctx, names: &[&str]) -> Scheduler {
    let s = root.section(ctx, "scheduler");
    let name = s.choice(ctx, "name", "constant", names);
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
            ["linear", "cosine", "polynomial"].contains(&name.as_str()),
        ),
        ("num_cycles", name == "cosine"),
        ("power", name == "polynomial"),
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

/// The `[data]` overrides of a training config.
fn read_data_overrides(root: &Section, ctx: &mut Ctx, settings: &Settings) -> (String, String) {
    let d = root.section(ctx, "data");
    let output_type = d.choice(ctx, "output_type", &settings.output_type, OUTPUT_TYPES);
    let data_type = d.choice(ctx, "data_type", &settings.data_type, DATA_TYPES);
    d.finish(ctx, &[]);
    (output_type, data_type)
}

// ------------------------------------------------------------------------------------------
// Classification

pub const BACKBONES: &[&str] = &["cnn_light", "cnn", "cnn_1d", "cnn_1d_light", "transformer"];
pub const ACTIVATIONS: &[&str] = &["gelu", "relu", "lrelu", "silu", "sigmoid", "tanh", "prelu"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TaskKind {
    Classification,
    Regression,
}

/// A task: where its label comes from and how many outputs its head has.
#[derive(Debug, Clone, Serialize)]
pub struct Task {
    pub name: String,
    pub kind: TaskKind,
    /// Output width of the head: classes, or 1 for regression.
    pub outputs: usize,
    /// Metadata column the label is read from.
    pub column: String,
    /// How the column's text becomes a label (see runtime `data::labels`).
    pub encoder: String,
    pub weight: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClsDataset {
    pub name: String,
    /// Named dataset from `[datasets.*]` (its `output` dir) or a path.
    pub path: std::path::PathBuf,
    pub named: Option<String>,
    pub tasks: Vec<String>,
    pub train_split: String,
    pub val_split: String,
    pub test_split: String,
    pub batch_size: usize,
    pub num_workers: usize,
    pub pin_memory: bool,
    pub shuffle: bool,
    pub n_eeg_channels: usize,
    pub sequence_length: usize,
    pub resolution: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClsModel {
    pub backbone: String,
    pub input_channels: usize,
    pub embedding_dim: usize,
    pub dropout: f64,
    pub activation: String,
    pub depth: usize,
    pub layer_repeats: usize,
    /// Transformer extras (reference names): hidden_dim, num_layers, num_heads, ff_dim, pooling.
    pub hidden_dim: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub ff_dim: usize,
    pub pooling: String,
    pub patch_size: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClsTraining {
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub clip_grad_norm: Option<f64>,
    pub device: String,
    pub log_every_batches: usize,
    pub eval_strategy: String,
    pub eval_steps: Option<usize>,
    pub output_dir: Option<String>,
    pub log_dir: Option<String>,
    pub tensorboard: bool,
    pub wandb_project: Option<String>,
    pub wandb_entity: Option<String>,
    pub wandb_tags: Vec<String>,
    pub run_name: Option<String>,
    pub checkpoint_total_limit: Option<usize>,
    pub checkpoint_strategy: String,
    pub checkpoint_steps: Option<usize>,
    pub use_amp: bool,
    pub metrics_summary_path: Option<String>,
    pub max_best_checkpoints: usize,
    pub early_stopping: bool,
    pub early_stopping_patience: usize,
    pub compile_model: bool,
    pub compile_mode: String,
    pub swa_enabled: bool,
    pub swa_extra_ratio: f64,
    pub swa_lr_frac: f64,
    pub label_smoothing: f64,
    pub seed: u64,
    pub resume: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Classification {
    /// `spectrogram` or `timeseries`, after the `[data]` override.
    pub data_type: String,
    pub dataset: ClsDataset,
    pub model: ClsModel,
    pub tasks: Vec<Task>,
    pub optimizer: Optimizer,
    pub scheduler: Scheduler,
    pub training: ClsTraining,
}

/// The label registries of the reference: meta (path) datasets and the named datasets.
/// Returns (kind, outputs, column, encoder).
fn registry_task(
    dataset: Option<&str>,
    task: &str,
) -> Option<(TaskKind, usize, &'static str, &'static str)> {
    use TaskKind::*;
    let common = match task {
        "gender" => Some((Classification, 2, "gender", "gender")),
        "health" => Some((Classification, 2, "health", "health")),
        "age" => Some((Regression, 1, "age", "float")),
        _ => None,
    };
    match (dataset, task) {
        (_, "gender" | "health" | "age") => common,
        (Some("seed"), "emotion") => Some((Classification, 5, "emotion", "emotion")),
        (Some("seed"), "seed_condition") => Some((Classification, 10, "seed_condition", "int")),
        (Some("math"), "math_activity") => Some((Classification, 2, "doingmath", "bool")),
        (Some("math"), "math_condition") => Some((Classification, 4, "math_condition", "int")),
        (Some("parkinsons"), "parkinsons_condition") => {
            Some((Classification, 4, "parkinsons_condition", "int"))
        }
        (Some("longitudinal"), "handedness") => {
            Some((Classification, 2, "handedness", "handedness"))
        }
        _ => None,
    }
}

fn registry_names(dataset: Option<&str>) -> Vec<&'static str> {
    let extra: &[&str] = match dataset {
        Some("seed") => &["emotion", "seed_condition"],
        Some("math") => &["math_activity", "math_condition"],
        Some("parkinsons") => &["parkinsons_condition"],
        Some("longitudinal") => &["handedness"],
        _ => &[],
    };
    let mut v = vec!["gender", "health", "age"];
    v.extend_from_slice(extra);
    v
}

pub fn read_classification(
    root: &Section,
    ctx: &mut Ctx,
    settings: &Settings,
) -> (Classification, String, String) {
    let (output_type, data_type) = read_data_overrides(root, ctx, settings);

    // [dataset]
    let d = root.section(ctx, "dataset");
    if !d.is_present() {
        ctx.diags.error(root.loc(), "missing section `[dataset]`");
    }
    let name = d.string(ctx, "name").unwrap_or_default();
    if d.is_present() && name.is_empty() {
        ctx.diags.push(
            crate::diag::Diagnostic::error(
                ctx.loc("dataset.name").or(d.loc()),
                "`dataset.name` is required: a preprocessed dataset directory or a `[datasets.*]` name",
            )
            .help("for example `name = \"data/processed/demo\"`"),
        );
    }
    let named = settings.datasets.contains_key(&name).then(|| name.clone());
    let path = match &named {
        Some(n) => {
            let ds = &settings.datasets[n];
            if data_type == "timeseries" {
                ds.timeseries_output.clone()
            } else {
                ds.output.clone()
            }
        }
        None => std::path::PathBuf::from(&name),
    };
    let task_names = d.string_list(ctx, "tasks").unwrap_or_default();
    if d.is_present() && task_names.is_empty() {
        ctx.error(
            "dataset.tasks",
            "`dataset.tasks` must name at least one task",
        )
        .help = Some("for example `tasks = [\"gender\", \"health\", \"age\"]`".into());
    }
    let nonempty = |s: Option<String>, dflt: &str| {
        s.filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| dflt.into())
    };
    let train_split = nonempty(d.string(ctx, "train_split"), "train");
    let val_split = nonempty(d.string(ctx, "val_split"), "val");
    let test_split = nonempty(d.string(ctx, "test_split"), "test");
    let batch_size = d.count(ctx, "batch_size", 32, 1);
    let num_workers = d.count(ctx, "num_workers", 4, 0);
    let pin_memory = d.bool_or(ctx, "pin_memory", true);
    let shuffle = d.bool_or(ctx, "shuffle", true);
    let de = d.section(ctx, "extras");
    let n_eeg_channels = de.count(ctx, "n_eeg_channels", 20, 1);
    let sequence_length = de
        .count_opt(ctx, "sequence_length", 8)
        .or(de.count_opt(ctx, "expected_length", 8))
        .unwrap_or(2048);
    de.finish(ctx, &[]);
    let resolution = d.count(ctx, "resolution", 256, 8);
    d.finish(ctx, &[]);

    // [model]
    let m = root.section(ctx, "model");
    if !m.is_present() {
        ctx.diags.error(root.loc(), "missing section `[model]`");
    }
    let backbone = m.choice(ctx, "backbone", "cnn_light", BACKBONES);
    if m.is_present() && !m.has("backbone") {
        ctx.diags.error(
            m.loc(),
            "`model.backbone` is required (one of cnn_light, cnn, cnn_1d, transformer)",
        );
    }
    let input_channels = m.count(ctx, "input_channels", 0, 1);
    if m.is_present() && !m.has("input_channels") {
        ctx.diags.error(m.loc(), "`model.input_channels` is required (1 for db-only, 3 for db-iq/db-polar, 20 for time series)");
    }
    let embedding_dim = m.count(ctx, "embedding_dim", 256, 1);
    let dropout = m.float_in(ctx, "dropout", 0.3, 0.0, 0.999);
    let activation = m.choice(ctx, "activation", "gelu", ACTIVATIONS);
    let depth = m.count(ctx, "depth", 3, 1);
    let layer_repeats = m.count(ctx, "layer_repeats", 2, 1);
    let mx = m.section(ctx, "extras");
    let hidden_dim = mx.count(ctx, "hidden_dim", 256, 1);
    let num_layers = mx.count(ctx, "num_layers", 4, 1);
    let num_heads = mx.count(ctx, "num_heads", 4, 1);
    let ff_dim = mx.count(ctx, "ff_dim", 512, 1);
    let pooling = mx.choice(ctx, "pooling", "mean", &["mean", "cls"]);
    let patch_size = mx.count(ctx, "patch_size", 16, 1);
    // The reference requires these two for its transformer; ours derives them from the data shape.
    for k in ["input_dim", "seq_length"] {
        if mx.has(k) {
            mx.count_opt(ctx, k, 1);
        }
    }
    mx.finish(ctx, &[]);
    if backbone != "transformer" {
        for k in [
            "hidden_dim",
            "num_layers",
            "num_heads",
            "ff_dim",
            "pooling",
            "patch_size",
            "input_dim",
            "seq_length",
        ] {
            let key = format!("model.extras.{k}");
            if ctx.loc(&key).is_some() {
                ctx.error(
                    &key,
                    format!("`{key}` applies to the transformer backbone only, not `{backbone}`"),
                );
            }
        }
    }
    m.finish(ctx, &[]);

    let optimizer = read_optimizer(root, ctx, &["adamw", "adam", "sgd"], 3e-4, 1e-4);
    let scheduler = read_scheduler(root, ctx, &["constant", "linear", "cosine"]);

    // [training]
    let t = root.section(ctx, "training");
    let epochs = t.count(ctx, "epochs", 25, 1);
    let max_steps = match t.int(ctx, "max_steps") {
        None | Some(-1) => None,
        Some(n) if n > 0 => Some(n as usize),
        Some(n) => {
            ctx.error(
                "training.max_steps",
                format!("`training.max_steps` = {n} must be -1 (no cap) or positive"),
            );
            None
        }
    };
    // TOML has no null: `false` or 0 disable clipping (the reference cannot disable it, and 0
    // zeroes every gradient there).
    let clip_grad_norm = match t.node(ctx, "clip_grad_norm").map(|n| &n.value) {
        None => Some(1.0),
        Some(crate::tree::Value::Bool(false)) => None,
        Some(_) => {
            match t.float(ctx, "clip_grad_norm") {
                Some(0.0) => None,
                Some(v) if v > 0.0 => Some(v),
                Some(v) => {
                    ctx.error("training.clip_grad_norm", format!("`training.clip_grad_norm` = {v} must be positive, or 0/false to disable"));
                    None
                }
                None => Some(1.0),
            }
        }
    };
    let device = t.choice(ctx, "device", "auto", &["auto", "cpu", "cuda"]);
    let log_every_batches = t
        .count_opt(ctx, "log_every_batches", 1)
        .or(t.count_opt(ctx, "log_every", 1))
        .unwrap_or(10);
    let eval_strategy = t.choice(ctx, "eval_strategy", "epoch", &["epoch", "steps", "none"]);
    let eval_steps = t.count_opt(ctx, "eval_steps", 1);
    if eval_strategy == "steps" && eval_steps.is_none() {
        ctx.error(
            "training.eval_strategy",
            "`training.eval_strategy` = \"steps\" needs `training.eval_steps`",
        )
        .help = Some("add `eval_steps = 100` (optimizer steps between evaluations)".into());
    }
    let opt_path = |t: &Section, ctx: &mut Ctx, k: &str| t.string(ctx, k).filter(|s| !s.is_empty());
    let output_dir = opt_path(&t, ctx, "output_dir");
    let log_dir = opt_path(&t, ctx, "log_dir");
    let tensorboard = t.bool_or(ctx, "tensorboard", false);
    let wandb_project = opt_path(&t, ctx, "wandb_project");
    let wandb_entity = opt_path(&t, ctx, "wandb_entity");
    let wandb_tags = t.string_list(ctx, "wandb_tags").unwrap_or_default();
    let run_name = opt_path(&t, ctx, "run_name");
    let checkpoint_total_limit = t.count_opt(ctx, "checkpoint_total_limit", 1);
    let checkpoint_strategy = t.choice(ctx, "checkpoint_strategy", "epoch", &["epoch", "steps"]);
    let checkpoint_steps = t.count_opt(ctx, "checkpoint_steps", 1);
    if checkpoint_strategy == "steps" && checkpoint_steps.is_none() {
        ctx.error(
            "training.checkpoint_strategy",
            "`training.checkpoint_strategy` = \"steps\" needs `training.checkpoint_steps`",
        )
        .help = Some("add `checkpoint_steps = 100`".into());
    }
    let use_amp = t.bool_or(ctx, "use_amp", false);
    let metrics_summary_path = opt_path(&t, ctx, "metrics_summary_path");
    let max_best_checkpoints = t.count(ctx, "max_best_checkpoints", 1, 1);
    let early_stopping = t.bool_or(ctx, "early_stopping", false);
    let early_stopping_patience = t.count(ctx, "early_stopping_patience", 5, 1);
    if early_stopping && eval_strategy == "none" {
        ctx.error(
            "training.early_stopping",
            "`training.early_stopping` needs evaluations, but `eval_strategy` = \"none\"",
        );
    }
    let compile_model = t.bool_or(ctx, "compile_model", true);
    let compile_mode = t.choice(
        ctx,
        "compile_mode",
        "default",
        &["default", "reduce-overhead", "max-autotune"],
    );
    let swa_enabled = t.bool_or(ctx, "swa_enabled", false);
    let swa_extra_ratio = t.float_in(ctx, "swa_extra_ratio", 0.333, 1e-6, 10.0);
    let swa_lr_frac = t.float_in(ctx, "swa_lr_frac", 0.25, 1e-6, 10.0);
    let label_smoothing = t.float_in(ctx, "label_smoothing", 0.0, 0.0, 0.999);
    let seed = t.int(ctx, "seed").map(|s| s as u64).unwrap_or(42);
    let resume = opt_path(&t, ctx, "resume");
    let tw = t.section(ctx, "task_weights");
    let mut weights: BTreeMap<String, f64> = BTreeMap::new();
    for k in tw.keys() {
        if let Some(w) = tw.float(ctx, &k) {
            if w < 0.0 {
                ctx.error(
                    &format!("training.task_weights.{k}"),
                    format!("task weight `{k}` = {w} must not be negative"),
                );
            }
            if !task_names.contains(&k) {
                ctx.error(&format!("training.task_weights.{k}"), format!("`training.task_weights.{k}` names a task that `dataset.tasks` does not list"))
                    .help = Some(format!("the tasks are: {}", task_names.join(", ")));
            }
            weights.insert(k, w);
        }
    }
    tw.finish(ctx, &[]);
    t.finish(
        ctx,
        &[
            (
                "use_focal_loss_health",
                "the reference never reads it from TOML",
            ),
            ("focal_alpha", "the reference never reads it from TOML"),
            ("focal_gamma", "the reference never reads it from TOML"),
        ],
    );

    // [tasks.NAME]: user-declared tasks for any labelled dataset.
    let custom = root.section(ctx, "tasks");
    let mut declared: BTreeMap<String, (TaskKind, usize, String)> = BTreeMap::new();
    for k in custom.keys() {
        let s = custom.section(ctx, &k);
        let kind = s.choice(
            ctx,
            "kind",
            "classification",
            &["classification", "regression"],
        );
        let column = s.string_or(ctx, "column", &k);
        let (kind, outputs) = if kind == "regression" {
            if s.has("num_classes") {
                ctx.error(
                    &format!("tasks.{k}.num_classes"),
                    format!("regression task `{k}` has no classes"),
                );
            }
            (TaskKind::Regression, 1)
        } else {
            let n = s.count_opt(ctx, "num_classes", 2);
            if n.is_none() && !s.has("num_classes") {
                ctx.diags.error(
                    s.loc(),
                    format!("classification task `{k}` needs `num_classes` (at least 2)"),
                );
            }
            (TaskKind::Classification, n.unwrap_or(2))
        };
        s.finish(ctx, &[]);
        declared.insert(k, (kind, outputs, column));
    }
    custom.finish(ctx, &[]);
    root.finish(ctx, &[]);

    // Tasks vs dataset, and the reference's weight rule (empty table: 1/n each; else 1.0 default).
    let ds_kind = named.as_deref();
    let n = task_names.len().max(1) as f64;
    let mut tasks = vec![];
    for name in &task_names {
        let weight = if weights.is_empty() {
            1.0 / n
        } else {
            weights.get(name).copied().unwrap_or(1.0)
        };
        if let Some((kind, outputs, column)) = declared.get(name) {
            tasks.push(Task {
                name: name.clone(),
                kind: *kind,
                outputs: *outputs,
                column: column.clone(),
                encoder: if *kind == TaskKind::Regression {
                    "float".into()
                } else {
                    "int".into()
                },
                weight,
            });
        } else if let Some((kind, outputs, column, encoder)) = registry_task(ds_kind, name) {
            tasks.push(Task {
                name: name.clone(),
                kind,
                outputs,
                column: column.into(),
                encoder: encoder.into(),
                weight,
            });
        } else {
            let known = registry_names(ds_kind);
            let what = match ds_kind {
                Some(n) => format!("dataset `{n}`"),
                None => "a preprocessed (path) dataset".into(),
            };
            let mut help = format!("{what} provides: {}; or declare it in `[tasks.{name}]` with `column`, `kind` and `num_classes`", known.join(", "));
            if let Some(s) = crate::diag::suggest(name, known.iter().copied()) {
                help = format!("did you mean \"{s}\"? {help}");
            }
            ctx.error("dataset.tasks", format!("unknown task `{name}` for {what}"))
                .help = Some(help);
        }
    }
    if task_names
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        != task_names.len()
    {
        ctx.error("dataset.tasks", "`dataset.tasks` lists a task twice");
    }

    // Shape rules that the reference only finds at run time (or crashes on).
    let is_1d = backbone.contains("1d");
    if is_1d && data_type != "timeseries" {
        ctx.error(
            "model.backbone",
            format!(
                "backbone `{backbone}` reads time series, but the data type is \"{data_type}\""
            ),
        )
        .help = Some(
            "set `[data] data_type = \"timeseries\"`, or use `cnn_light`/`cnn` for spectrograms"
                .into(),
        );
    }
    if !is_1d && backbone != "transformer" && data_type == "timeseries" {
        ctx.error("model.backbone", format!("backbone `{backbone}` reads spectrogram images, but the data type is \"timeseries\""))
            .help = Some("use `cnn_1d` or `transformer` for time series".into());
    }
    if data_type == "spectrogram" && m.is_present() {
        let expected = if output_type == "db-only" { 1 } else { 3 };
        if input_channels != expected && input_channels != 0 {
            ctx.error("model.input_channels", format!("`model.input_channels` = {input_channels}, but output type \"{output_type}\" images have {expected} channel{}", if expected == 1 { "" } else { "s" }))
                .help = Some(format!("set `input_channels = {expected}`"));
        }
    }
    if data_type == "timeseries"
        && m.is_present()
        && input_channels != n_eeg_channels
        && input_channels != 0
    {
        ctx.error("model.input_channels", format!("`model.input_channels` = {input_channels}, but time series have {n_eeg_channels} EEG channels (`dataset.extras.n_eeg_channels`)"));
    }
    if backbone == "cnn_light" || backbone == "cnn" {
        let div = 1usize << depth;
        if !embedding_dim.is_multiple_of(div) {
            ctx.error("model.embedding_dim", format!("`model.embedding_dim` = {embedding_dim} must be divisible by 2^depth = {div} for `{backbone}`"))
                .help = Some(format!("the last block has embedding_dim channels and each of the {depth} blocks doubles (or quadruples) them; try {}", (embedding_dim / div).max(1) * div));
        }
        if (resolution >> (depth + 1)) == 0 {
            ctx.error(
                "model.depth",
                format!("`model.depth` = {depth} pools a {resolution}px image below one pixel"),
            );
        }
    }
    if backbone == "transformer" {
        if !hidden_dim.is_multiple_of(num_heads) {
            ctx.error("model.extras.num_heads", format!("`model.extras.hidden_dim` = {hidden_dim} is not divisible by `num_heads` = {num_heads}"));
        }
        if data_type == "spectrogram" && !resolution.is_multiple_of(patch_size) {
            ctx.error("model.extras.patch_size", format!("resolution {resolution} is not divisible by `model.extras.patch_size` = {patch_size}"));
        }
    }
    if let (Some(steps), Some(ck)) = (eval_steps, checkpoint_steps) {
        if early_stopping
            && eval_strategy == "steps"
            && checkpoint_strategy == "steps"
            && ck % steps != 0
        {
            ctx.error("training.checkpoint_steps", format!("with early stopping, `checkpoint_steps` = {ck} must be a multiple of `eval_steps` = {steps}"));
        }
    }

    if backbone == "transformer" {
        for k in ["depth", "layer_repeats"] {
            let key = format!("model.{k}");
            if ctx.loc(&key).is_some() {
                ctx.error(&key, format!("`{key}` does not apply to the transformer backbone"))
                    .help = Some("set its size with `[model.extras] num_layers`, `hidden_dim`, `num_heads`, `ff_dim`".into());
            }
        }
    }

    let cls = Classification {
        data_type: data_type.clone(),
        dataset: ClsDataset {
            name,
            path,
            named,
            tasks: task_names,
            train_split,
            val_split,
            test_split,
            batch_size,
            num_workers,
            pin_memory,
            shuffle,
            n_eeg_channels,
            sequence_length,
            resolution,
        },
        model: ClsModel {
            backbone,
            input_channels,
            embedding_dim,
            dropout,
            activation,
            depth,
            layer_repeats,
            hidden_dim,
            num_layers,
            num_heads,
            ff_dim,
            pooling,
            patch_size,
        },
        tasks,
        optimizer,
        scheduler,
        training: ClsTraining {
            epochs,
            max_steps,
            clip_grad_norm,
            device,
            log_every_batches,
            eval_strategy,
            eval_steps,
            output_dir,
            log_dir,
            tensorboard,
            wandb_project,
            wandb_entity,
            wandb_tags,
            run_name,
            checkpoint_total_limit,
            checkpoint_strategy,
            checkpoint_steps,
            use_amp,
            metrics_summary_path,
            max_best_checkpoints,
            early_stopping,
            early_stopping_patience,
            compile_model,
            compile_mode,
            swa_enabled,
            swa_extra_ratio,
            swa_lr_frac,
            label_smoothing,
            seed,
            resume,
        },
    };
    (cls, output_type, data_type)
}

// ------------------------------------------------------------------------------------------
// Diffusion

pub const DIFFUSION_MODELS: &[&str] = &[
    "dit",
    "hourglass",
    "localmamba",
    "stable-diffusion-v1-5",
    "stable-diffusion-3.5-medium",
];
pub const CONDITIONING: &[&str] = &["none", "caption", "classes", "gend_hlth_age"];

#[derive(Debug, Clone, Serialize)]
pub struct DiffDataset {
    pub name: String,
    pub train_split: String,
    pub val_split: Option<String>,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub num_workers: usize,
    pub resolution: usize,
    pub cache_dir: Option<String>,
    pub center_crop: bool,
    pub random_flip: bool,
    pub image_column: String,
    pub caption_column: Option<String>,
    pub class_column: Option<String>,
    pub gender_column: String,
    pub health_column: String,
    pub age_column: String,
    pub num_classes: usize,
    pub dataset_type: String,
    pub max_train_samples: Option<usize>,
    pub max_eval_samples: Option<usize>,
    pub n_eeg_channels: usize,
    pub sequence_length: usize,
    pub gaussian_noise_std: f64,
}

/// Architecture hyper-parameters; each model reads the ones it has.
#[derive(Debug, Clone, Serialize)]
pub struct DiffModel {
    pub name: String,
    pub conditioning: String,
    pub pretrained: Option<String>,
    pub revision: Option<String>,
    pub sample_size: usize,
    pub vae_tiling: bool,
    pub lora_enabled: bool,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_target_modules: Vec<String>,
    pub lora_bias: String,
    pub lora_scaling: Option<f64>,
    pub latent_space: bool,
    pub vae: Option<String>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub cfg_dropout: f64,
    pub num_classes: usize,
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub num_layers: usize,
    pub patch_size: [usize; 2],
    pub widths: Vec<usize>,
    pub depths: Vec<usize>,
    pub dims: Vec<usize>,
    pub d_state: usize,
    pub scan_directions: Vec<String>,
    pub attention: Vec<String>,
    pub mapping_width: usize,
    pub mapping_depth: usize,
    pub dropout: f64,
    pub attention_bias: bool,
    pub activation_fn: String,
    pub norm_elementwise_affine: bool,
    pub norm_eps: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiffTraining {
    pub seed: u64,
    pub output_dir: Option<String>,
    pub mixed_precision: String,
    pub gradient_checkpointing: bool,
    pub gradient_accumulation_steps: usize,
    pub epochs: usize,
    pub max_train_steps: Option<usize>,
    pub log_every_steps: usize,
    pub checkpoint_interval: Option<usize>,
    pub checkpoint_total_limit: Option<usize>,
    pub resume: Option<String>,
    pub gradient_clip_norm: Option<f64>,
    pub ema_decay: f64,
    pub ema_power: f64,
    pub ema_inv_gamma: f64,
    pub ema_update_after_step: usize,
    pub ema_use_ema_warmup: bool,
    pub allow_tf32: bool,
    pub compile_model: bool,
    pub compile_mode: String,
    pub snr_gamma: Option<f64>,
    pub eval_num_examples: usize,
    pub eval_mmd_samples: usize,
    pub eval_mmd_fallback_ntrain: usize,
    pub eval_strategy: String,
    pub eval_num_steps: usize,
    pub eval_batch_size: usize,
    pub initial_eval: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Diffusion {
    pub dataset: DiffDataset,
    pub model: DiffModel,
    pub prediction_type: String,
    pub objective_scheduler: String,
    pub num_timesteps: usize,
    pub optimizer: Optimizer,
    pub scheduler: Scheduler,
    pub training: DiffTraining,
    pub tensorboard: bool,
    pub log_dir: Option<String>,
    pub wandb_project: Option<String>,
    pub wandb_entity: Option<String>,
    pub run_name: Option<String>,
    pub denoising_steps: usize,
    pub cfg_scale: f64,
    pub sampler: String,
    pub guidance: String,
    /// `data.data_type = "timeseries"`.
    pub dataset_is_timeseries: bool,
}

pub fn read_diffusion(
    root: &Section,
    ctx: &mut Ctx,
    settings: &Settings,
) -> (Diffusion, String, String) {
    let (output_type, data_type) = read_data_overrides(root, ctx, settings);
    let ts = data_type == "timeseries";
    for sec in ["dataset", "model", "objective", "training"] {
        if !root.has(sec) {
            ctx.diags.error(root.loc(), format!("missing section `[{sec}]` (diffusion configs need [dataset], [model], [objective] and [training])"));
        }
    }
    let nonempty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());

    // [dataset]
    let d = root.section(ctx, "dataset");
    let name = nonempty(d.string(ctx, "name"))
        .or(nonempty(d.string(ctx, "identifier")))
        .unwrap_or_default();
    if d.is_present() && name.is_empty() {
        ctx.diags.error(
            d.loc(),
            "`dataset.name` is required: the preprocessed dataset directory",
        );
    }
    let train_split = nonempty(d.string(ctx, "train_split")).unwrap_or_else(|| "train".into());
    let val_split = nonempty(d.string(ctx, "val_split"));
    let batch_size = d.count(ctx, "batch_size", 4, 1);
    let eval_batch_size_ds = d.count_opt(ctx, "eval_batch_size", 1);
    let num_workers = d.count(ctx, "num_workers", 4, 0);
    let resolution = d.count(ctx, "resolution", 256, 8);
    let cache_dir = nonempty(d.string(ctx, "cache_dir"));
    let center_crop = d.bool_or(ctx, "center_crop", false);
    let random_flip = d.bool_or(ctx, "random_flip", false);
    let image_column = d.string_or(ctx, "image_column", "image");
    let caption_column = match d.string(ctx, "caption_column") {
        None => Some("text".to_string()),
        Some(s) if s.is_empty() => None,
        Some(s) => Some(s),
    };
    let class_column = nonempty(d.string(ctx, "class_column"));
    let gender_column = d.string_or(ctx, "gender_column", "gender");
    let health_column = d.string_or(ctx, "health_column", "health");
    let age_column = d.string_or(ctx, "age_column", "age");
    let num_classes_ds = d.count(ctx, "num_classes", 0, 0);
    let dataset_type = d.choice(
        ctx,
        "dataset_type",
        "auto",
        &["auto", "imagefolder", "parquet"],
    );
    let max_train_samples = d.count_opt(ctx, "max_train_samples", 1);
    let max_eval_samples = d.count_opt(ctx, "max_eval_samples", 1);
    let de = d.section(ctx, "extras");
    let n_eeg_channels = de.count(ctx, "n_eeg_channels", 20, 1);
    let sequence_length = de.count(ctx, "sequence_length", resolution, 8);
    let gaussian_noise_std = de.float_in(ctx, "gaussian_noise_std", 0.0, 0.0, 10.0);
    de.finish(ctx, &[]);
    d.finish(ctx, &[]);

    // [model]
    let m = root.section(ctx, "model");
    let name_m = m.choice(ctx, "name", "dit", DIFFUSION_MODELS);
    if m.is_present() && !m.has("name") {
        ctx.diags.error(
            m.loc(),
            format!(
                "`model.name` is required (one of {})",
                DIFFUSION_MODELS.join(", ")
            ),
        );
    }
    let is_sd = name_m.starts_with("stable-diffusion");
    let conditioning = m.choice(
        ctx,
        "conditioning",
        if is_sd { "caption" } else { "none" },
        CONDITIONING,
    );
    let pretrained = nonempty(m.string(ctx, "pretrained"));
    let revision = nonempty(m.string(ctx, "revision"));
    let sample_size = m.count(ctx, "sample_size", resolution, 1);
    let vae_tiling = m.bool_or(ctx, "vae_tiling", false);
    let lora = m.section(ctx, "lora");
    let lora_enabled = lora.bool_or(ctx, "enabled", false);
    let lora_rank = lora.count(ctx, "rank", 4, 1);
    let lora_alpha = lora.float(ctx, "alpha").unwrap_or(4.0);
    let lora_dropout = lora.float_in(ctx, "dropout", 0.0, 0.0, 0.999);
    let lora_target_modules = lora.string_list(ctx, "target_modules").unwrap_or_else(|| {
        ["to_q", "to_k", "to_v", "to_out.0"]
            .map(String::from)
            .to_vec()
    });
    let lora_bias = lora.choice(ctx, "bias", "none", &["none", "all", "lora_only"]);
    let lora_scaling = lora.float(ctx, "scaling");
    lora.finish(ctx, &[]);
    // The reference moves unknown top-level [model] keys into extras; `latent_space` is the one
    // its configs use, so accept it in both places.
    let latent_top = m
        .has("latent_space")
        .then(|| m.bool_or(ctx, "latent_space", false));
    let x = m.section(ctx, "extras");
    let latent_space = latent_top.unwrap_or_else(|| x.bool_or(ctx, "latent_space", false));
    if latent_top.is_some() {
        x.bool_or(ctx, "latent_space", false);
    }
    let vae = nonempty(x.string(ctx, "vae"));
    let default_ch = if ts { 1 } else { 3 };
    let in_channels = x.count(ctx, "in_channels", default_ch, 1);
    let out_channels = x.count(ctx, "out_channels", in_channels, 1);
    let cfg_dropout = x.float_in(
        ctx,
        "cfg_dropout",
        if name_m == "stable-diffusion-3.5-medium" {
            0.1
        } else {
            0.0
        },
        0.0,
        1.0,
    );
    let num_classes_x = x.count_opt(ctx, "num_classes", 0);
    let num_attention_heads = x.count(ctx, "num_attention_heads", 16, 1);
    let attention_head_dim = x.count(ctx, "attention_head_dim", 72, 1);
    let num_layers = x.count(ctx, "num_layers", 28, 1);
    let patch_size = match x.node(ctx, "patch_size").map(|n| n.value.clone()) {
        None => {
            if ts {
                [1, 8]
            } else {
                [2, 2]
            }
        }
        Some(crate::tree::Value::Int(p)) if p >= 1 => [p as usize, p as usize],
        Some(_) => match x.int_list(ctx, "patch_size") {
            Some(v) if v.len() == 2 && v.iter().all(|p| *p >= 1) => [v[0] as usize, v[1] as usize],
            _ => {
                ctx.error(
                    "model.extras.patch_size",
                    "`model.extras.patch_size` must be a positive integer or a pair like [1, 8]",
                );
                [2, 2]
            }
        },
    };
    let us = |v: Option<Vec<i64>>| {
        v.map(|v| v.into_iter().map(|x| x.max(0) as usize).collect::<Vec<_>>())
    };
    let widths = us(x.int_list(ctx, "widths")).unwrap_or_else(|| vec![128, 256, 512]);
    let depths = us(x.int_list(ctx, "depths")).unwrap_or_else(|| {
        if name_m == "localmamba" {
            vec![2, 2, 9, 2]
        } else {
            vec![2, 2, 4]
        }
    });
    let dims = us(x.int_list(ctx, "dims")).unwrap_or_else(|| vec![96, 192, 384, 768]);
    let d_state = x.count(ctx, "d_state", 16, 1);
    let scan_directions = x
        .string_list(ctx, "scan_directions")
        .or(x.string_list(ctx, "scans"))
        .unwrap_or_else(|| ["h", "v", "w7"].map(String::from).to_vec());
    let attention = x.string_list(ctx, "attention").unwrap_or_default();
    let mapping_width = x.count(ctx, "mapping_width", 256, 1);
    let mapping_depth = x.count(ctx, "mapping_depth", 2, 1);
    // Model-adapter keys the reference's shipped configs use for hourglass/localmamba/sd35.
    for k in [
        "d_ffs",
        "mapping_d_ff",
        "mapping_cond_dim",
        "mapping_dropout_rate",
        "dropout_rate",
        "ssm_ratio",
        "ssm_dt_rank",
        "mlp_ratio",
        "drop_path_rate",
        "num_genders",
        "num_health",
        "age_embedding_dim",
        "skip_t5",
        "train_text_encoder",
        "text_encoder_lr_scale",
        "joint_attention_dim",
        "caption_projection_dim",
        "pooled_projection_dim",
        "mapping_cond",
        "block_out_channels",
        "num_res_blocks",
        "d_conv",
        "expand",
        "self_attns",
        "augment_wrapper",
        "augment_prob",
        "conditioning",
    ] {
        x.node(ctx, k);
    }
    // DiT's diffusers keys.
    let dropout = x.float_in(ctx, "dropout", 0.0, 0.0, 0.999);
    let attention_bias = x.bool_or(ctx, "attention_bias", true);
    let activation_fn = x.string_or(ctx, "activation_fn", "gelu-approximate");
    let norm_elementwise_affine = x.bool_or(ctx, "norm_elementwise_affine", false);
    let norm_eps = x.float_in(ctx, "norm_eps", 1e-5, 1e-12, 1.0);
    // Upcasting attention to f32 is what every build does; GroupNorm groups are not used by a
    // DiT with adaLN-Zero (diffusers ignores the key too).
    x.bool_or(ctx, "upcast_attention", false);
    x.count(ctx, "norm_num_groups", 32, 1);
    x.finish(ctx, &[]);
    m.finish(ctx, &[]);
    let num_classes = num_classes_x.unwrap_or(num_classes_ds);

    // [objective]
    let o = root.section(ctx, "objective");
    let prediction_type = o.choice(
        ctx,
        "prediction_type",
        "epsilon",
        &["epsilon", "sample", "vector_field"],
    );
    let objective_scheduler = o.choice(
        ctx,
        "scheduler",
        if prediction_type == "vector_field" {
            "flow_match_euler"
        } else {
            "ddim"
        },
        &["ddim", "ddpm", "flow_match_euler"],
    );
    let num_timesteps = o.count(ctx, "num_timesteps", 1000, 2);
    o.finish(
        ctx,
        &[(
            "flow_match_timesteps",
            "the reference reads only `num_timesteps`; use that",
        )],
    );

    let optimizer = read_optimizer(
        root,
        ctx,
        &["adamw", "adam", "sgd", "adamw_8bit"],
        1e-4,
        1e-2,
    );
    let scheduler = read_scheduler(
        root,
        ctx,
        &[
            "constant",
            "constant_with_warmup",
            "linear",
            "cosine",
            "polynomial",
        ],
    );

    // [training]
    let t = root.section(ctx, "training");
    let seed = t.int(ctx, "seed").map(|s| s as u64).unwrap_or(42);
    let output_dir = nonempty(t.string(ctx, "output_dir"));
    let mixed_precision = t.choice(ctx, "mixed_precision", "bf16", &["no", "fp16", "bf16"]);
    let gradient_checkpointing = if t.has("grad_checkpointing") {
        t.bool_or(ctx, "grad_checkpointing", false)
    } else {
        t.bool_or(ctx, "gradient_checkpointing", false)
    };
    let gradient_accumulation_steps = t.count(ctx, "gradient_accumulation_steps", 1, 1);
    let epochs = t.count(ctx, "epochs", 1, 1);
    let max_train_steps = t.count_opt(ctx, "max_train_steps", 1);
    let log_every_steps = t.count(ctx, "log_every_steps", 10, 1);
    let checkpoint_interval = t.count_opt(ctx, "checkpoint_interval", 1);
    let checkpoint_total_limit = t.count_opt(ctx, "checkpoint_total_limit", 1);
    let resume = nonempty(t.string(ctx, "resume"));
    let gradient_clip_norm = match t.float(ctx, "gradient_clip_norm") {
        None => Some(1.0),
        Some(0.0) => None,
        Some(v) if v > 0.0 => Some(v),
        Some(v) => {
            ctx.error(
                "training.gradient_clip_norm",
                format!("`training.gradient_clip_norm` = {v} must be positive, or 0 to disable"),
            );
            None
        }
    };
    let ema_decay = t.float_in(ctx, "ema_decay", 0.999, 0.0, 1.0);
    let ema_power = t.float_in(ctx, "ema_power", 0.75, 0.0, 10.0);
    let ema_inv_gamma = t.float_in(ctx, "ema_inv_gamma", 1.0, 1e-9, 1e9);
    let ema_update_after_step = t.count(ctx, "ema_update_after_step", 5000, 0);
    let ema_use_ema_warmup = if t.has("ema_warmup") {
        t.bool_or(ctx, "ema_warmup", true)
    } else {
        t.bool_or(ctx, "ema_use_ema_warmup", true)
    };
    let allow_tf32 = t.bool_or(ctx, "allow_tf32", true);
    let compile_model = t.bool_or(ctx, "compile_model", false);
    let compile_mode = t.choice(
        ctx,
        "compile_mode",
        "default",
        &["default", "reduce-overhead", "max-autotune"],
    );
    let snr_gamma = t.float(ctx, "snr_gamma");
    if let Some(g) = snr_gamma {
        if g <= 0.0 {
            ctx.error(
                "training.snr_gamma",
                "`training.snr_gamma` must be positive (remove it for uniform weighting)",
            );
        }
    }
    let eval_num_examples = t.count(ctx, "eval_num_examples", 0, 0);
    let eval_mmd_samples = t.count(ctx, "eval_mmd_samples", 0, 0);
    let eval_mmd_fallback_ntrain = t.count(ctx, "eval_mmd_fallback_ntrain", 0, 0);
    let eval_strategy = t.choice(ctx, "eval_strategy", "epoch", &["epoch", "steps", "none"]);
    let eval_num_steps = t.count(ctx, "eval_num_steps", 0, 0);
    if eval_strategy == "steps" && eval_num_steps == 0 {
        ctx.error(
            "training.eval_strategy",
            "`training.eval_strategy` = \"steps\" needs `training.eval_num_steps` > 0",
        )
        .help = Some("add `eval_num_steps = 100` (optimizer updates between evaluations)".into());
    }
    let eval_batch_size = t
        .count_opt(ctx, "eval_batch_size", 0)
        .filter(|b| *b > 0)
        .or(eval_batch_size_ds)
        .unwrap_or(batch_size);
    let initial_eval = t.bool_or(ctx, "initial_eval", true);
    t.finish(
        ctx,
        &[
            (
                "ema_use_warmup",
                "the reference reads `ema_use_ema_warmup` (default true); use that",
            ),
            (
                "eval_gen_seed",
                "the reference never reads it; evaluation sampling is seeded from `training.seed`",
            ),
        ],
    );

    let l = root.section(ctx, "logging");
    let tensorboard = l.bool_or(ctx, "tensorboard", false);
    let log_dir = nonempty(l.string(ctx, "log_dir"));
    let wandb_project = nonempty(l.string(ctx, "wandb_project"));
    let wandb_entity = nonempty(l.string(ctx, "wandb_entity"));
    let run_name = nonempty(l.string(ctx, "run_name"));
    l.finish(ctx, &[]);

    let i = root.section(ctx, "inference");
    let denoising_steps = i.count(ctx, "denoising_steps", 50, 1);
    let cfg_scale = i.float_in(ctx, "cfg_scale", 7.5, 0.0, 100.0);
    let sampler = i.choice(
        ctx,
        "sampler",
        if prediction_type == "vector_field" {
            "euler"
        } else {
            "ddim"
        },
        &["euler", "ddim", "heun", "dpmpp_2m"],
    );
    let guidance = i.choice(ctx, "guidance", "cfg", &["cfg", "rectified_cfg_pp"]);
    i.finish(ctx, &[]);
    root.finish(ctx, &[]);

    // Cross-field rules.
    match conditioning.as_str() {
        "caption" if caption_column.is_none() => {
            ctx.error(
                "model.conditioning",
                "`model.conditioning` = \"caption\" needs `dataset.caption_column`",
            )
            .help = Some(
                "set `caption_column = \"caption\"` (the meta-dataset's caption column)".into(),
            );
        }
        "classes" => {
            if class_column.is_none() {
                ctx.error(
                    "model.conditioning",
                    "`model.conditioning` = \"classes\" needs `dataset.class_column`",
                )
                .help = Some("name the metadata column that holds the integer class".into());
            }
            if num_classes < 2 {
                ctx.error(
                    "model.conditioning",
                    "`model.conditioning` = \"classes\" needs `dataset.num_classes` of at least 2",
                )
                .help = Some("set `[dataset] num_classes = N`".into());
            }
        }
        "gend_hlth_age" => {
            for (k, v) in [
                ("gender_column", &gender_column),
                ("health_column", &health_column),
                ("age_column", &age_column),
            ] {
                if v.is_empty() {
                    ctx.error(&format!("dataset.{k}"), format!("`model.conditioning` = \"gend_hlth_age\" needs a non-empty `dataset.{k}`"));
                }
            }
        }
        _ => {}
    }
    if conditioning == "none"
        && cfg_dropout > 0.0
        && ctx.loc("model.extras.cfg_dropout").is_some()
        && name_m != "dit"
    {
        ctx.diags.push(crate::diag::Diagnostic::warning(
            ctx.loc("model.extras.cfg_dropout"),
            "`cfg_dropout` has no effect without conditioning",
        ));
    }
    if lora_enabled && pretrained.is_none() {
        ctx.error(
            "model.lora.enabled",
            "LoRA adapts a pretrained model, but `model.pretrained` is not set",
        )
        .help = Some(
            "set `model.pretrained` to a local model directory, or disable `[model.lora]`".into(),
        );
    }
    if latent_space
        && vae.is_none()
        && !settings.hf_models.contains_key("stable_diffusion_model_id")
    {
        ctx.error(
            "model.extras.latent_space",
            "latent-space training needs a VAE: set `model.extras.vae` (a local directory)",
        );
    }
    if is_sd
        && !latent_space
        && ctx
            .loc_any(&["model.extras.latent_space", "model.latent_space"])
            .is_some()
    {
        ctx.error(
            "model.extras.latent_space",
            "Stable Diffusion models always train in their VAE's latent space",
        );
    }
    if name_m == "stable-diffusion-v1-5" && prediction_type != "epsilon" {
        ctx.error(
            "objective.prediction_type",
            "stable-diffusion-v1-5 is an epsilon-prediction model",
        );
    }
    if ts && name_m == "stable-diffusion-v1-5" {
        ctx.error(
            "model.name",
            "stable-diffusion-v1-5 cannot model time series",
        );
    }
    if prediction_type == "vector_field" && objective_scheduler != "flow_match_euler" {
        ctx.error("objective.scheduler", format!("`objective.scheduler` = \"{objective_scheduler}\" is a DDPM/DDIM noise schedule, but `prediction_type` = \"vector_field\" trains a rectified flow"))
            .help = Some("use `scheduler = \"flow_match_euler\"`, or an epsilon/sample objective".into());
    }
    if prediction_type != "vector_field" && objective_scheduler == "flow_match_euler" {
        ctx.error("objective.scheduler", format!("`flow_match_euler` needs `prediction_type` = \"vector_field\", not \"{prediction_type}\""));
    }
    if prediction_type == "vector_field"
        && sampler == "ddim"
        && ctx.loc("inference.sampler").is_some()
    {
        ctx.error(
            "inference.sampler",
            "the DDIM sampler needs an epsilon or sample objective",
        );
    }
    if prediction_type != "vector_field"
        && sampler == "euler"
        && ctx.loc("inference.sampler").is_some()
    {
        ctx.error(
            "inference.sampler",
            "the flow Euler sampler needs `prediction_type` = \"vector_field\"",
        );
    }
    if guidance == "rectified_cfg_pp" && prediction_type != "vector_field" {
        ctx.error("inference.guidance", "Rectified-CFG++ guides a rectified flow: it needs `prediction_type` = \"vector_field\"");
    }
    if !latent_space && !is_sd && !ts && in_channels != 3 && in_channels != 1 {
        ctx.error("model.extras.in_channels", format!("pixel-space spectrograms have 3 channels (diffusion reads every output type as RGB), not {in_channels}"));
    }
    if !latent_space && !is_sd && !ts && in_channels == 1 {
        ctx.error(
            "model.extras.in_channels",
            "pixel-space spectrograms are read as RGB: `in_channels` must be 3",
        )
        .help = Some(format!(
            "output type \"{output_type}\" is converted to 3 channels, as the reference does"
        ));
    }
    if ts {
        for (key, on) in [("center_crop", center_crop), ("random_flip", random_flip)] {
            if on {
                ctx.error(&format!("dataset.{key}"), format!("`{key}` transforms images; time series are read whole (every sample must be {n_eeg_channels} × {sequence_length})"))
                    .help = Some(format!("remove `{key}`, or use `dataset.extras.gaussian_noise_std` to augment time series"));
            }
        }
    } else if gaussian_noise_std > 0.0 {
        ctx.error("dataset.extras.gaussian_noise_std", "`gaussian_noise_std` adds noise to time series (x + N(0, std²)); spectrograms are augmented by `random_flip` and random crops")
            .help = Some("remove it, or train on time series (`data_type = \"timeseries\"`)".into());
    }
    if ts && in_channels != 1 && !latent_space {
        ctx.error("model.extras.in_channels", format!("time series enter the model as (1, {n_eeg_channels}, {sequence_length}): `in_channels` must be 1"));
    }
    if in_channels != out_channels {
        ctx.error("model.extras.out_channels", format!("`out_channels` = {out_channels} must equal `in_channels` = {in_channels}: the model predicts a tensor shaped like its input"));
    }
    if name_m == "dit" {
        let hw = if ts {
            [n_eeg_channels, sequence_length]
        } else {
            [resolution, resolution]
        };
        if !ts && sample_size != resolution && !latent_space {
            ctx.error("model.sample_size", format!("`model.sample_size` = {sample_size} must equal `dataset.resolution` = {resolution} for pixel-space DiT"))
                .help = Some(format!("set `sample_size = {resolution}` (the reference's baseline preset has this bug)"));
        }
        let grid = if latent_space {
            [sample_size, sample_size]
        } else {
            hw
        };
        for (axis, (n, p)) in ["height", "width"]
            .iter()
            .zip(grid.iter().zip(patch_size.iter()))
        {
            if n % p != 0 {
                ctx.error(
                    "model.extras.patch_size",
                    format!("the input {axis} {n} is not divisible by the patch size {p}"),
                )
                .help = Some(format!("choose a patch size that divides {n}"));
            }
        }
    }
    if matches!(name_m.as_str(), "hourglass" | "localmamba") {
        let levels = if name_m == "hourglass" {
            &widths
        } else {
            &dims
        };
        if levels.len() != depths.len() {
            let key = if name_m == "hourglass" {
                "model.extras.widths"
            } else {
                "model.extras.dims"
            };
            ctx.error(key, format!("{} levels in `{key}` but {} in `model.extras.depths`: give one depth per level", levels.len(), depths.len()));
        }
        // Attention heads of 64 channels each (the reference's d_head) must tile every width.
        let head = 64;
        if name_m == "hourglass" {
            if let Some(w) = widths.iter().find(|w| !w.is_multiple_of(head)) {
                ctx.error("model.extras.widths", format!("width {w} in `model.extras.widths` is not divisible by the attention head size {head}"))
                    .help = Some("use multiples of 64, e.g. [64, 128, 256]".into());
            }
        }
        if name_m == "hourglass" && !attention.is_empty() && attention.len() != widths.len() {
            ctx.error(
                "model.extras.attention",
                "`model.extras.attention` needs one entry per level",
            );
        }
    }
    if matches!(name_m.as_str(), "dit" | "stable-diffusion-3.5-medium")
        && !(num_attention_heads * attention_head_dim).is_multiple_of(2)
    {
        ctx.error(
            "model.extras.attention_head_dim",
            "heads × head_dim must be even (2-D sin-cos positions split the width in halves)",
        );
    }
    if cfg_scale < 1.0 && ctx.loc("inference.cfg_scale").is_some() {
        ctx.error(
            "inference.cfg_scale",
            format!("`inference.cfg_scale` = {cfg_scale} is below 1; 1 means no guidance"),
        );
    }

    let diff = Diffusion {
        dataset: DiffDataset {
            name,
            train_split,
            val_split,
            batch_size,
            eval_batch_size,
            num_workers,
            resolution,
            cache_dir,
            center_crop,
            random_flip,
            image_column,
            caption_column,
            class_column,
            gender_column,
            health_column,
            age_column,
            num_classes: if conditioning == "gend_hlth_age" {
                4
            } else {
                num_classes
            },
            dataset_type,
            max_train_samples,
            max_eval_samples,
            n_eeg_channels,
            sequence_length,
            gaussian_noise_std,
        },
        model: DiffModel {
            name: name_m,
            conditioning,
            pretrained,
            revision,
            sample_size,
            vae_tiling,
            lora_enabled,
            lora_rank,
            lora_alpha,
            lora_dropout,
            lora_target_modules,
            lora_bias,
            lora_scaling,
            latent_space,
            vae,
            in_channels,
            out_channels,
            cfg_dropout,
            num_classes,
            num_attention_heads,
            attention_head_dim,
            num_layers,
            patch_size,
            widths,
            depths,
            dims,
            d_state,
            scan_directions,
            attention,
            mapping_width,
            mapping_depth,
            dropout,
            attention_bias,
            activation_fn,
            norm_elementwise_affine,
            norm_eps,
        },
        prediction_type,
        objective_scheduler,
        num_timesteps,
        optimizer,
        scheduler,
        training: DiffTraining {
            seed,
            output_dir,
            mixed_precision,
            gradient_checkpointing,
            gradient_accumulation_steps,
            epochs,
            max_train_steps,
            log_every_steps,
            checkpoint_interval,
            checkpoint_total_limit,
            resume,
            gradient_clip_norm,
            ema_decay,
            ema_power,
            ema_inv_gamma,
            ema_update_after_step,
            ema_use_ema_warmup,
            allow_tf32,
            compile_model,
            compile_mode,
            snr_gamma,
            eval_num_examples,
            eval_mmd_samples,
            eval_mmd_fallback_ntrain,
            eval_strategy,
            eval_num_steps,
            eval_batch_size,
            initial_eval,
        },
        tensorboard,
        log_dir,
        wandb_project,
        wandb_entity,
        run_name,
        denoising_steps,
        cfg_scale,
        sampler,
        guidance,
        dataset_is_timeseries: ts,
    };
    (diff, output_type, data_type)
}
