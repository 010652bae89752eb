//! The classification trainer's config: its sections, the task registry and `read_classification`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::choice::{
    Activation, Backbone, CheckpointStrategy, Choice, ClassWeights, CompileMode, DataType, Device,
    EvalStrategy, LrSchedule, OptimizerName, OutputType, Pooling,
};
use crate::literal::literal;
use crate::settings::Settings;
use crate::tree::{Ctx, Section};

use super::{read_data_overrides, read_optimizer, read_scheduler, Optimizer, Scheduler};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TaskKind {
    Classification,
    Regression,
}

impl crate::literal::Literal for TaskKind {
    fn literal(&self, _: &crate::literal::At) -> String {
        format!("TaskKind::{self:?}")
    }
}

literal! {
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
}

literal! {
    #[derive(Debug, Clone, Serialize)]
    pub struct ClsDataset {
        pub name: String,
        /// Named dataset from `[datasets.*]` (its `output` dir) or a path.
        pub path: std::path::PathBuf = "dataset.name (its directory)",
        pub named: Option<String> = "dataset.name (a [datasets.*] entry)",
        pub tasks: Vec<String>,
        pub train_split: String,
        pub val_split: String,
        pub test_split: String,
        pub batch_size: usize,
        pub num_workers: usize,
        pub pin_memory: bool,
        pub shuffle: bool,
        pub n_eeg_channels: usize = "dataset.extras.n_eeg_channels",
        pub sequence_length: usize = "dataset.extras.sequence_length",
        pub resolution: usize,
    }
}

literal! {
    #[derive(Debug, Clone, Serialize)]
    pub struct ClsModel {
        pub backbone: Backbone,
        pub input_channels: usize,
        pub embedding_dim: usize,
        pub dropout: f64,
        pub activation: Activation,
        pub depth: usize,
        pub layer_repeats: usize,
        /// Transformer extras (reference names): hidden_dim, num_layers, num_heads, ff_dim, pooling.
        pub hidden_dim: usize = "model.extras.hidden_dim",
        pub num_layers: usize = "model.extras.num_layers",
        pub num_heads: usize = "model.extras.num_heads",
        pub ff_dim: usize = "model.extras.ff_dim",
        pub pooling: Pooling = "model.extras.pooling",
        pub patch_size: usize = "model.extras.patch_size",
        /// The reference's required transformer sizes, checked against the data's tokens.
        pub input_dim: Option<usize> = "model.extras.input_dim",
        pub seq_length: Option<usize> = "model.extras.seq_length",
    }
}

literal! {
    #[derive(Debug, Clone, Serialize)]
    pub struct ClsTraining {
        pub epochs: usize,
        pub max_steps: Option<usize>,
        pub clip_grad_norm: Option<f64>,
        pub device: Device,
        pub log_every_batches: usize,
        pub eval_strategy: EvalStrategy,
        pub eval_steps: Option<usize>,
        pub output_dir: Option<String>,
        pub log_dir: Option<String>,
        pub tensorboard: bool,
        /// An MLflow file-store run (runtime track/mlflow.rs).
        pub mlflow: bool,
        pub wandb_project: Option<String>,
        pub wandb_entity: Option<String>,
        pub wandb_tags: Vec<String>,
        /// Parameter and gradient histograms every N optimizer steps (0: never).
        pub histogram_every_batches: usize,
        pub run_name: Option<String>,
        pub checkpoint_total_limit: Option<usize>,
        pub checkpoint_strategy: CheckpointStrategy,
        pub checkpoint_steps: Option<usize>,
        pub use_amp: bool,
        pub metrics_summary_path: Option<String>,
        pub max_best_checkpoints: usize,
        pub early_stopping: bool,
        pub early_stopping_patience: usize,
        pub compile_model: bool,
        pub compile_mode: CompileMode,
        pub swa_enabled: bool,
        pub swa_extra_ratio: f64,
        pub swa_lr_frac: f64,
        pub label_smoothing: f64,
        pub class_weights: ClassWeights,
        pub seed: u64,
        pub resume: Option<String>,
    }
}

literal! {
    #[derive(Debug, Clone, Serialize)]
    pub struct Classification {
        /// `spectrogram` or `timeseries`, after the `[data]` override.
        pub data_type: DataType = "data.data_type",
        pub dataset: ClsDataset,
        pub model: ClsModel,
        pub tasks: Vec<Task>,
        pub optimizer: Optimizer,
        pub scheduler: Scheduler,
        pub training: ClsTraining,
    }
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
        (Some("mit"), "seizure") => Some((Classification, 2, "seizure", "bool")),
        (Some("mit"), "mit_condition") => Some((Classification, 4, "mit_condition", "int")),
        _ => None,
    }
}

fn registry_names(dataset: Option<&str>) -> Vec<&'static str> {
    let extra: &[&str] = match dataset {
        Some("seed") => &["emotion", "seed_condition"],
        Some("math") => &["math_activity", "math_condition"],
        Some("parkinsons") => &["parkinsons_condition"],
        Some("longitudinal") => &["handedness"],
        Some("mit") => &["seizure", "mit_condition"],
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
) -> (Classification, super::Data) {
    let data = read_data_overrides(root, ctx, settings);
    let (output_type, data_type) = (data.output_type, data.data_type);
    let dataset = read_dataset(root, ctx, settings, data_type);
    let model_present = root.has("model");
    let model = read_model(root, ctx);
    let optimizer = read_optimizer(
        root,
        ctx,
        &[
            OptimizerName::AdamW,
            OptimizerName::Adam,
            OptimizerName::Sgd,
        ],
        3e-4,
        1e-4,
    );
    let scheduler = read_scheduler(
        root,
        ctx,
        &[LrSchedule::Constant, LrSchedule::Linear, LrSchedule::Cosine],
    );
    let (training, weights) = read_training(root, ctx, &dataset.tasks);
    let declared = read_declared_tasks(root, ctx);
    root.finish(ctx, &[]);
    let tasks = resolve_tasks(ctx, &dataset, &declared, &weights);
    let cls = Classification {
        data_type,
        dataset,
        model,
        tasks,
        optimizer,
        scheduler,
        training,
    };
    check_shapes(ctx, &cls, output_type, model_present);
    (cls, data)
}

/// `[dataset]`: where the samples are (a `[datasets.*]` name of the settings file, or a path),
/// the tasks, splits and loader settings.
fn read_dataset(
    root: &Section,
    ctx: &mut Ctx,
    settings: &Settings,
    data_type: DataType,
) -> ClsDataset {
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
    let (path, named) = super::dataset_dir(settings, &name, data_type);
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
    if d.has("pin_memory") {
        ctx.warn(
            "dataset.pin_memory",
            "`dataset.pin_memory` has no effect yet: batches are uploaded to a GPU from ordinary (pageable) memory, and a CPU run uploads nothing",
        )
        .help = Some("remove it; page-locked upload buffers are planned for CUDA builds".into());
    }
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
    ClsDataset {
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
    }
}

/// `[model]`: the backbone and its sizes (the transformer's under `[model.extras]`).
fn read_model(root: &Section, ctx: &mut Ctx) -> ClsModel {
    let m = root.section(ctx, "model");
    if !m.is_present() {
        ctx.diags.error(root.loc(), "missing section `[model]`");
    }
    let backbone = m.pick(ctx, "backbone", Backbone::CnnLight, Backbone::ALL);
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
    let activation = m.pick(ctx, "activation", Activation::Gelu, Activation::ALL);
    let depth = m.count(ctx, "depth", 3, 1);
    let layer_repeats = m.count(ctx, "layer_repeats", 2, 1);
    let mx = m.section(ctx, "extras");
    let hidden_dim = mx.count(ctx, "hidden_dim", 256, 1);
    let num_layers = mx.count(ctx, "num_layers", 4, 1);
    let num_heads = mx.count(ctx, "num_heads", 4, 1);
    let ff_dim = mx.count(ctx, "ff_dim", 512, 1);
    let pooling = mx.pick(ctx, "pooling", Pooling::Mean, Pooling::ALL);
    let patch_size = mx.count(ctx, "patch_size", 16, 1);
    // The reference requires these two for its transformer; ours derives them from the data shape
    // and checks them against it (check_shapes).
    let input_dim = mx.count_opt(ctx, "input_dim", 1);
    let seq_length = mx.count_opt(ctx, "seq_length", 1);
    mx.finish(ctx, &[]);
    if backbone != Backbone::Transformer {
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
    ClsModel {
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
        input_dim,
        seq_length,
    }
}

/// `[training]` and its `[training.task_weights]` (checked against the dataset's tasks).
fn read_training(
    root: &Section,
    ctx: &mut Ctx,
    task_names: &[String],
) -> (ClsTraining, BTreeMap<String, f64>) {
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
    let device = t.pick(ctx, "device", Device::Auto, Device::ALL);
    let log_every_batches = t
        .count_opt(ctx, "log_every_batches", 1)
        .or(t.count_opt(ctx, "log_every", 1))
        .unwrap_or(10);
    let eval_strategy = t.pick(ctx, "eval_strategy", EvalStrategy::Epoch, EvalStrategy::ALL);
    let eval_steps = t.count_opt(ctx, "eval_steps", 1);
    if eval_strategy == EvalStrategy::Steps && eval_steps.is_none() {
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
    let mlflow = t.bool_or(ctx, "mlflow", false);
    let wandb_project = opt_path(&t, ctx, "wandb_project");
    let wandb_entity = opt_path(&t, ctx, "wandb_entity");
    let wandb_tags = t.string_list(ctx, "wandb_tags").unwrap_or_default();
    let histogram_every_batches = t.count(ctx, "histogram_every_batches", 0, 0);
    let run_name = opt_path(&t, ctx, "run_name");
    let checkpoint_total_limit = t.count_opt(ctx, "checkpoint_total_limit", 1);
    let checkpoint_strategy = t.pick(
        ctx,
        "checkpoint_strategy",
        CheckpointStrategy::Epoch,
        CheckpointStrategy::ALL,
    );
    let checkpoint_steps = t.count_opt(ctx, "checkpoint_steps", 1);
    if checkpoint_strategy == CheckpointStrategy::Steps && checkpoint_steps.is_none() {
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
    if early_stopping && eval_strategy == EvalStrategy::None {
        ctx.error(
            "training.early_stopping",
            "`training.early_stopping` needs evaluations, but `eval_strategy` = \"none\"",
        );
    }
    let (compile_model, compile_mode) = super::read_compile_keys(&t, ctx, true);
    let swa_enabled = t.bool_or(ctx, "swa_enabled", false);
    let swa_extra_ratio = t.float_in(ctx, "swa_extra_ratio", 0.333, 1e-6, 10.0);
    let swa_lr_frac = t.float_in(ctx, "swa_lr_frac", 0.25, 1e-6, 10.0);
    let label_smoothing = t.float_in(ctx, "label_smoothing", 0.0, 0.0, 0.999);
    let class_weights = t.pick(ctx, "class_weights", ClassWeights::None, ClassWeights::ALL);
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
    let training = ClsTraining {
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
        mlflow,
        wandb_project,
        wandb_entity,
        wandb_tags,
        histogram_every_batches,
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
        class_weights,
        seed,
        resume,
    };
    (training, weights)
}

/// A task declared in `[tasks.NAME]`: (kind, outputs, column).
type Declared = BTreeMap<String, (TaskKind, usize, String)>;

/// `[tasks.NAME]`: user-declared tasks for any labelled dataset.
fn read_declared_tasks(root: &Section, ctx: &mut Ctx) -> Declared {
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
    declared
}

/// The dataset's tasks, each from its `[tasks.NAME]` declaration or the reference's registry,
/// with the reference's weight rule (an empty `task_weights`: 1/n each; else 1.0 by default).
fn resolve_tasks(
    ctx: &mut Ctx,
    dataset: &ClsDataset,
    declared: &Declared,
    weights: &BTreeMap<String, f64>,
) -> Vec<Task> {
    let task_names = &dataset.tasks;
    let ds_kind = dataset.named.as_deref();
    let n = task_names.len().max(1) as f64;
    let mut tasks = vec![];
    for name in task_names {
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
    tasks
}

/// Shape rules that the reference only finds at run time (or crashes on).
fn check_shapes(ctx: &mut Ctx, c: &Classification, output_type: OutputType, model_present: bool) {
    let data_type = c.data_type;
    let ClsModel {
        backbone,
        input_channels,
        embedding_dim,
        depth,
        hidden_dim,
        num_heads,
        patch_size,
        ..
    } = c.model;
    let (n_eeg_channels, resolution) = (c.dataset.n_eeg_channels, c.dataset.resolution);
    let t = &c.training;
    let (eval_steps, checkpoint_steps, early_stopping) =
        (t.eval_steps, t.checkpoint_steps, t.early_stopping);
    let (eval_strategy, checkpoint_strategy) = (t.eval_strategy, t.checkpoint_strategy);
    let is_1d = matches!(backbone, Backbone::Cnn1d | Backbone::Cnn1dLight);
    if is_1d && data_type != DataType::Timeseries {
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
    if !is_1d && backbone != Backbone::Transformer && data_type == DataType::Timeseries {
        ctx.error("model.backbone", format!("backbone `{backbone}` reads spectrogram images, but the data type is \"timeseries\""))
            .help = Some("use `cnn_1d` or `transformer` for time series".into());
    }
    if data_type == DataType::Spectrogram && model_present {
        let expected = if output_type == OutputType::DbOnly {
            1
        } else {
            3
        };
        if input_channels != expected && input_channels != 0 {
            ctx.error("model.input_channels", format!("`model.input_channels` = {input_channels}, but output type \"{output_type}\" images have {expected} channel{}", if expected == 1 { "" } else { "s" }))
                .help = Some(format!("set `input_channels = {expected}`"));
        }
    }
    if data_type == DataType::Timeseries
        && model_present
        && input_channels != n_eeg_channels
        && input_channels != 0
    {
        ctx.error("model.input_channels", format!("`model.input_channels` = {input_channels}, but time series have {n_eeg_channels} EEG channels (`dataset.extras.n_eeg_channels`)"));
    }
    if matches!(backbone, Backbone::CnnLight | Backbone::Cnn) {
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
    if backbone == Backbone::Transformer {
        if !hidden_dim.is_multiple_of(num_heads) {
            ctx.error("model.extras.num_heads", format!("`model.extras.hidden_dim` = {hidden_dim} is not divisible by `num_heads` = {num_heads}"));
        }
        if data_type == DataType::Spectrogram && !resolution.is_multiple_of(patch_size) {
            ctx.error("model.extras.patch_size", format!("resolution {resolution} is not divisible by `model.extras.patch_size` = {patch_size}"));
        }
        // The reference's (B, seq_length, input_dim) input: tokens and their size.
        let tokens = crate::plan::transformer_tokens(c);
        let what = match data_type {
            DataType::Timeseries => "one token per EEG channel, its samples as features",
            DataType::Spectrogram => "one token per patch, its pixels as features",
        };
        for (key, given, derived) in [
            ("seq_length", c.model.seq_length, tokens.tokens),
            ("input_dim", c.model.input_dim, tokens.token_dim),
        ] {
            if let Some(given) = given.filter(|g| *g != derived) {
                ctx.error(
                    &format!("model.extras.{key}"),
                    format!("`model.extras.{key}` = {given}, but the data gives the transformer {derived} ({what}: {} tokens of {})", tokens.tokens, tokens.token_dim),
                )
                .help = Some(format!("set `{key} = {derived}`, or remove it (it is derived from the data)"));
            }
        }
    }
    if let (Some(steps), Some(ck)) = (eval_steps, checkpoint_steps) {
        if early_stopping
            && eval_strategy == EvalStrategy::Steps
            && checkpoint_strategy == CheckpointStrategy::Steps
            && ck % steps != 0
        {
            ctx.error("training.checkpoint_steps", format!("with early stopping, `checkpoint_steps` = {ck} must be a multiple of `eval_steps` = {steps}"));
        }
    }

    if backbone == Backbone::Transformer {
        for k in ["depth", "layer_repeats"] {
            let key = format!("model.{k}");
            if ctx.loc(&key).is_some() {
                ctx.error(&key, format!("`{key}` does not apply to the transformer backbone"))
                    .help = Some("set its size with `[model.extras] num_layers`, `hidden_dim`, `num_heads`, `ff_dim`".into());
            }
        }
    }
}
