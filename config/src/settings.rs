//! The global settings file (`config/default.toml`): data roots, output type, per-dataset paths
//! and dB bounds.
//!
//! Resolution, as the reference does it, with two deliberate fixes:
//! - which file: the training config's `[settings].config`, else `SIGNAL_DIFFUSION_CONFIG`, else
//!   `config/default.toml` under the project root;
//! - chaining: a settings file may itself name a base with `[settings].config`; the base is read
//!   first and the child's keys win (tables merge key by key). Cycles are an error.
//! - relative paths: `./x` and `../x` are relative to the file that contains them (the reference
//!   drops the `./` and resolves against the data root: fixed on purpose); a bare relative path
//!   in `[settings].config` is relative to the project root (as the reference's CWD rule), and a
//!   bare dataset path is relative to `data.root` / `data.output_root`.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use crate::choice::{Choice, DataType, OutputType, PolarLayout};
use crate::diag::{Diagnostic, Loc, Sources};
use crate::literal::literal;
use crate::tree::{self, Ctx, Section, Table};

literal! {
    #[derive(Debug, Clone, serde::Serialize)]
    pub struct DatasetPaths {
        pub root: PathBuf,
        pub output: PathBuf,
        pub timeseries_output: PathBuf,
        pub min_db: Option<f64>,
        pub max_db: Option<f64>,
        /// CHB-MIT: at most this many background (non-seizure) windows per recording; 0 = all.
        pub max_background_windows: usize,
    }
}

literal! {
    #[derive(Debug, Clone, serde::Serialize)]
    pub struct Settings {
        /// The settings files of the chain, base first.
        pub files: Vec<PathBuf> = "settings.config (the chain, base first)",
        pub hf_models: BTreeMap<String, String>,
        pub data_root: PathBuf = "data.root",
        pub output_root: PathBuf = "data.output_root",
        pub max_sampling_weight: Option<f64> = "data.max_sampling_weight",
        pub output_type: OutputType = "data.output_type",
        pub data_type: DataType = "data.data_type",
        /// How `db-polar` images are written (`sigdiff preprocess`) and read.
        pub polar_layout: PolarLayout = "data.polar_layout",
        pub datasets: BTreeMap<String, DatasetPaths>,
    }
}

/// Where the environment points, captured once so resolution is a pure function of its inputs.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// `SIGNAL_DIFFUSION_CONFIG`, if set and non-empty.
    pub settings_override: Option<String>,
    pub home: Option<PathBuf>,
    /// Bare relative paths in `[settings].config` resolve here (the workspace root for builds,
    /// the current directory for `sigdiff validate`).
    pub project_root: PathBuf,
    /// When set, files are read from here instead of the disk: a compiled trainer re-resolves
    /// its config (for `--set`) from the texts it embedded at build time.
    pub embedded: Option<Vec<(PathBuf, String)>>,
    /// The Hugging Face hub cache pretrained models are looked up in (pretrained.rs).
    pub hub_cache: Option<PathBuf>,
}

impl Env {
    /// A project at `project_root` and nothing of the process's environment (no
    /// `SIGNAL_DIFFUSION_CONFIG`, no home directory): what tests and the presets check use.
    pub fn isolated(project_root: PathBuf) -> Self {
        Env {
            settings_override: None,
            home: None,
            project_root,
            embedded: None,
            hub_cache: None,
        }
    }

    pub fn from_process(project_root: PathBuf) -> Self {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        Env {
            settings_override: std::env::var("SIGNAL_DIFFUSION_CONFIG")
                .ok()
                .filter(|s| !s.is_empty()),
            hub_cache: crate::pretrained::hub_cache_from(
                |k| std::env::var(k).ok(),
                home.as_deref(),
            ),
            home,
            project_root,
            embedded: None,
        }
    }

    /// Whether `path` is a file (among the embedded ones, when re-resolving).
    pub fn is_file(&self, path: &Path) -> bool {
        match &self.embedded {
            None => path.is_file(),
            Some(files) => files.iter().any(|(p, _)| p == path),
        }
    }

    pub fn read(&self, path: &Path) -> std::io::Result<String> {
        match &self.embedded {
            None => std::fs::read_to_string(path),
            Some(files) => files
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "not among the files embedded at build time",
                    )
                }),
        }
    }

    pub fn expand_home(&self, p: &str) -> PathBuf {
        match (p.strip_prefix("~/"), &self.home) {
            (Some(rest), Some(home)) => home.join(rest),
            _ if p == "~" => self.home.clone().unwrap_or_else(|| PathBuf::from(p)),
            _ => PathBuf::from(p),
        }
    }
}

/// Remove `.` and fold `..` without touching the filesystem (no symlink resolution).
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

fn is_file_relative(raw: &str) -> bool {
    raw.starts_with("./") || raw.starts_with("../") || raw == "." || raw == ".."
}

/// The directory of the file a location points into.
fn dir_of(sources: &Sources, loc: &Loc) -> PathBuf {
    sources
        .get(loc.file)
        .path
        .as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A path to display: relative to the project root (with `..` where needed), so messages and
/// snapshots do not depend on where the checkout lives.
pub fn display_path(env: &Env, p: &Path) -> String {
    relative_to(&env.project_root, p).display().to_string()
}

/// `p` relative to `base` (with `..` where needed); absolute when they share only the root.
pub fn relative_to(base: &Path, p: &Path) -> PathBuf {
    if !p.is_absolute() || !base.is_absolute() {
        return p.to_path_buf();
    }
    let (b, t): (Vec<_>, Vec<_>) = (base.components().collect(), p.components().collect());
    let common = b.iter().zip(&t).take_while(|(x, y)| x == y).count();
    if common <= 1 {
        return p.to_path_buf(); // only the root in common: absolute reads better
    }
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    out
}

/// Resolve a `[settings].config` value written in the file of `loc`.
pub fn resolve_config_ref(env: &Env, sources: &Sources, raw: &str, loc: &Loc) -> PathBuf {
    let p = env.expand_home(raw);
    let p = if p.is_absolute() {
        p
    } else if is_file_relative(raw) {
        dir_of(sources, loc).join(p)
    } else {
        env.project_root.join(p)
    };
    normalize(&p)
}

/// Read one TOML file into `sources`, reporting a missing file at `referrer`.
pub fn read_file(
    sources: &mut Sources,
    ctx: &mut Ctx,
    env: &Env,
    path: &Path,
    referrer: Option<Loc>,
    what: &str,
) -> Option<Table> {
    let name = display_path(env, path);
    match env.read(path) {
        Ok(text) => {
            let id = sources.add(name, Some(path.to_path_buf()), text);
            match tree::parse(sources, id) {
                Ok(t) => Some(t),
                Err(d) => {
                    ctx.diags.push(d);
                    None
                }
            }
        }
        Err(e) => {
            let d = Diagnostic::error(referrer, format!("cannot read {what} `{name}`: {e}")).help("fix the path (`./` and `../` are relative to the file that names it, other relative paths to the project root) or create the file");
            ctx.diags.push(d);
            None
        }
    }
}

/// Load the settings chain starting at `path` and merge it, base first.
pub fn load_chain(
    sources: &mut Sources,
    ctx: &mut Ctx,
    env: &Env,
    path: PathBuf,
    referrer: Option<Loc>,
) -> Option<(Table, Vec<PathBuf>)> {
    let mut chain: Vec<(Table, PathBuf)> = vec![];
    let mut next = Some((path, referrer));
    while let Some((path, referrer)) = next.take() {
        if let Some(i) = chain.iter().position(|(_, p)| *p == path) {
            let cycle: Vec<String> = chain[i..]
                .iter()
                .map(|(_, p)| display_path(env, p))
                .chain(std::iter::once(display_path(env, &path)))
                .collect();
            ctx.diags.push(
                Diagnostic::error(
                    referrer,
                    format!("settings files form a cycle: {}", cycle.join(" -> ")),
                )
                .help("remove one `[settings].config` link so the chain ends at a base file"),
            );
            return None;
        }
        let table = read_file(sources, ctx, env, &path, referrer, "settings file")?;
        if let Some(link) = settings_link(&table, ctx) {
            let (raw, loc) = link;
            next = Some((resolve_config_ref(env, sources, &raw, &loc), Some(loc)));
        }
        chain.push((table, path));
    }
    let files: Vec<PathBuf> = chain.iter().rev().map(|(_, p)| p.clone()).collect();
    let mut merged: Option<Table> = None;
    for (t, _) in chain.into_iter().rev() {
        match &mut merged {
            None => merged = Some(t),
            Some(m) => m.merge_from(&t),
        }
    }
    merged.map(|m| (m, files))
}

/// The `[settings].config` link of a settings file, if any.
fn settings_link(table: &Table, ctx: &mut Ctx) -> Option<(String, Loc)> {
    let e = table.get("settings")?;
    let tree::Value::Table(t) = &e.node.value else {
        return None;
    };
    let c = t.get("config")?;
    match &c.node.value {
        tree::Value::Str(s) => Some((s.clone(), c.node.loc.clone())),
        v => {
            ctx.diags.push(Diagnostic::error(
                Some(c.node.loc.clone()),
                format!(
                    "`settings.config` must be a string path, found {}",
                    v.type_name()
                ),
            ));
            None
        }
    }
}

/// Resolve a dataset path: absolute kept, `./` and `../` against the file, else against `base`.
fn dataset_path(env: &Env, sources: &Sources, raw: &str, loc: &Loc, base: &Path) -> PathBuf {
    let p = env.expand_home(raw);
    if p.is_absolute() {
        return normalize(&p);
    }
    if is_file_relative(raw) {
        return normalize(&dir_of(sources, loc).join(p));
    }
    normalize(&base.join(p))
}

/// Read the merged settings table into [`Settings`].
pub fn read(
    sources: &Sources,
    ctx: &mut Ctx,
    env: &Env,
    table: &Table,
    files: Vec<PathBuf>,
) -> Settings {
    let root = Section::root(table);
    let settings_dir = files
        .last()
        .and_then(|f| f.parent())
        .map(Path::to_path_buf)
        .unwrap_or_default();

    let s = root.section(ctx, "settings");
    s.string(ctx, "config"); // followed by load_chain
    s.finish(ctx, &[]);

    let hf = root.section(ctx, "hf_models");
    let mut hf_models = BTreeMap::new();
    for k in hf.keys() {
        if let Some(v) = hf.string(ctx, &k) {
            hf_models.insert(k, v);
        }
    }
    hf.finish(ctx, &[]);

    let data = root.section(ctx, "data");
    let path_key = |ctx: &mut Ctx, key: &str, default: &Path| -> PathBuf {
        match data.string(ctx, key) {
            Some(raw) => {
                let loc = ctx.loc(&format!("data.{key}")).expect("just read");
                let p = env.expand_home(&raw);
                if p.is_absolute() {
                    normalize(&p)
                } else {
                    normalize(&dir_of(sources, &loc).join(p))
                }
            }
            None => default.to_path_buf(),
        }
    };
    let data_root = path_key(ctx, "root", &settings_dir);
    let output_root = path_key(ctx, "output_root", &data_root);
    let max_sampling_weight = data.float(ctx, "max_sampling_weight");
    if let Some(w) = max_sampling_weight {
        if w < 1.0 {
            ctx.error(
                "data.max_sampling_weight",
                format!("`data.max_sampling_weight` = {w} must be at least 1"),
            );
        }
    }
    let output_type = data.pick(ctx, "output_type", OutputType::DbOnly, OutputType::ALL);
    let data_type = data.pick(ctx, "data_type", DataType::Spectrogram, DataType::ALL);
    let polar_layout = data.pick(
        ctx,
        "polar_layout",
        PolarLayout::PhaseCosSin,
        PolarLayout::ALL,
    );
    data.finish(ctx, &[]);

    let ds = root.section(ctx, "datasets");
    let mut datasets = BTreeMap::new();
    for name in ds.keys() {
        let t = ds.section(ctx, &name);
        let path = |ctx: &mut Ctx, key: &str, base: &Path, fallback: PathBuf| -> PathBuf {
            match t.string(ctx, key).filter(|s| !s.is_empty()) {
                Some(raw) => {
                    let loc = ctx
                        .loc(&format!("datasets.{name}.{key}"))
                        .expect("just read");
                    dataset_path(env, sources, &raw, &loc, base)
                }
                None => fallback,
            }
        };
        let droot = path(ctx, "root", &data_root, data_root.join(&name));
        let output = path(ctx, "output", &output_root, output_root.join(&name));
        let ts_default = output
            .parent()
            .map(|p| p.join("timeseries"))
            .unwrap_or_else(|| output.join("timeseries"));
        let timeseries_output = path(ctx, "timeseries_output", &output_root, ts_default);
        let min_db = t.float(ctx, "min_db");
        let max_db = t.float(ctx, "max_db");
        // Seizures fill about 0.4 % of CHB-MIT's hours: 16 background windows of a one-hour
        // recording's 438 keep a dataset from being 99 % background by accident.
        let max_background_windows = t.count(ctx, "max_background_windows", 16, 0);
        if t.has("max_background_windows") && name != "mit" {
            ctx.warn(
                &format!("datasets.{name}.max_background_windows"),
                format!("`max_background_windows` has no effect on `{name}`: only mit labels windows as seizure or background"),
            );
        }
        if let (Some(lo), Some(hi)) = (min_db, max_db) {
            if hi <= lo {
                ctx.error(
                    &format!("datasets.{name}.max_db"),
                    format!("`datasets.{name}.max_db` = {hi} must be greater than `min_db` = {lo}"),
                )
                .help = Some(
                    "the dB window maps [min_db, max_db] onto 0..255; swap or widen the bounds"
                        .into(),
                );
            }
        }
        t.finish(ctx, &[]);
        datasets.insert(
            name,
            DatasetPaths {
                root: droot,
                output,
                timeseries_output,
                min_db,
                max_db,
                max_background_windows,
            },
        );
    }
    ds.finish(ctx, &[]);
    root.finish(ctx, &[]);

    Settings {
        files,
        hf_models,
        data_root,
        output_root,
        max_sampling_weight,
        output_type,
        data_type,
        polar_layout,
        datasets,
    }
}
