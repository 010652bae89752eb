//! Run tracking: the one interface the training loops call once per event ([`Logger`]), and
//! its backends, one file each, all written without a network or the trackers' own libraries:
//! TensorBoard event files (tensorboard.rs), an MLflow file-store run (mlflow.rs), a W&B
//! offline run (wandb.rs); plus the run's `metrics.jsonl` and the console (a progress bar on a
//! terminal, with the log lines printed above it).
//!
//! A backend that cannot write (disk full, permissions) returns the error with the file's path,
//! which stops the run: the loops log after a step's checkpoint is written (and checkpoints are
//! written atomically), so the last one is safe; no record is dropped silently.

pub mod mlflow;
pub mod tensorboard;
pub mod wandb;
mod wire;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use signal_diffusion_config::Config;

use tensorboard::{HParam, Histogram, TensorBoard};

/// The config's tracking keys, as each trainer spells them.
#[derive(Debug, Clone, Default)]
pub struct Tracking<'a> {
    pub tensorboard: bool,
    /// TensorBoard's directory (default `<run>/tensorboard`), and the W&B root when set.
    pub log_dir: Option<&'a String>,
    pub mlflow: bool,
    pub wandb_project: Option<&'a str>,
    pub wandb_entity: Option<&'a str>,
    pub wandb_tags: &'a [String],
    pub run_name: Option<&'a str>,
    /// Parameter and gradient histograms every this many steps (0: never).
    pub histogram_every: u64,
}

/// UTC `YYYYmmdd<separator>HHMMSS` of `secs` since the epoch, without a date crate
/// (civil-from-days, Howard Hinnant's algorithm).
pub fn utc_timestamp(secs: u64, separator: char) -> String {
    let (days, rem) = (secs / 86400, secs % 86400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}{separator}{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `value`'s leaves (scalars and lists) with their dotted keys; nulls left out (neither MLflow
/// nor TensorBoard's hparams have a null).
pub(crate) fn leaves<'a>(
    prefix: &str,
    value: &'a serde_json::Value,
    out: &mut Vec<(String, &'a serde_json::Value)>,
) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(&key, v, out);
            }
        }
        serde_json::Value::Null => {}
        leaf => out.push((prefix.to_string(), leaf)),
    }
}

/// Every event goes to each backend that is on: scalars to TensorBoard, MLflow, W&B and
/// `metrics.jsonl` (always); images and histograms to those that keep them; lines to stdout.
pub struct Logger {
    tb: Option<TensorBoard>,
    mlflow: Option<mlflow::MlflowRun>,
    wandb: Option<wandb::WandbRun>,
    jsonl: BufWriter<File>,
    jsonl_path: PathBuf,
    histogram_every: u64,
    /// Time spent in the event calls (what tracking costs the run), and when the logger opened.
    spent: Duration,
    opened: Instant,
    /// Steps done of the run, with the last logged loss, lr and throughput. Drawn on stderr only
    /// when it is a terminal; in a pipe or a file, stdout keeps just the log lines.
    bar: indicatif::ProgressBar,
}

impl Logger {
    /// The run's logger. TensorBoard (when `tensorboard`) writes to `log_dir`, else
    /// `<run>/tensorboard`. MLflow runs when `mlflow` is set or `MLFLOW_TRACKING_URI` names a
    /// file store; its default store is `mlruns/` beside the run directories, so the runs of one
    /// output directory compare in one experiment per config. W&B runs when a project is set
    /// (and `WANDB_MODE` is not `disabled`), under `WANDB_DIR`, else `log_dir`, else the run
    /// directory. The plan and the resolved config become artifacts, TensorBoard text and the
    /// hparams session; resuming in the same run directory continues the same MLflow and W&B
    /// runs.
    pub fn open(run_dir: &Path, tracking: &Tracking, config: &Config, plan: &str) -> Result<Self> {
        let opened = Instant::now();
        let value = config.to_value();
        let json = config.to_json();
        let name = |p: &Path, stem: bool| {
            let part = if stem { p.file_stem() } else { None };
            part.or(p.file_name())
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let run_name = name(run_dir, false);

        let default_store = run_dir.parent().unwrap_or(Path::new(".")).join("mlruns");
        let mlflow = match mlflow::store(tracking.mlflow, &default_store)? {
            Some(store) => {
                let run = mlflow::MlflowRun::open(
                    &store,
                    &name(&config.path, true),
                    &run_name,
                    run_dir,
                    &value,
                )?;
                run.artifact("plan.txt", plan.as_bytes())?;
                run.artifact("config_resolved.json", json.as_bytes())?;
                println!("MLflow run {}", run.dir().display());
                Some(run)
            }
            None => None,
        };

        let default_root = tracking
            .log_dir
            .map_or(run_dir.to_path_buf(), PathBuf::from);
        let wandb = match wandb::root(tracking.wandb_project, &default_root) {
            Some(root) => {
                let info = wandb::RunInfo {
                    project: tracking.wandb_project.unwrap_or_default(),
                    entity: tracking.wandb_entity,
                    tags: tracking.wandb_tags,
                    display_name: tracking.run_name.unwrap_or(&run_name),
                    config: &value,
                };
                let run = wandb::WandbRun::open(&root, run_dir, &info)?;
                println!("W&B offline run {} (id {})", run.dir().display(), run.id());
                Some(run)
            }
            None => None,
        };

        let tb = tracking
            .tensorboard
            .then(|| {
                let dir = tracking
                    .log_dir
                    .map(PathBuf::from)
                    .unwrap_or_else(|| run_dir.join("tensorboard"));
                TensorBoard::create(&dir)
            })
            .transpose()?;

        let jsonl_path = run_dir.join("metrics.jsonl");
        let jsonl = BufWriter::new(
            File::options()
                .create(true)
                .append(true)
                .open(&jsonl_path)
                .with_context(|| format!("cannot open {}", jsonl_path.display()))?,
        );
        let mut log = Logger {
            tb,
            mlflow,
            wandb,
            jsonl,
            jsonl_path,
            histogram_every: tracking.histogram_every,
            spent: Duration::ZERO,
            opened,
            bar: indicatif::ProgressBar::hidden(),
        };
        if let Some(tb) = &mut log.tb {
            // The resolved config, readable in the Text tab (a code block in Markdown), and its
            // run keys as the run's hparams session (the HParams tab; `settings.*` are paths).
            tb.text("config", &format!("```json\n{json}\n```"), 0)?;
            let mut run_keys = vec![];
            if let Some(run) = value.get("run") {
                leaves("run", run, &mut run_keys);
            }
            let hparams: Vec<(String, HParam)> = run_keys
                .into_iter()
                .filter_map(|(k, v)| HParam::from_json(v).map(|h| (k, h)))
                .collect();
            tb.hparams_start(&hparams)?;
        }
        log.spent = opened.elapsed();
        Ok(log)
    }

    /// Show a progress bar of `total` steps, `done` of them already (a resumed run).
    pub fn start_progress(&mut self, total: u64, done: u64) {
        self.bar = indicatif::ProgressBar::new(total).with_style(
            indicatif::ProgressStyle::with_template(
                "step {pos}/{len} [{bar:20}] {elapsed} (eta {eta}) {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        self.bar.set_position(done);
        self.bar.reset_eta();
    }

    /// One optimizer step done; `status` (loss, lr, speed) replaces the bar's message when given.
    pub fn step(&self, status: Option<String>) {
        self.bar.inc(1);
        if let Some(s) = status {
            self.bar.set_message(s);
        }
    }

    /// A line on stdout, above the progress bar when there is one.
    pub fn line(&self, text: &str) {
        self.bar.suspend(|| println!("{text}"));
    }

    pub fn finish_progress(&self) {
        self.bar.finish_and_clear();
    }

    pub fn scalar(&mut self, tag: &str, value: f64, step: u64) -> Result<()> {
        let start = Instant::now();
        if let Some(tb) = &mut self.tb {
            tb.scalar(tag, value, step)?;
        }
        if let Some(run) = &mut self.mlflow {
            run.metric(tag, value, step)?;
        }
        if let Some(run) = &mut self.wandb {
            run.scalar(tag, value, step)?;
        }
        let line = serde_json::json!({"step": step, "tag": tag, "value": value});
        writeln!(self.jsonl, "{line}")
            .with_context(|| format!("cannot write {}", self.jsonl_path.display()))?;
        self.spent += start.elapsed();
        Ok(())
    }

    /// A PNG image (`shape` = channels, height, width) to TensorBoard, W&B's media and MLflow's
    /// artifacts (`<tag>/step-NNNNNNNN.png`), those that are on.
    pub fn image(&mut self, tag: &str, png: &[u8], shape: [usize; 3], step: u64) -> Result<()> {
        let start = Instant::now();
        if let Some(tb) = &mut self.tb {
            tb.image(tag, png, shape[1], shape[2], shape[0], step)?;
        }
        if let Some(run) = &mut self.wandb {
            run.image(tag, png, shape, step)?;
        }
        if let Some(run) = &self.mlflow {
            run.artifact(&format!("{tag}/step-{step:08}.png"), png)?;
        }
        self.spent += start.elapsed();
        Ok(())
    }

    /// Whether `step` is one to log histograms at (the config's `histogram_every_*`, with a
    /// backend that draws them on), so the loops read parameters and gradients only then.
    pub fn wants_histograms(&self, step: u64) -> bool {
        self.histogram_every > 0
            && step.is_multiple_of(self.histogram_every)
            && (self.tb.is_some() || self.wandb.is_some())
    }

    /// A histogram of `values` (64 buckets) to TensorBoard and W&B.
    fn histogram(&mut self, tag: &str, values: &[f32], step: u64) -> Result<()> {
        let Some(h) = Histogram::of(values, 64) else {
            return Ok(());
        };
        if let Some(tb) = &mut self.tb {
            tb.histogram(tag, &h, step)?;
        }
        if let Some(run) = &mut self.wandb {
            run.histogram(tag, &h, step)?;
        }
        Ok(())
    }

    /// Histograms of each parameter's values (`parameters/<name>`) and of its gradient
    /// (`gradients/<name>`, divided by `grad_scale`: the fp16 loss scale, else 1), as
    /// `wandb.watch` logs them, with one histogram of the gradients' per-tensor L2 norms
    /// (`gradients/norm`): the step's weights and raw gradients, before clipping and the update.
    pub fn parameter_histograms(
        &mut self,
        params: &[(String, Var)],
        grads: &GradStore,
        grad_scale: f64,
        step: u64,
    ) -> Result<()> {
        let start = Instant::now();
        let host = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        };
        let mut norms = vec![];
        for (name, var) in params {
            self.histogram(&format!("parameters/{name}"), &host(var.as_tensor())?, step)?;
            if let Some(g) = grads.get(var.as_tensor()) {
                let mut g = host(g)?;
                let inv = (1.0 / grad_scale) as f32;
                g.iter_mut().for_each(|v| *v *= inv);
                norms.push(g.iter().map(|v| v * v).sum::<f32>().sqrt());
                self.histogram(&format!("gradients/{name}"), &g, step)?;
            }
        }
        self.histogram("gradients/norm", &norms, step)?;
        self.spent += start.elapsed();
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        let start = Instant::now();
        if let Some(tb) = &mut self.tb {
            tb.flush()?;
        }
        if let Some(run) = &mut self.mlflow {
            run.flush()?;
        }
        if let Some(run) = &mut self.wandb {
            run.flush()?;
        }
        self.jsonl
            .flush()
            .with_context(|| format!("cannot write {}", self.jsonl_path.display()))?;
        self.spent += start.elapsed();
        Ok(())
    }

    /// The run completed: everything flushed; TensorBoard's hparams session ended as a success,
    /// MLflow's run marked finished, W&B's run ended with `summary` (the run's best scores) added
    /// to each key's latest value and exit code 0; `wandb sync` printed. A logger dropped without
    /// this marks them failed.
    pub fn finish(&mut self, summary: &[(&str, f64)]) -> Result<()> {
        self.flush()?;
        let start = Instant::now();
        if let Some(tb) = &mut self.tb {
            tb.hparams_end(true)?;
        }
        if let Some(run) = &mut self.mlflow {
            run.finish()?;
        }
        if let Some(run) = &mut self.wandb {
            for (key, value) in summary {
                run.summary(key, *value);
            }
            run.finish()?;
            let sync = format!(
                "W&B run written offline; upload it from a connected machine with: wandb sync {}",
                run.dir().display()
            );
            self.line(&sync);
        }
        self.spent += start.elapsed();
        let total = self.opened.elapsed().as_secs_f64();
        self.line(&format!(
            "tracking: {:.3} s of the run's {total:.1} s in the logger ({:.2} %)",
            self.spent.as_secs_f64(),
            100.0 * self.spent.as_secs_f64() / total.max(1e-9)
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_timestamps_follow_the_civil_calendar() {
        // 2024-02-29 12:34:56 UTC, a leap day.
        assert_eq!(utc_timestamp(1_709_210_096, '_'), "20240229_123456");
        assert_eq!(utc_timestamp(0, '-'), "19700101-000000");
    }
}
