//! TensorBoard event files, written by hand (no TensorFlow): TFRecord framing (length, masked
//! CRC-32C of the length, payload, masked CRC-32C of the payload) around `Event` messages whose
//! `Summary` holds scalars, images, histograms, text and the hparams plugin's session records.
//! TensorBoard's own `EventAccumulator` and `plugin_data_pb2` read them back in the tests.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::wire::{self, now};

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
    crc32c(bytes).rotate_right(15).wrapping_add(0xa282_ead8)
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
            HParam::Number(x) => wire::double(2, *x, out),
            HParam::Text(s) => wire::bytes(3, s.as_bytes(), out),
            HParam::Bool(b) => wire::uint(4, u64::from(*b), out),
        }
    }
}

/// The hparams plugin's session status (`api.proto`): success, failure.
const STATUS_SUCCESS: u64 = 1;
const STATUS_FAILURE: u64 = 2;

/// A length-0 float tensor (dtype 1, shape [0]): the plugin's `NULL_TENSOR`, which a summary
/// that only carries metadata holds.
const NULL_TENSOR: [u8; 6] = [0x08, 0x01, 0x12, 0x02, 0x12, 0x00];

/// A histogram's summary: count, sum, sum of squares, extremes and bucket counts, as
/// `HistogramProto` holds them (TensorBoard draws the buckets; the rest feed its tooltips).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub min: f64,
    pub max: f64,
    pub num: f64,
    pub sum: f64,
    pub sum_squares: f64,
    /// Each bucket's right edge (the last is +max); the left edge of the first is `min`.
    pub bucket_limit: Vec<f64>,
    pub bucket: Vec<f64>,
}

impl Histogram {
    /// `values` in `buckets` equal-width buckets between their min and max (NaN and infinities
    /// left out, as TensorBoard cannot draw them; `None` when nothing finite is left).
    pub fn of(values: &[f32], buckets: usize) -> Option<Histogram> {
        let finite = || values.iter().filter(|v| v.is_finite()).map(|&v| v as f64);
        let (min, max) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        if min > max {
            return None;
        }
        let buckets = buckets.max(1);
        let width = (max - min) / buckets as f64;
        let mut bucket = vec![0.0; buckets];
        let (mut num, mut sum, mut sum_squares) = (0.0, 0.0, 0.0);
        for v in finite() {
            let i = if width > 0.0 {
                (((v - min) / width) as usize).min(buckets - 1)
            } else {
                0
            };
            bucket[i] += 1.0;
            num += 1.0;
            sum += v;
            sum_squares += v * v;
        }
        let bucket_limit = (1..=buckets)
            .map(|i| {
                if i == buckets {
                    max
                } else {
                    min + width * i as f64
                }
            })
            .collect();
        Some(Histogram {
            min,
            max,
            num,
            sum,
            sum_squares,
            bucket_limit,
            bucket,
        })
    }

    /// `HistogramProto{min = 1, max = 2, num = 3, sum = 4, sum_squares = 5, bucket_limit = 6,
    /// bucket = 7}`.
    fn encode(&self, out: &mut Vec<u8>) {
        wire::double(1, self.min, out);
        wire::double(2, self.max, out);
        wire::double(3, self.num, out);
        wire::double(4, self.sum, out);
        wire::double(5, self.sum_squares, out);
        wire::packed_doubles(6, &self.bucket_limit, out);
        wire::packed_doubles(7, &self.bucket, out);
    }
}

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
        wire::double(1, now(), &mut ev);
        wire::bytes(3, b"brain.Event:2", &mut ev);
        tb.record(&ev)?;
        Ok(tb)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let pieces: [&[u8]; 4] = [
            &len,
            &masked_crc(&len).to_le_bytes(),
            data,
            &masked_crc(data).to_le_bytes(),
        ];
        for piece in pieces {
            self.file
                .write_all(piece)
                .with_context(|| format!("cannot write {}", self.path.display()))?;
        }
        Ok(())
    }

    pub fn scalar(&mut self, tag: &str, value: f64, step: u64) -> Result<()> {
        let mut val = vec![];
        wire::bytes(1, tag.as_bytes(), &mut val);
        wire::float(2, value as f32, &mut val);
        self.summary(&val, step)
    }

    /// A histogram (`Summary.Value.histo` = 5), which the Histograms and Distributions tabs draw.
    pub fn histogram(&mut self, tag: &str, histogram: &Histogram, step: u64) -> Result<()> {
        let mut histo = vec![];
        histogram.encode(&mut histo);
        let mut val = vec![];
        wire::bytes(1, tag.as_bytes(), &mut val);
        wire::bytes(5, &histo, &mut val);
        self.summary(&val, step)
    }

    /// An `Event{wall_time = 1, step = 2, summary = 5}` holding a `Summary` with one encoded
    /// `Summary.Value`.
    fn summary(&mut self, value: &[u8], step: u64) -> Result<()> {
        let mut summary = vec![];
        wire::bytes(1, value, &mut summary);
        let mut ev = vec![];
        wire::double(1, now(), &mut ev);
        wire::uint(2, step, &mut ev);
        wire::bytes(5, &summary, &mut ev);
        self.record(&ev)
    }

    /// A text summary (the text plugin renders it as Markdown): a string `TensorProto` (dtype
    /// DT_STRING = 7, scalar shape) with the plugin named in the value's metadata.
    pub fn text(&mut self, tag: &str, text: &str, step: u64) -> Result<()> {
        let mut tensor = vec![];
        wire::uint(1, 7, &mut tensor);
        wire::bytes(2, &[], &mut tensor);
        wire::bytes(8, text.as_bytes(), &mut tensor);
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
        wire::bytes(1, plugin_name, &mut plugin);
        if let Some(c) = content {
            wire::bytes(2, c, &mut plugin);
        }
        let mut metadata = vec![];
        wire::bytes(1, &plugin, &mut metadata);
        let mut val = vec![];
        wire::bytes(1, tag.as_bytes(), &mut val);
        wire::bytes(8, tensor, &mut val);
        wire::bytes(9, &metadata, &mut val);
        self.summary(&val, step)
    }

    /// A summary value carrying only the hparams plugin's data (`HParamsPluginData`, version 0,
    /// with `data_field` = 3 session start or 4 session end).
    fn hparams_record(&mut self, tag: &str, data_field: u32, data: &[u8]) -> Result<()> {
        let mut content = vec![];
        wire::uint(1, 0, &mut content);
        wire::bytes(data_field, data, &mut content);
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
            wire::bytes(1, key.as_bytes(), &mut entry);
            wire::bytes(2, &v, &mut entry);
            wire::bytes(1, &entry, &mut info);
        }
        wire::double(5, now(), &mut info);
        self.hparams_record("_hparams_/session_start_info", 3, &info)?;
        self.session_open = true;
        Ok(())
    }

    /// `SessionEndInfo{status = 1, end_time_secs = 2}`.
    pub fn hparams_end(&mut self, success: bool) -> Result<()> {
        let mut info = vec![];
        let status = if success {
            STATUS_SUCCESS
        } else {
            STATUS_FAILURE
        };
        wire::uint(1, status, &mut info);
        wire::double(2, now(), &mut info);
        self.hparams_record("_hparams_/session_end_info", 4, &info)?;
        self.session_open = false;
        self.flush()
    }

    /// An image summary (`encoded` is a PNG of `height`×`width`, `channels` colour channels):
    /// `Image{height = 1, width = 2, colorspace = 3, encoded_image_string = 4}`.
    pub fn image(
        &mut self,
        tag: &str,
        encoded: &[u8],
        height: usize,
        width: usize,
        channels: usize,
        step: u64,
    ) -> Result<()> {
        let mut img = vec![];
        wire::uint(1, height as u64, &mut img);
        wire::uint(2, width as u64, &mut img);
        wire::uint(3, channels as u64, &mut img);
        wire::bytes(4, encoded, &mut img);
        let mut val = vec![];
        wire::bytes(1, tag.as_bytes(), &mut val);
        wire::bytes(4, &img, &mut val);
        self.summary(&val, step)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .with_context(|| format!("cannot write {}", self.path.display()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn histograms_count_every_finite_value_once() {
        let h = Histogram::of(&[0.0, 1.0, 2.0, 3.0, 4.0, f32::NAN, f32::INFINITY], 4).unwrap();
        assert_eq!((h.min, h.max, h.num), (0.0, 4.0, 5.0));
        assert_eq!(h.bucket, [1.0, 1.0, 1.0, 2.0]);
        assert_eq!(h.bucket_limit, [1.0, 2.0, 3.0, 4.0]);
        assert_eq!((h.sum, h.sum_squares), (10.0, 30.0));
        // A constant tensor (a zero-initialised bias) is one bucket at its value.
        let c = Histogram::of(&[0.5; 3], 8).unwrap();
        assert_eq!((c.bucket[0], c.bucket.iter().sum::<f64>()), (3.0, 3.0));
        assert!(Histogram::of(&[f32::NAN], 4).is_none());
    }
}
