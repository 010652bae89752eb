//! A Weights & Biases run written offline, by hand, with no wandb and no network: what the
//! wandb SDK leaves in offline mode, which `wandb sync <dir>` uploads later from a connected
//! machine (spec/tracking.md §1; read back with wandb 0.31's `wandb leet inspect` in the tests).
//!
//! ```text
//! <root>/wandb/offline-run-<YYYYmmdd_HHMMSS>-<id>/run-<id>.wandb    the records
//!                                                files/media/images/ the logged images
//! ```
//!
//! The `.wandb` file is LevelDB's log format with W&B's header (`:W&B`, 0xBEE1, version 0):
//! 32 KiB blocks of chunks, each `crc32 (IEEE, unmasked, over type ++ data), length, type`, a
//! record spanning blocks as FIRST, MIDDLE…, LAST chunks. Each record is a `wandb_internal.proto`
//! `Record`, hand-encoded in the SDK's order: header, run (id, entity, project, the resolved
//! config, display name, tags, start time), history rows (one per step: every value logged at
//! that step with `_step`, `_timestamp`, `_runtime`), files (images), summary, exit.
//!
//! One run per run directory: its id is kept in the run directory's `wandb.json`, and a resumed
//! run writes a new offline directory with the same id and `resume` set, as the SDK does.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::tensorboard::Histogram;
use super::wire::{self, now};

const BLOCK: usize = 32 * 1024;
const CHUNK_HEADER: usize = 7;
/// `:W&B`, magic 0xBEE1 (little-endian), version 0.
const FILE_HEADER: [u8; 7] = [b':', b'W', b'&', b'B', 0xe1, 0xbe, 0];
const FULL: u8 = 1;
const FIRST: u8 = 2;
const MIDDLE: u8 = 3;
const LAST: u8 = 4;

/// `Record` fields.
const HISTORY: u32 = 2;
const SUMMARY: u32 = 3;
const FILES: u32 = 6;
const RUN: u32 = 17;
const EXIT: u32 = 18;
const HEADER: u32 = 21;

/// Where a run's `wandb/` directory goes: `WANDB_DIR` when set (as the SDK reads it), else
/// `default`; `None` when the config names no project or `WANDB_MODE=disabled`.
pub fn root(project: Option<&str>, default: &Path) -> Option<PathBuf> {
    let mode = std::env::var("WANDB_MODE").ok();
    let dir = std::env::var_os("WANDB_DIR");
    root_for(project, mode.as_deref(), dir.as_deref(), default)
}

/// [`root`] given the environment's `WANDB_MODE` and `WANDB_DIR`.
fn root_for(
    project: Option<&str>,
    mode: Option<&str>,
    dir: Option<&std::ffi::OsStr>,
    default: &Path,
) -> Option<PathBuf> {
    project?;
    if mode == Some("disabled") {
        return None;
    }
    Some(
        dir.filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| default.to_path_buf()),
    )
}

/// What the run is, as the run record states it.
pub struct RunInfo<'a> {
    pub project: &'a str,
    pub entity: Option<&'a str>,
    pub tags: &'a [String],
    pub display_name: &'a str,
    pub config: &'a serde_json::Value,
}

/// What a run directory remembers of its W&B run.
#[derive(Serialize, Deserialize)]
struct Remembered {
    root: PathBuf,
    id: String,
}

pub struct WandbRun {
    dir: PathBuf,
    path: PathBuf,
    id: String,
    file: BufWriter<File>,
    /// Bytes written into the current 32 KiB block.
    block_offset: usize,
    /// The last record's number.
    num: u64,
    start: f64,
    /// The history row being gathered: its step and `(key, value as JSON)` items.
    row: Option<(u64, Vec<(String, String)>)>,
    /// Each key's latest value (JSON), the summary the run ends with.
    summary: BTreeMap<String, String>,
    finished: bool,
}

/// JSON of a number as Python's `json.dumps` writes it (what the SDK's values look like),
/// non-finite values included.
fn number_json(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        serde_json::Value::from(v).to_string()
    }
}

/// An item `{key = 1, value_json = 16}` (`ConfigItem`, `HistoryItem`, `SummaryItem` alike).
fn item(key: &str, value_json: &str, out: &mut Vec<u8>) {
    let mut it = vec![];
    wire::bytes(1, key.as_bytes(), &mut it);
    wire::bytes(16, value_json.as_bytes(), &mut it);
    wire::bytes(1, &it, out);
}

/// Eight characters of `[a-z0-9]`, as W&B run ids are.
fn run_id(seed: &str) -> String {
    let mut h = crate::data::io::fnv(seed.as_bytes());
    (0..8)
        .map(|_| {
            let c = b"abcdefghijklmnopqrstuvwxyz0123456789"[(h % 36) as usize];
            h /= 36;
            c as char
        })
        .collect()
}

impl WandbRun {
    /// The W&B run of `run_dir` under `root/wandb/`: a new offline directory, with the run id
    /// the run directory remembers when there is one (a resumed run), else a new id.
    pub fn open(root: &Path, run_dir: &Path, info: &RunInfo) -> Result<Self> {
        let root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
        let remembered = run_dir.join("wandb.json");
        let previous = std::fs::read_to_string(&remembered)
            .ok()
            .and_then(|t| serde_json::from_str::<Remembered>(&t).ok())
            .filter(|r| r.root == root);
        let resumed = previous.is_some();
        let id = match previous {
            Some(r) => r.id,
            None => run_id(&format!(
                "{}{}{}",
                run_dir.display(),
                now(),
                std::process::id()
            )),
        };
        let secs = now() as u64;
        let dir = root.join("wandb").join(format!(
            "offline-run-{}-{id}",
            super::utc_timestamp(secs, '_')
        ));
        std::fs::create_dir_all(dir.join("files"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("run-{id}.wandb"));
        let mut file = BufWriter::new(
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?,
        );
        file.write_all(&FILE_HEADER)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut run = WandbRun {
            dir,
            path,
            id,
            file,
            block_offset: FILE_HEADER.len(),
            num: 0,
            start: now(),
            row: None,
            summary: BTreeMap::new(),
            finished: false,
        };
        // HeaderRecord{version_info = 1 {producer = 1, min_consumer = 2}}.
        let mut version = vec![];
        let producer = format!("signal-diffusion {}", env!("CARGO_PKG_VERSION"));
        wire::bytes(1, producer.as_bytes(), &mut version);
        wire::bytes(2, b"0.70.0", &mut version);
        let mut header = vec![];
        wire::bytes(1, &version, &mut header);
        run.record(HEADER, &header)?;
        run.record(RUN, &run.run_record(info, resumed))?;
        if !resumed {
            let json = serde_json::to_string_pretty(&Remembered {
                root,
                id: run.id.clone(),
            })?;
            std::fs::write(&remembered, json)
                .with_context(|| format!("cannot write {}", remembered.display()))?;
        }
        Ok(run)
    }

    /// `RunRecord{run_id = 1, entity = 2, project = 3, config = 4, display_name = 8, tags = 10,
    /// start_time = 17, resume = 24}`; the config's top-level keys as `ConfigItem`s.
    fn run_record(&self, info: &RunInfo, resumed: bool) -> Vec<u8> {
        let mut config = vec![];
        if let serde_json::Value::Object(map) = info.config {
            for (k, v) in map {
                item(k, &v.to_string(), &mut config);
            }
        }
        let mut r = vec![];
        wire::bytes(1, self.id.as_bytes(), &mut r);
        if let Some(entity) = info.entity {
            wire::bytes(2, entity.as_bytes(), &mut r);
        }
        wire::bytes(3, info.project.as_bytes(), &mut r);
        wire::bytes(4, &config, &mut r);
        wire::bytes(8, info.display_name.as_bytes(), &mut r);
        for tag in info.tags {
            wire::bytes(10, tag.as_bytes(), &mut r);
        }
        let mut time = vec![];
        wire::uint(1, self.start as u64, &mut time);
        wire::uint(2, (self.start.fract() * 1e9) as u64, &mut time);
        wire::bytes(17, &time, &mut r);
        if resumed {
            wire::uint(24, 1, &mut r);
        }
        r
    }

    /// The offline run's directory (what `wandb sync` takes).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// A `Record{num = 1, <field> = message}`, framed into the log's chunks.
    fn record(&mut self, field: u32, message: &[u8]) -> Result<()> {
        self.num += 1;
        let mut data = vec![];
        wire::uint(1, self.num, &mut data);
        wire::bytes(field, message, &mut data);
        self.frame(&data)
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// LevelDB log framing: a block with less than a chunk header left is padded with zeros;
    /// a record that does not fit is split over blocks.
    fn frame(&mut self, data: &[u8]) -> std::io::Result<()> {
        let mut rest = data;
        let mut first = true;
        loop {
            let left = BLOCK - self.block_offset;
            if left < CHUNK_HEADER {
                self.file.write_all(&[0; CHUNK_HEADER][..left])?;
                self.block_offset = 0;
                continue;
            }
            let n = rest.len().min(left - CHUNK_HEADER);
            let last = n == rest.len();
            let kind = match (first, last) {
                (true, true) => FULL,
                (true, false) => FIRST,
                (false, true) => LAST,
                (false, false) => MIDDLE,
            };
            let mut crc = crc32fast::Hasher::new();
            crc.update(&[kind]);
            crc.update(&rest[..n]);
            self.file.write_all(&crc.finalize().to_le_bytes())?;
            self.file.write_all(&(n as u16).to_le_bytes())?;
            self.file.write_all(&[kind])?;
            self.file.write_all(&rest[..n])?;
            self.block_offset += CHUNK_HEADER + n;
            rest = &rest[n..];
            first = false;
            if last {
                return Ok(());
            }
        }
    }

    /// A value of the history row at `step` (a new step writes the row gathered so far).
    fn value(&mut self, key: &str, value_json: String, step: u64) -> Result<()> {
        if self.row.as_ref().is_some_and(|(s, _)| *s != step) {
            self.write_row()?;
        }
        let (_, items) = self.row.get_or_insert_with(|| (step, vec![]));
        items.retain(|(k, _)| k != key);
        items.push((key.to_string(), value_json));
        Ok(())
    }

    pub fn scalar(&mut self, key: &str, value: f64, step: u64) -> Result<()> {
        self.value(key, number_json(value), step)
    }

    /// A histogram value, as `wandb.Histogram` logs it: bucket counts and their `n + 1` edges.
    pub fn histogram(&mut self, key: &str, h: &Histogram, step: u64) -> Result<()> {
        let bins: Vec<f64> = std::iter::once(h.min)
            .chain(h.bucket_limit.iter().copied())
            .collect();
        let json = serde_json::json!({"_type": "histogram", "values": h.bucket, "bins": bins});
        self.value(key, json.to_string(), step)
    }

    /// A PNG under `files/media/images/`, announced by a files record, and its image-file value
    /// in the row at `step` (the SDK's fields, `sha256` included).
    pub fn image(
        &mut self,
        key: &str,
        png: &[u8],
        [_, height, width]: [usize; 3],
        step: u64,
    ) -> Result<()> {
        let sha: String = sha2::Sha256::digest(png)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let rel = format!(
            "media/images/{}_{step}_{}.png",
            key.replace('/', "_"),
            &sha[..20]
        );
        let path = self.dir.join("files").join(&rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        crate::data::io::write_atomic(&path, |w| Ok(w.write_all(png)?))?;
        // FilesRecord{files = 1 FilesItem{path = 1}} (policy NOW, the default 0).
        let mut file_item = vec![];
        wire::bytes(1, rel.as_bytes(), &mut file_item);
        let mut files = vec![];
        wire::bytes(1, &file_item, &mut files);
        self.record(FILES, &files)?;
        let json = serde_json::json!({
            "_type": "image-file", "path": rel, "sha256": sha, "size": png.len(),
            "format": "png", "width": width, "height": height,
        });
        self.value(key, json.to_string(), step)
    }

    /// `HistoryRecord{item = 1, step = 2 HistoryStep{num = 1}}` of the gathered row, with
    /// `_step`, `_timestamp` and `_runtime` added as the SDK adds them.
    fn write_row(&mut self) -> Result<()> {
        let Some((step, items)) = self.row.take() else {
            return Ok(());
        };
        let t = now();
        let mut history = vec![];
        let extra = [
            ("_step".to_string(), step.to_string()),
            ("_timestamp".to_string(), number_json(t)),
            ("_runtime".to_string(), number_json(t - self.start)),
        ];
        for (k, v) in items.into_iter().chain(extra) {
            item(&k, &v, &mut history);
            self.summary.insert(k, v);
        }
        let mut hstep = vec![];
        wire::uint(1, step, &mut hstep);
        wire::bytes(2, &hstep, &mut history);
        self.record(HISTORY, &history)
    }

    /// A summary value beyond the latest of each key (the best score of a run, say).
    pub fn summary(&mut self, key: &str, value: f64) {
        self.summary.insert(key.to_string(), number_json(value));
    }

    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// The last row, the summary (`SummaryRecord{update = 1}`: each key's latest value and the
    /// extra values) and `RunExitRecord{exit_code = 1, runtime = 2}`.
    fn end(&mut self, exit_code: u64) -> Result<()> {
        self.write_row()?;
        let mut summary = vec![];
        for (k, v) in &self.summary {
            item(k, v, &mut summary);
        }
        self.record(SUMMARY, &summary)?;
        let mut exit = vec![];
        wire::uint(1, exit_code, &mut exit);
        wire::uint(2, (now() - self.start) as u64, &mut exit);
        self.record(EXIT, &exit)?;
        self.flush()
    }

    /// The run completed: written to its end and marked finished (exit code 0).
    pub fn finish(&mut self) -> Result<()> {
        self.end(0)?;
        self.finished = true;
        Ok(())
    }
}

impl Drop for WandbRun {
    /// A run dropped before `finish` stopped with an error: ended with exit code 1, which W&B
    /// shows as failed (best effort).
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.end(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_eight_lowercase_alphanumerics() {
        let id = run_id("runs/x-20261203-000000");
        assert_eq!(id.len(), 8);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        assert_ne!(id, run_id("runs/y-20261203-000000"));
    }

    #[test]
    fn the_run_goes_where_the_config_and_environment_say() {
        let default = Path::new("runs/x");
        assert_eq!(root_for(None, None, None, default), None);
        assert_eq!(
            root_for(Some("eeg"), None, None, default),
            Some(default.into())
        );
        // WANDB_MODE=offline (or online: the network is never called) still writes offline.
        assert_eq!(
            root_for(Some("eeg"), Some("online"), None, default),
            Some(default.into())
        );
        assert_eq!(root_for(Some("eeg"), Some("disabled"), None, default), None);
        let dir = std::ffi::OsStr::new("/tmp/wb");
        assert_eq!(
            root_for(Some("eeg"), None, Some(dir), default),
            Some("/tmp/wb".into())
        );
    }

    #[test]
    fn numbers_are_written_as_python_json_writes_them() {
        assert_eq!(number_json(0.5), "0.5");
        assert_eq!(number_json(f64::NAN), "NaN");
        assert_eq!(number_json(f64::NEG_INFINITY), "-Infinity");
    }
}
