//! Run logging: TensorBoard event files, a JSONL metrics log, an MLflow file-store run
//! (mlflow.rs) when asked, and the console (a progress bar on a terminal, with the log lines
//! printed above it).
//!
//! The event file is written by hand (no TensorFlow): TFRecord framing (length, masked CRC-32C
//! of the length, payload, masked CRC-32C of the payload) around `Event` protobuf messages with
//! scalar `Summary` values. TensorBoard's own reader loads it (tested from Python in CI).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

const CRC32C_POLY: u32 = 0x82f6_3b78;

fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ CRC32C_POLY
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c(bytes);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_bytes(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// An open TensorBoard event file.
pub struct TensorBoard {
    file: BufWriter<File>,
    pub path: PathBuf,
    /// An hparams session was started and not yet ended (ended as failed on drop).
    session_open: bool,
}

/// An hparam's value, as `google.protobuf.Value` holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum HParam {
    Number(f64),
    Text(String),
    Bool(bool),
}

impl HParam {
    /// A JSON leaf as an hparam (lists as their JSON text); `None` for null and objects.
    pub fn from_json(v: &serde_json::Value) -> Option<HParam> {
        match v {
            serde_json::Value::Number(n) => n.as_f64().map(HParam::Number),
            serde_json::Value::Bool(b) => Some(HParam::Bool(*b)),
            serde_json::Value::String(s) => Some(HParam::Text(s.clone())),
            serde_json::Value::Array(_) => Some(HParam::Text(v.to_string())),
            _ => None,
        }
    }

    /// `google.protobuf.Value`: number_value = 2 (double), string_value = 3, bool_value = 4.
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            HParam::Number(x) => {
                out.push(0x11);
                out.extend_from_slice(&x.to_le_bytes());
            }
            HParam::Text(s) => field_bytes(3, s.as_bytes(), out),
            HParam::Bool(b) => {
                out.push(0x20);
                out.push(u8::from(*b));
            }
        }
    }
}

/// The hparams plugin's session status (`api.proto`): success, failure.
const STATUS_SUCCESS: u64 = 1;
const STATUS_FAILURE: u64 = 2;

/// A length-0 float tensor (dtype 1, shape [0]): the plugin's `NULL_TENSOR`, which a summary
/// that only carries metadata holds.
const NULL_TENSOR: [u8; 6] = [0x08, 0x01, 0x12, 0x02, 0x12, 0x00];

impl TensorBoard {
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}", now() as u64));
        let file = BufWriter::new(
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?,
        );
        let mut tb = TensorBoard {
            file,
            path,
            session_open: false,
        };
        let mut ev = vec![];
        ev.push(0x09);
        ev.extend_from_slice(&now().to_le_bytes());
        field_bytes(3, b"brain.Event:2", &mut ev);
        tb.record(&ev)?;
        Ok(tb)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.file.write_all(&len)?;
        self.file.write_all(&masked_crc(&len).to_le_bytes())?;
        self.file.write_all(data)?;
        self.file.write_all(&masked_crc(data).to_le_bytes())?;
        Ok(())
    }

    pub fn scalar(&mut self, tag: &str, value: f64, step: u64) -> Result<()> {
        let mut val = vec![];
        field_bytes(1, tag.as_bytes(), &mut val);
        val.push(0x15); // field 2, fixed32: simple_value
        val.extend_from_slice(&(value as f32).to_le_bytes());
        self.summary(&val, step)
    }

    /// An `Event` at `step` holding a `Summary` with one encoded `Summary.Value`.
    fn summary(&mut self, value: &[u8], step: u64) -> Result<()> {
        let mut summary = vec![];
        field_bytes(1, value, &mut summary);
        let mut ev = vec![0x09];
        ev.extend_from_slice(&now().to_le_bytes());
        ev.push(0x10);
        varint(step, &mut ev);
        field_bytes(5, &summary, &mut ev);
        self.record(&ev)
    }

    /// A text summary (the text plugin renders it as Markdown): a string `TensorProto` (dtype
    /// DT_STRING = 7, scalar shape) with the plugin named in the value's metadata.
    pub fn text(&mut self, tag: &str, text: &str, step: u64) -> Result<()> {
        let mut tensor = vec![0x08, 0x07];
        field_bytes(2, &[], &mut tensor);
        field_bytes(8, text.as_bytes(), &mut tensor);
        self.plugin_value(tag, &tensor, b"text", None, step)
    }

    /// A `Summary.Value` of `tag` holding `tensor`, with metadata naming the plugin that reads
    /// it (`PluginData{plugin_name = 1, content = 2}`).
    fn plugin_value(
        &mut self,
        tag: &str,
        tensor: &[u8],
        plugin_name: &[u8],
        content: Option<&[u8]>,
        step: u64,
    ) -> Result<()> {
        let mut plugin = vec![];
        field_bytes(1, plugin_name, &mut plugin);
        if let Some(c) = content {
            field_bytes(2, c, &mut plugin);
        }
        let mut metadata = vec![];
        field_bytes(1, &plugin, &mut metadata);
        let mut val = vec![];
        field_bytes(1, tag.as_bytes(), &mut val);
        field_bytes(8, tensor, &mut val);
        field_bytes(9, &metadata, &mut val);
        self.summary(&val, step)
    }

    /// A summary value carrying only the hparams plugin's data (`HParamsPluginData`, version 0,
    /// with `data_field` = 3 session start or 4 session end).
    fn hparams_record(&mut self, tag: &str, data_field: u32, data: &[u8]) -> Result<()> {
        let mut content = vec![0x08, 0x00];
        field_bytes(data_field, data, &mut content);
        self.plugin_value(tag, &NULL_TENSOR, b"hparams", Some(&content), 0)
    }

    /// The run as an hparams session (TensorBoard's HParams tab compares runs by these values
    /// and by their scalars): `SessionStartInfo{hparams = 1 (map), start_time_secs = 5}`.
    pub fn hparams_start(&mut self, hparams: &[(String, HParam)]) -> Result<()> {
        let mut info = vec![];
        for (key, value) in hparams {
            let mut v = vec![];
            value.encode(&mut v);
            let mut entry = vec![];
            field_bytes(1, key.as_bytes(), &mut entry);
            field_bytes(2, &v, &mut entry);
            field_bytes(1, &entry, &mut info);
        }
        info.push(0x29);
        info.extend_from_slice(&now().to_le_bytes());
        self.hparams_record("_hparams_/session_start_info", 3, &info)?;
        self.session_open = true;
        Ok(())
    }

    /// `SessionEndInfo{status = 1, end_time_secs = 2}`.
    pub fn hparams_end(&mut self, success: bool) -> Result<()> {
        let mut info = vec![0x08];
        varint(
            if success {
                STATUS_SUCCESS
            } else {
                STATUS_FAILURE
            },
            &mut info,
        );
        info.push(0x11);
        info.extend_from_slice(&now().to_le_bytes());
        self.hparams_record("_hparams_/session_end_info", 4, &info)?;
        self.session_open = false;
        self.flush()
    }

    /// An image summary (`encoded` is a PNG of `height`×`width`, `channels` colour channels).
    pub fn image(
        &mut self,
        tag: &str,
        encoded: &[u8],
        height: usize,
        width: usize,
        channels: usize,
        step: u64,
    ) -> Result<()> {
        let mut img = vec![0x08];
        varint(height as u64, &mut img);
        img.push(0x10);
        varint(width as u64, &mut img);
        img.push(0x18);
        varint(channels as u64, &mut img);
        field_bytes(4, encoded, &mut img);
        let mut val = vec![];
        field_bytes(1, tag.as_bytes(), &mut val);
        field_bytes(4, &img, &mut val);
        self.summary(&val, step)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.file.flush()?;
        Ok(())
    }
}

impl Drop for TensorBoard {
    /// A session the run did not end stopped with an error: ended as failed (best effort).
    fn drop(&mut self) {
        if self.session_open {
            let _ = self.hparams_end(false);
        }
        let _ = self.file.flush();
    }
}

/// Scalars go to TensorBoard and MLflow (when enabled) and to `metrics.jsonl` (always); lines
/// go to stdout.
pub struct Logger {
    tb: Option<TensorBoard>,
    mlflow: Option<super::mlflow::MlflowRun>,
    jsonl: BufWriter<File>,
    /// Steps done of the run, with the last logged loss, lr and throughput. Drawn on stderr only
    /// when it is a terminal; in a pipe or a file, stdout keeps just the log lines.
    bar: indicatif::ProgressBar,
}

impl Logger {
    pub fn new(run_dir: &Path, tensorboard_dir: Option<PathBuf>) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let jsonl = BufWriter::new(
            File::options()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?,
        );
        let tb = tensorboard_dir
            .map(|d| TensorBoard::create(&d))
            .transpose()?;
        Ok(Logger {
            tb,
            mlflow: None,
            jsonl,
            bar: indicatif::ProgressBar::hidden(),
        })
    }

    /// The run's logger: TensorBoard events (when `tensorboard`) in `log_dir`, else
    /// `<run>/tensorboard`; and `mlflow`'s run, if any.
    pub fn for_run(
        run_dir: &Path,
        tensorboard: bool,
        log_dir: Option<&String>,
        mlflow: Option<super::mlflow::MlflowRun>,
    ) -> Result<Self> {
        let tb_dir = tensorboard.then(|| {
            log_dir
                .map(PathBuf::from)
                .unwrap_or_else(|| run_dir.join("tensorboard"))
        });
        if let Some(run) = &mlflow {
            println!("MLflow run {}", run.dir().display());
        }
        Ok(Logger {
            mlflow,
            ..Logger::new(run_dir, tb_dir)?
        })
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
        if let Some(tb) = &mut self.tb {
            tb.scalar(tag, value, step)?;
        }
        if let Some(run) = &mut self.mlflow {
            run.metric(tag, value, step)?;
        }
        writeln!(
            self.jsonl,
            "{}",
            serde_json::json!({"step": step, "tag": tag, "value": value})
        )?;
        Ok(())
    }

    /// A PNG image to TensorBoard and to MLflow's artifacts (`<tag>/step-NNNNNNNN.png`), when
    /// enabled.
    pub fn image(&mut self, tag: &str, png: &[u8], shape: [usize; 3], step: u64) -> Result<()> {
        if let Some(tb) = &mut self.tb {
            tb.image(tag, png, shape[1], shape[2], shape[0], step)?;
        }
        if let Some(run) = &self.mlflow {
            run.artifact(&format!("{tag}/step-{step:08}.png"), png)?;
        }
        Ok(())
    }

    /// The run's hyperparameters as TensorBoard's hparams session, when enabled.
    pub fn hparams(&mut self, hparams: &[(String, HParam)]) -> Result<()> {
        match &mut self.tb {
            Some(tb) => tb.hparams_start(hparams),
            None => Ok(()),
        }
    }

    /// Text to TensorBoard's text plugin (Markdown), when enabled.
    pub fn text(&mut self, tag: &str, text: &str, step: u64) -> Result<()> {
        match &mut self.tb {
            Some(tb) => tb.text(tag, text, step),
            None => Ok(()),
        }
    }

    /// A file of the run (plan, resolved config) for the trackers that keep artifacts.
    pub fn artifact(&self, name: &str, bytes: &[u8]) -> Result<()> {
        match &self.mlflow {
            Some(run) => run.artifact(name, bytes),
            None => Ok(()),
        }
    }

    pub fn flush(&mut self) -> Result<()> {
        if let Some(tb) = &mut self.tb {
            tb.flush()?;
        }
        if let Some(run) = &mut self.mlflow {
            run.flush()?;
        }
        self.jsonl.flush()?;
        Ok(())
    }

    /// The run completed: everything flushed, and MLflow's run marked finished (a logger
    /// dropped without this marks it failed).
    pub fn finish(&mut self) -> Result<()> {
        self.flush()?;
        if let Some(tb) = &mut self.tb {
            tb.hparams_end(true)?;
        }
        if let Some(run) = &mut self.mlflow {
            run.finish()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }
}
