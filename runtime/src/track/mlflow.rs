//! An MLflow run written straight into MLflow's file store (`mlruns/`), with no MLflow and no
//! network: what `MlflowClient("file:...")` reads (mlflow ≥ 3.13 with
//! `MLFLOW_ALLOW_FILE_STORE=true`; tested with mlflow-skinny 3.18) and `mlflow
//! migrate-filestore` converts. Layout (spec/tracking.md §3):
//!
//! ```text
//! mlruns/<experiment id>/meta.yaml              name, artifact location, times
//! mlruns/<experiment id>/<run id>/meta.yaml     run name, status, start and end times
//!                                 params/<key>  the resolved config, flattened (`run.optimizer.learning_rate`)
//!                                 metrics/<tag> "<unix ms> <value> <step>" per line (`train/loss` nests)
//!                                 tags/mlflow.runName, tags/mlflow.user
//!                                 artifacts/    plan.txt, config_resolved.json, sample grids
//! ```
//!
//! One experiment per config (its file stem), found by name or created; one run per run
//! directory: a resumed run reopens it (the id is kept in the run directory's `mlflow.json`) and
//! appends. The run is marked finished when the trainer completes, and failed when it stops with
//! an error (on drop). Never MLflow's SQL schema.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::leaves;

/// MLflow's run statuses.
const RUNNING: u32 = 1;
const FINISHED: u32 = 3;
const FAILED: u32 = 4;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A YAML single-quoted scalar.
fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn file_uri(path: &Path) -> String {
    format!("file://{}", path.display())
}

/// Where a run's store is: `MLFLOW_TRACKING_URI` when it is a `file:` URI, else `default`;
/// `None` when neither the config nor the environment asks for MLflow. Another scheme with
/// `mlflow = true` is an error: nothing here talks to a server.
pub fn store(enabled: bool, default: &Path) -> Result<Option<PathBuf>> {
    let uri = std::env::var("MLFLOW_TRACKING_URI").ok();
    store_for(uri.as_deref(), enabled, default)
}

/// [`store`] given the environment's `MLFLOW_TRACKING_URI`.
fn store_for(uri: Option<&str>, enabled: bool, default: &Path) -> Result<Option<PathBuf>> {
    match uri.filter(|u| !u.is_empty()) {
        Some(uri) => match uri.strip_prefix("file:") {
            Some(path) => Ok(Some(PathBuf::from(path.trim_start_matches("//")))),
            None if enabled => bail!(
                "MLFLOW_TRACKING_URI = {uri}: this trainer writes MLflow's file store only (no network); set it to file:<dir>, or unset it to write {}",
                default.display()
            ),
            None => Ok(None),
        },
        None => Ok(enabled.then(|| default.to_path_buf())),
    }
}

/// What a run directory remembers of its MLflow run.
#[derive(Serialize, Deserialize)]
struct Record {
    store: PathBuf,
    experiment_id: String,
    run_id: String,
    start_time: u64,
}

pub struct MlflowRun {
    dir: PathBuf,
    record: Record,
    run_name: String,
    /// Each metric's file, open for appending.
    metrics: HashMap<String, (PathBuf, BufWriter<File>)>,
    finished: bool,
}

impl MlflowRun {
    /// The run of `run_dir` in `store` under experiment `experiment`: reopened when the run
    /// directory already has one there, else created with `config`'s flattened keys as params.
    pub fn open(
        store: &Path,
        experiment: &str,
        run_name: &str,
        run_dir: &Path,
        config: &serde_json::Value,
    ) -> Result<Self> {
        let store = std::path::absolute(store).unwrap_or_else(|_| store.to_path_buf());
        std::fs::create_dir_all(&store)
            .with_context(|| format!("cannot create the MLflow store {}", store.display()))?;
        let remembered = run_dir.join("mlflow.json");
        let previous: Option<Record> = std::fs::read_to_string(&remembered)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .filter(|r: &Record| r.store == store);
        let (record, fresh) = match previous {
            Some(r) if store.join(&r.experiment_id).join(&r.run_id).is_dir() => (r, false),
            _ => {
                let experiment_id = experiment_id(&store, experiment)?;
                let start_time = now_ms();
                let seed = format!("{}{start_time}{}", run_dir.display(), std::process::id());
                let run_id = format!(
                    "{:016x}{:016x}",
                    crate::data::io::fnv(seed.as_bytes()),
                    crate::data::io::fnv(format!("{seed}#").as_bytes())
                );
                (
                    Record {
                        store: store.clone(),
                        experiment_id,
                        run_id,
                        start_time,
                    },
                    true,
                )
            }
        };
        let dir = store.join(&record.experiment_id).join(&record.run_id);
        let run = MlflowRun {
            dir,
            record,
            run_name: run_name.to_string(),
            metrics: HashMap::new(),
            finished: false,
        };
        if fresh {
            for sub in ["metrics", "params", "tags", "artifacts"] {
                std::fs::create_dir_all(run.dir.join(sub))?;
            }
            let mut params = vec![];
            leaves("", config, &mut params);
            for (key, value) in params {
                run.write(&format!("params/{key}"), param_text(value).as_bytes())?;
            }
            run.write("tags/mlflow.runName", run_name.as_bytes())?;
            let user = std::env::var("USER").unwrap_or_default();
            run.write("tags/mlflow.user", user.as_bytes())?;
            let json = serde_json::to_string_pretty(&run.record)?;
            std::fs::write(&remembered, json)
                .with_context(|| format!("cannot write {}", remembered.display()))?;
        }
        run.write_meta(RUNNING, None)?;
        Ok(run)
    }

    /// The run's directory in the store.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        let path = self.dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
    }

    fn write_meta(&self, status: u32, end_time: Option<u64>) -> Result<()> {
        let r = &self.record;
        let meta = format!(
            "artifact_uri: {}\nend_time: {}\nentry_point_name: ''\nexperiment_id: {}\nlifecycle_stage: active\nrun_id: {}\nrun_name: {}\nsource_name: ''\nsource_type: 4\nsource_version: ''\nstart_time: {}\nstatus: {status}\ntags: []\nuser_id: {}\n",
            quoted(&file_uri(&self.dir.join("artifacts"))),
            end_time.map_or("null".to_string(), |t| t.to_string()),
            quoted(&r.experiment_id),
            quoted(&r.run_id),
            quoted(&self.run_name),
            r.start_time,
            quoted(&std::env::var("USER").unwrap_or_default()),
        );
        crate::data::io::write_atomic(&self.dir.join("meta.yaml"), |w| {
            Ok(w.write_all(meta.as_bytes())?)
        })
    }

    /// One point of the metric `key`. The store nests a `/` as directories, so it cannot hold
    /// both `train/loss` and `train/loss/gender` (a file and a directory of one name): a key
    /// keeps its first `/` and its later ones become `.` (`train/loss.gender`).
    pub fn metric(&mut self, key: &str, value: f64, step: u64) -> Result<()> {
        let key = &match key.split_once('/') {
            Some((section, rest)) => format!("{section}/{}", rest.replace('/', ".")),
            None => key.to_string(),
        };
        if !self.metrics.contains_key(key) {
            let path = self.dir.join("metrics").join(key);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let file = File::options()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            self.metrics
                .insert(key.to_string(), (path, BufWriter::new(file)));
        }
        let (path, w) = self.metrics.get_mut(key).expect("inserted above");
        writeln!(w, "{} {value} {step}", now_ms())
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// A file under the run's `artifacts/`.
    pub fn artifact(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        self.write(&format!("artifacts/{rel}"), bytes)
    }

    pub fn flush(&mut self) -> Result<()> {
        for (path, w) in self.metrics.values_mut() {
            w.flush()
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(())
    }

    /// The run completed: flushed and marked finished.
    pub fn finish(&mut self) -> Result<()> {
        self.flush()?;
        self.write_meta(FINISHED, Some(now_ms()))?;
        self.finished = true;
        Ok(())
    }
}

impl Drop for MlflowRun {
    /// A run dropped before `finish` stopped with an error: marked failed (best effort).
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.flush();
            let _ = self.write_meta(FAILED, Some(now_ms()));
        }
    }
}

/// The id of the experiment called `name` in `store`, created (the next free number) if absent.
fn experiment_id(store: &Path, name: &str) -> Result<String> {
    let mut ids = vec![];
    for entry in std::fs::read_dir(store)?.flatten() {
        let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let meta = std::fs::read_to_string(entry.path().join("meta.yaml")).unwrap_or_default();
        if meta
            .lines()
            .any(|l| l == format!("name: {}", quoted(name)) || l == format!("name: {name}"))
        {
            return Ok(id.to_string());
        }
        ids.push(id);
    }
    let id = (ids.into_iter().max().unwrap_or(0) + 1).to_string();
    let dir = store.join(&id);
    std::fs::create_dir_all(&dir)?;
    let t = now_ms();
    let meta = format!(
        "artifact_location: {}\ncreation_time: {t}\nexperiment_id: {}\nlast_update_time: {t}\nlifecycle_stage: active\nname: {}\n",
        quoted(&file_uri(&dir)),
        quoted(&id),
        quoted(name)
    );
    crate::data::io::write_atomic(
        &dir.join("meta.yaml"),
        |w| Ok(w.write_all(meta.as_bytes())?),
    )?;
    Ok(id)
}

/// A leaf as an MLflow param: strings as they are, other values as JSON.
fn param_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_follows_the_key_and_a_file_tracking_uri() {
        let default = Path::new("runs/mlruns");
        assert_eq!(store_for(None, false, default).unwrap(), None);
        assert_eq!(
            store_for(None, true, default).unwrap(),
            Some(default.into())
        );
        // A file: URI turns it on and points it elsewhere, with or without `//`.
        for uri in ["file:/tmp/store", "file:///tmp/store"] {
            assert_eq!(
                store_for(Some(uri), false, default).unwrap(),
                Some(PathBuf::from("/tmp/store"))
            );
        }
        // A server is never called: ignored unless the config asks for MLflow, then an error.
        assert_eq!(
            store_for(Some("http://mlflow:5000"), false, default).unwrap(),
            None
        );
        let err = store_for(Some("http://mlflow:5000"), true, default)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("file store only") && err.contains("runs/mlruns"),
            "{err}"
        );
    }

    #[test]
    fn configs_flatten_to_dotted_params() {
        let v = serde_json::json!({"run": {"optimizer": {"learning_rate": 0.001, "betas": [0.9, 0.999]}, "name": "x", "none": null}});
        let mut leafs = vec![];
        leaves("", &v, &mut leafs);
        let mut out: Vec<(String, String)> =
            leafs.into_iter().map(|(k, v)| (k, param_text(v))).collect();
        out.sort();
        assert_eq!(
            out,
            [
                ("run.name".to_string(), "x".to_string()),
                ("run.optimizer.betas".into(), "[0.9,0.999]".into()),
                ("run.optimizer.learning_rate".into(), "0.001".into()),
            ]
        );
    }
}
