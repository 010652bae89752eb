//! The config crate: schema, settings resolution, validation with TOML locations, shape plans
//! and code generation. It never depends on Candle, so the build script stays fast to compile.
//!
//! Flow: [`resolve`] reads a training config and its settings chain, validates every key and
//! every cross-field rule, checks that this build can honour the config ([`Target`]) and
//! computes the shape [`plan::Plan`]. `codegen::generate` (feature `codegen`) turns the result into the Rust source
//! of a trainer. build.rs, the `trainer!` macro and `sigdiff validate` all go through here, so they
//! report the same errors.

pub mod choice;
#[cfg(feature = "codegen")]
pub mod codegen;
pub mod cuda;
pub mod diag;
pub mod literal;
pub mod plan;
pub mod pretrained;
pub mod schema;
pub mod settings;
mod support;
pub use support::{dit_linear_layers, mmdit_linear_layers, unet_linear_layers};
pub mod tree;

use std::path::{Path, PathBuf};

use choice::{DataType, DiffusionModel, OutputType, PolarLayout};
use diag::{ConfigError, Diagnostic, Diagnostics, Loc, Sources};
use literal::literal;
use schema::{Classification, Diffusion};
use settings::{Env, Settings};
use tree::{Ctx, Section};

/// What the binary being built can do; configs that need more are rejected at build time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Target {
    pub cuda: bool,
}

// One value per resolution: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "trainer", rename_all = "lowercase")]
pub enum Kind {
    Classification(Classification),
    Diffusion(Diffusion),
}

/// A resolved, validated config: what the trainer runs with, and what the build needs besides.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub sources: Sources,
    /// Warnings, rendered (keys that have no effect, and similar).
    pub warnings: Vec<String>,
    /// The root bare `[settings].config` paths were resolved against.
    pub project_root: PathBuf,
    /// The Hugging Face cache pretrained models were looked up in.
    pub hub_cache: Option<PathBuf>,
    /// The config file's stem: the trainer binary is `train-<stem>`.
    pub stem: String,
    pub config: Config,
    pub plan: Option<plan::Plan>,
}

literal! {
    /// Every value a trainer runs with, resolved: the generated pipeline.rs states it as Rust
    /// (`codegen`), `--print-config` prints it and each run records it.
    #[derive(Debug, Clone, serde::Serialize)]
    pub struct Config {
        /// The training config file.
        #[serde(rename = "config")]
        pub path: PathBuf = "the training config",
        #[serde(rename = "run")]
        pub kind: Kind = "",
        pub output_type: OutputType = "data.output_type",
        pub data_type: DataType = "data.data_type",
        pub polar_layout: PolarLayout = "data.polar_layout",
        pub settings: Settings = "",
    }
}

impl literal::Literal for Kind {
    fn literal(&self, at: &literal::At) -> String {
        match self {
            Kind::Classification(c) => format!("Kind::Classification({})", c.literal(at)),
            Kind::Diffusion(d) => format!("Kind::Diffusion({})", d.literal(at)),
        }
    }
}

impl Config {
    /// As JSON, keys sorted (what `--print-config` shows, each run records and resume compares).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.to_value()).expect("plain data serializes")
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("plain data serializes")
    }

    /// The values that differ from `old` (another config's [`Config::to_value`], e.g. the one a
    /// checkpoint was written with), by dotted key, lists compared whole.
    pub fn differences(&self, old: &serde_json::Value) -> Vec<Difference> {
        let mut out = vec![];
        diff_values("", old, &self.to_value(), &mut out);
        out
    }
}

/// A value that differs between two configs.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// The key: a TOML key for the training config's values (`training.epochs`), `settings.*`
    /// for the settings file's, `config` for the file's path.
    pub key: String,
    pub old: String,
    pub new: String,
    /// Whether a run may not continue across it: it changes what the parameters, the optimizer
    /// state or the position in the data mean (the model, the tasks, the input's shape and
    /// kind, the batch size and accumulation, the optimizer, the objective).
    pub structural: bool,
}

fn diff_values(
    key: &str,
    old: &serde_json::Value,
    new: &serde_json::Value,
    out: &mut Vec<Difference>,
) {
    use serde_json::Value::Object;
    match (old, new) {
        (Object(a), Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let null = serde_json::Value::Null;
                // The run's sections are the training config's own, at the top: `run.training.epochs`
                // is `training.epochs`.
                let child = match (key, k.as_str()) {
                    ("", "run") => String::new(),
                    ("", _) => k.clone(),
                    _ => format!("{key}.{k}"),
                };
                diff_values(
                    &child,
                    a.get(k).unwrap_or(&null),
                    b.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        (a, b) if a != b => out.push(Difference {
            key: key.to_string(),
            old: a.to_string(),
            new: b.to_string(),
            structural: is_structural(key),
        }),
        _ => {}
    }
}

/// See [`Difference::structural`].
fn is_structural(key: &str) -> bool {
    const KEYS: &[&str] = &[
        "tasks",
        "data_type",
        "output_type",
        "polar_layout",
        "dataset_is_timeseries",
        "dataset.tasks",
        "dataset.resolution",
        "dataset.batch_size",
        "dataset.n_eeg_channels",
        "dataset.sequence_length",
        "training.gradient_accumulation_steps",
        "optimizer.name",
        "objective.prediction_type",
        "objective.scheduler",
        "objective.num_timesteps",
    ];
    key.starts_with("model.") || key.starts_with("tasks.") || KEYS.contains(&key)
}

/// Keys a compiled trainer accepts in `--set`: run-time paths and scalars that change no shape,
/// type or code path. Everything else is baked in.
pub const OVERRIDABLE: &[&str] = &[
    "dataset.name",
    "dataset.train_split",
    "dataset.val_split",
    "dataset.test_split",
    "dataset.num_workers",
    "dataset.shuffle",
    "dataset.pin_memory",
    "dataset.cache_dir",
    "dataset.image_column",
    "optimizer.learning_rate",
    "optimizer.weight_decay",
    "optimizer.betas",
    "optimizer.eps",
    "optimizer.momentum",
    "scheduler.warmup_steps",
    "scheduler.kwargs.min_lr_ratio",
    "scheduler.kwargs.num_cycles",
    "scheduler.min_lr_ratio",
    "scheduler.num_cycles",
    "training.epochs",
    "training.max_steps",
    "training.clip_grad_norm",
    "training.log_every_batches",
    "training.eval_strategy",
    "training.eval_steps",
    "training.output_dir",
    "training.log_dir",
    "training.tensorboard",
    "training.mlflow",
    "training.wandb_project",
    "training.wandb_entity",
    "training.wandb_tags",
    "training.histogram_every_batches",
    "training.run_name",
    "training.checkpoint_total_limit",
    "training.checkpoint_strategy",
    "training.checkpoint_steps",
    "training.metrics_summary_path",
    "training.max_best_checkpoints",
    "training.early_stopping_patience",
    "training.label_smoothing",
    "training.class_weights",
    "training.seed",
    "training.resume",
    "training.device",
    "training.use_amp",
    "training.mixed_precision",
    "training.task_weights.*",
];

pub fn is_overridable(key: &str) -> bool {
    OVERRIDABLE.iter().any(|k| match k.strip_suffix(".*") {
        Some(prefix) => key
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.') && rest.len() > 1),
        None => *k == key,
    })
}

/// Resolve and validate the training config at `path` (relative paths against `env.project_root`).
pub fn resolve(path: &Path, env: &Env, target: Target) -> Result<Resolved, ConfigError> {
    resolve_with(path, env, target, &[])
}

/// Like [`resolve`], with `--set key=value` overrides applied to the training config first.
pub fn resolve_with(
    path: &Path,
    env: &Env,
    target: Target,
    sets: &[(String, String)],
) -> Result<Resolved, ConfigError> {
    resolve_any(path, env, Some(target), sets)
}

/// Validate a config and compute its plan without asking whether this build can train it
/// (for plans and parameter counts of models whose trainer is not built yet).
pub fn plan_unchecked(path: &Path, env: &Env) -> Result<Resolved, ConfigError> {
    resolve_any(path, env, None, &[])
}

fn resolve_any(
    path: &Path,
    env: &Env,
    target: Option<Target>,
    sets: &[(String, String)],
) -> Result<Resolved, ConfigError> {
    let mut sources = Sources::default();
    let mut ctx = Ctx::default();
    let full = settings::normalize(&env.project_root.join(path));
    let result = resolve_inner(&mut sources, &mut ctx, env, target, &full, sets);
    match result {
        Some(r) if !ctx.diags.has_errors() => Ok(Resolved {
            warnings: ctx.diags.warnings().map(|d| d.render(&sources)).collect(),
            sources,
            ..r
        }),
        _ => {
            if !ctx.diags.has_errors() {
                ctx.diags
                    .error(None, format!("cannot resolve `{}`", path.display()));
            }
            Err(ConfigError {
                sources,
                diagnostics: ctx.diags,
            })
        }
    }
}

fn resolve_inner(
    sources: &mut Sources,
    ctx: &mut Ctx,
    env: &Env,
    target: Option<Target>,
    path: &Path,
    sets: &[(String, String)],
) -> Option<Resolved> {
    let target_checks = target.is_some();
    let target = target.unwrap_or_default();
    let mut table = settings::read_file(sources, ctx, env, path, None, "training config")?;
    let main_file = sources.files.len() - 1;
    apply_sets(sources, ctx, &mut table, sets);
    if ctx.diags.has_errors() {
        return None;
    }
    let top = Loc {
        file: main_file,
        span: 0..0,
    };
    let root = Section::root(&table);

    let s = root.section(ctx, "settings");
    let trainer = s.choice(ctx, "trainer", "", &["classification", "diffusion"]);
    if !s.has("trainer") {
        ctx.diags.push(
            Diagnostic::error(
                s.loc().or(Some(top.clone())),
                "`settings.trainer` is required",
            )
            .help(
                "add `[settings]` with `trainer = \"classification\"` or `trainer = \"diffusion\"`",
            ),
        );
    }
    let settings_path = match s.string(ctx, "config") {
        Some(raw) => {
            let loc = ctx.loc("settings.config").expect("just read");
            (
                settings::resolve_config_ref(env, sources, &raw, &loc),
                Some(loc),
            )
        }
        None => {
            let p = match &env.settings_override {
                Some(p) => settings::normalize(&env.project_root.join(env.expand_home(p))),
                None => env.project_root.join("config/default.toml"),
            };
            (p, s.loc().or(Some(top.clone())))
        }
    };
    s.finish(ctx, &[]);
    let (settings_table, files) =
        settings::load_chain(sources, ctx, env, settings_path.0, settings_path.1)?;
    let settings = settings::read(sources, ctx, env, &settings_table, files);

    let (kind, data) = match trainer.as_str() {
        "classification" => {
            let (c, data) = schema::read_classification(&root, ctx, &settings);
            (Kind::Classification(c), data)
        }
        "diffusion" => {
            let (c, data) = schema::read_diffusion(&root, ctx, &settings, (env, sources));
            (Kind::Diffusion(c), data)
        }
        _ => return None,
    };
    if ctx.diags.has_errors() {
        return None;
    }
    let plan = match &kind {
        Kind::Classification(c) => Some(plan::classification(c)),
        Kind::Diffusion(d) if d.model.name == DiffusionModel::Dit => Some(plan::dit(d)),
        Kind::Diffusion(d) if d.model.name == DiffusionModel::Hourglass => Some(plan::hourglass(d)),
        Kind::Diffusion(d) if d.model.unet_config.is_some() => Some(plan::unet(d)),
        Kind::Diffusion(d) if d.model.mmdit_config.is_some() => Some(plan::mmdit(d)),
        Kind::Diffusion(d) if d.model.name == DiffusionModel::LocalMamba => {
            Some(plan::localmamba(d))
        }
        Kind::Diffusion(_) => None,
    };
    let plan = match (plan, &kind) {
        (Some(mut p), Kind::Diffusion(d)) => {
            p.pretrained = plan::pretrained_lines(d);
            // LoRA: the weights need neither gradients nor AdamW moments (12 of their 16 bytes).
            if d.model.lora_enabled {
                p.frozen = true;
                p.memory_bytes -= 12 * p.params;
            } else {
                p.with_optimizer(d.optimizer.name);
            }
            Some(p)
        }
        (Some(mut p), Kind::Classification(c)) => {
            p.with_optimizer(c.optimizer.name);
            Some(p)
        }
        (p, _) => p,
    };
    if target_checks {
        support::check_support(ctx, &kind, target);
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Some(Resolved {
        sources: Sources::default(),
        warnings: vec![],
        project_root: env.project_root.clone(),
        hub_cache: env.hub_cache.clone(),
        stem,
        config: Config {
            path: path.to_path_buf(),
            settings,
            output_type: data.output_type,
            data_type: data.data_type,
            polar_layout: data.polar_layout,
            kind,
        },
        plan,
    })
}

/// Apply `--set key=value` to the training config's tree. Each value is its own source, so an
/// error in it points at the override, not at the file.
fn apply_sets(
    sources: &mut Sources,
    ctx: &mut Ctx,
    table: &mut tree::Table,
    sets: &[(String, String)],
) {
    for (key, value) in sets {
        let id = sources.add(format!("--set {key}"), None, value.clone());
        let loc = Loc {
            file: id,
            span: 0..value.len(),
        };
        if !is_overridable(key) {
            ctx.diags.push(
                Diagnostic::error(Some(loc), format!("`{key}` is structural: it is compiled into this trainer"))
                    .help("change it in the TOML and rebuild with `SD_CONFIG=<file> cargo build --release`"),
            );
            continue;
        }
        // A bare word is taken as a string, so `--set training.run_name=exp1` works unquoted.
        let node = match tree::parse_value(sources, id) {
            Ok(n) => n,
            Err(_) => tree::Node {
                value: tree::Value::Str(value.clone()),
                loc: loc.clone(),
            },
        };
        let parts: Vec<&str> = key.split('.').collect();
        if let Err(e) = table.set_path(&parts, node, loc.clone()) {
            ctx.diags
                .error(Some(loc), format!("cannot set `{key}`: {e}"));
        }
    }
}

/// Load a settings file and its chain on its own (for `sigdiff preprocess`): an explicit path,
/// else `SIGNAL_DIFFUSION_CONFIG`, else `config/default.toml` under the project root.
pub fn load_settings(path: Option<&Path>, env: &Env) -> Result<Settings, ConfigError> {
    let mut sources = Sources::default();
    let mut ctx = Ctx::default();
    let file = match (path, &env.settings_override) {
        (Some(p), _) => {
            settings::normalize(&env.project_root.join(env.expand_home(&p.to_string_lossy())))
        }
        (None, Some(p)) => settings::normalize(&env.project_root.join(env.expand_home(p))),
        (None, None) => env.project_root.join("config/default.toml"),
    };
    let loaded = settings::load_chain(&mut sources, &mut ctx, env, file, None)
        .map(|(table, files)| settings::read(&sources, &mut ctx, env, &table, files));
    match loaded {
        Some(s) if !ctx.diags.has_errors() => Ok(s),
        _ => Err(ConfigError {
            sources,
            diagnostics: ctx.diags,
        }),
    }
}

/// A config error rendered for a terminal (every error, then warnings count).
pub fn render(err: &ConfigError) -> String {
    err.render_errors()
}

/// Diagnostics as they go to cargo: one headline per diagnostic plus its snippet lines.
pub fn render_lines(sources: &Sources, diags: &Diagnostics) -> Vec<String> {
    diags
        .list
        .iter()
        .flat_map(|d| {
            d.render(sources)
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod difference_tests {
    use super::*;

    fn quickstart(sets: &[(&str, &str)]) -> Config {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf();
        let env = Env::isolated(root);
        let sets: Vec<(String, String)> = sets
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let path = Path::new("config/classification/quickstart.toml");
        resolve_with(path, &env, Target::default(), &sets)
            .unwrap()
            .config
    }

    #[test]
    fn differences_name_the_toml_keys_and_which_are_structural() {
        let old = quickstart(&[]).to_value();
        assert_eq!(quickstart(&[]).differences(&old), vec![]);
        let new = quickstart(&[
            ("training.epochs", "9"),
            ("optimizer.learning_rate", "0.01"),
        ]);
        let keys: Vec<(String, bool)> = new
            .differences(&old)
            .into_iter()
            .map(|d| (d.key, d.structural))
            .collect();
        assert_eq!(
            keys,
            [
                ("optimizer.learning_rate".into(), false),
                ("training.epochs".into(), false)
            ]
        );
        let mut changed = old.clone();
        changed["run"]["model"]["embedding_dim"] = 128.into();
        changed["run"]["dataset"]["batch_size"] = 4.into();
        let d = quickstart(&[]).differences(&changed);
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|d| d.structural), "{d:?}");
        assert_eq!(d[0].key, "dataset.batch_size");
        assert_eq!((d[0].old.as_str(), d[0].new.as_str()), ("4", "16"));
        assert_eq!(d[1].key, "model.embedding_dim");
    }
}
