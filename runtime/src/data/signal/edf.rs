//! EDF/EDF+ and BDF/BDF+ recordings: reader and BDF writer.
//!
//! The header is fixed-width ASCII (256 bytes, then 256 per signal, field by field); data records
//! hold each signal's samples in turn, 16-bit (EDF) or 24-bit (BDF) little-endian two's
//! complement. Physical values are computed as MNE does, bit for bit:
//! `(digital · cal + offset) · unit`, `cal = (pmax − pmin)/(dmax − dmin)`,
//! `offset = pmin − dmin · cal`, with the unit scaled to volts (µV → 1e-6). An inverted range
//! (pmax < pmin) needs no special case. Signals may have different sample rates; records may
//! last any duration. EDF+/BDF+ annotation signals are parsed into onset/duration/text.
//! Every malformed field is an error naming the file, the field and its byte offset.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// 16-bit samples.
    Edf,
    /// 24-bit samples (BioSemi).
    Bdf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    pub label: String,
    pub transducer: String,
    /// Physical dimension as written (`uV`, `mV`...).
    pub unit: String,
    pub prefilter: String,
    pub physical_min: f64,
    pub physical_max: f64,
    pub digital_min: i32,
    pub digital_max: i32,
    pub samples_per_record: usize,
    /// Samples per second (samples per record / record duration).
    pub sample_rate: f64,
    /// Raw digital values, all records concatenated.
    pub digital: Vec<i32>,
}

impl Signal {
    /// A 16-bit µV channel at 0.1 µV per step (±3276.8 µV), one-second records at `rate` Hz,
    /// from microvolt values (rounded to the step): what the synthetic recordings are written as.
    pub fn microvolts(label: &str, rate: usize, microvolts: impl Iterator<Item = f64>) -> Signal {
        Signal {
            label: label.to_string(),
            transducer: String::new(),
            unit: "uV".into(),
            prefilter: String::new(),
            physical_min: -3276.8,
            physical_max: 3276.7,
            digital_min: -32768,
            digital_max: 32767,
            samples_per_record: rate,
            sample_rate: rate as f64,
            digital: microvolts.map(|uv| (uv * 10.0).round() as i32).collect(),
        }
    }

    /// The scale from the physical dimension to volts; 1 for non-voltage units.
    pub fn volts_per_unit(&self) -> f64 {
        match self.unit.trim() {
            "uV" | "µV" | "μV" | "microV" => 1e-6,
            "mV" => 1e-3,
            "nV" => 1e-9,
            _ => 1.0,
        }
    }

    /// Physical values in volts (MNE's arithmetic and order of operations).
    pub fn volts(&self) -> Vec<f64> {
        let cal = (self.physical_max - self.physical_min)
            / (self.digital_max as f64 - self.digital_min as f64);
        let offset = self.physical_min - self.digital_min as f64 * cal;
        let unit = self.volts_per_unit();
        self.digital
            .iter()
            .map(|&d| (d as f64 * cal + offset) * unit)
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Annotation {
    /// Seconds from the start of the recording.
    pub onset: f64,
    pub duration: f64,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Recording {
    pub path: PathBuf,
    pub format: Format,
    /// `EDF+C`, `EDF+D`, `BDF+C`... or empty for plain EDF/BDF.
    pub variant: String,
    pub patient: String,
    pub recording: String,
    /// `dd.mm.yy` and `hh.mm.ss` as written.
    pub start_date: String,
    pub start_time: String,
    pub record_duration: f64,
    pub records: usize,
    /// EDF+: seconds between the header's start time and the first sample (the first record's
    /// time stamp; sub-second start times live here). Annotation onsets are relative to the
    /// first sample, as MNE reports them.
    pub start_offset: f64,
    /// Data signals (annotation signals are parsed into `annotations` and left out).
    pub signals: Vec<Signal>,
    pub annotations: Vec<Annotation>,
}

impl Recording {
    /// A plain (non-+) recording of `signals` in records of `record_duration` seconds, each
    /// signal contributing its `samples_per_record` per record; patient and recording
    /// identification `X` (EDF+'s spelling of "not known"), started 01.01.20 00.00.00.
    pub fn new(path: &Path, format: Format, record_duration: f64, signals: Vec<Signal>) -> Self {
        let records = signals
            .first()
            .map_or(0, |s| s.digital.len() / s.samples_per_record.max(1));
        Recording {
            path: path.to_path_buf(),
            format,
            variant: String::new(),
            patient: "X".into(),
            recording: "X".into(),
            start_date: "01.01.20".into(),
            start_time: "00.00.00".into(),
            record_duration,
            records,
            start_offset: 0.0,
            signals,
            annotations: vec![],
        }
    }

    pub fn channel(&self, label: &str) -> Option<&Signal> {
        let norm = |s: &str| s.trim().trim_end_matches('.').to_uppercase();
        self.signals.iter().find(|s| norm(&s.label) == norm(label))
    }
}

/// A cursor over the header that reports the field and offset of any bad value.
struct Header<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Header<'a> {
    fn take(&mut self, len: usize, field: &str) -> Result<&'a [u8]> {
        let end = self.pos + len;
        let slice = self.bytes.get(self.pos..end).with_context(|| {
            format!(
                "{}: truncated header: field `{field}` needs bytes {}..{end}, the file has {}",
                self.path.display(),
                self.pos,
                self.bytes.len()
            )
        })?;
        self.pos = end;
        Ok(slice)
    }

    fn text(&mut self, len: usize, field: &str) -> Result<String> {
        let at = self.pos;
        let raw = self.take(len, field)?;
        // The standard says ASCII; Latin-1 and UTF-8 labels occur in the wild: keep them readable.
        let s = match std::str::from_utf8(raw) {
            Ok(s) => s.to_string(),
            Err(_) => raw.iter().map(|&b| b as char).collect(),
        };
        if s.chars().any(|c| c.is_control()) {
            bail!(
                "{}: field `{field}` at byte {at} holds control characters: {:?}",
                self.path.display(),
                s
            );
        }
        Ok(s.trim_end().to_string())
    }

    fn number<T: std::str::FromStr>(&mut self, len: usize, field: &str) -> Result<T> {
        let at = self.pos;
        let s = self.text(len, field)?;
        s.trim().parse::<T>().ok().with_context(|| {
            format!(
                "{}: field `{field}` at byte {at} is `{}`, not a number",
                self.path.display(),
                s.trim()
            )
        })
    }

    /// Per-signal fields come grouped: all labels, then all transducers, and so on.
    fn texts(&mut self, n: usize, len: usize, field: &str) -> Result<Vec<String>> {
        (0..n)
            .map(|i| self.text(len, &format!("{field} of signal {i}")))
            .collect()
    }

    fn numbers<T: std::str::FromStr>(
        &mut self,
        n: usize,
        len: usize,
        field: &str,
    ) -> Result<Vec<T>> {
        (0..n)
            .map(|i| self.number(len, &format!("{field} of signal {i}")))
            .collect()
    }
}

pub fn read(path: &Path) -> Result<Recording> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(path, &bytes)
}

pub fn parse(path: &Path, bytes: &[u8]) -> Result<Recording> {
    let mut h = Header {
        bytes,
        pos: 0,
        path,
    };
    let version = h.take(8, "version")?;
    let format = match version {
        b"0       " => Format::Edf,
        [0xff, b'B', b'I', b'O', b'S', b'E', b'M', b'I'] => Format::Bdf,
        _ => bail!(
            "{}: not an EDF or BDF file (version field at byte 0 is {:?})",
            path.display(),
            String::from_utf8_lossy(version)
        ),
    };
    let patient = h.text(80, "patient")?;
    let recording = h.text(80, "recording")?;
    let start_date = h.text(8, "start date")?;
    let start_time = h.text(8, "start time")?;
    let header_bytes: usize = h.number(8, "header size")?;
    let reserved = h.text(44, "reserved")?;
    let records_field: i64 = h.number(8, "number of data records")?;
    let record_duration: f64 = h.number(8, "data record duration")?;
    let ns: usize = h.number(4, "number of signals")?;
    if ns == 0 {
        bail!("{}: the header declares no signals", path.display());
    }
    if header_bytes != 256 * (ns + 1) {
        bail!(
            "{}: header size field (byte 184) says {header_bytes} bytes, but {ns} signals need {}",
            path.display(),
            256 * (ns + 1)
        );
    }
    let labels = h.texts(ns, 16, "label")?;
    let transducers = h.texts(ns, 80, "transducer")?;
    let units = h.texts(ns, 8, "physical dimension")?;
    let pmin: Vec<f64> = h.numbers(ns, 8, "physical minimum")?;
    let pmax: Vec<f64> = h.numbers(ns, 8, "physical maximum")?;
    let dmin: Vec<i32> = h.numbers(ns, 8, "digital minimum")?;
    let dmax: Vec<i32> = h.numbers(ns, 8, "digital maximum")?;
    let prefilters = h.texts(ns, 80, "prefiltering")?;
    let spr: Vec<usize> = h.numbers(ns, 8, "samples per record")?;
    h.texts(ns, 32, "signal reserved")?;

    let width = if format == Format::Edf { 2 } else { 3 };
    let record_bytes: usize = spr.iter().sum::<usize>() * width;
    if record_bytes == 0 {
        bail!("{}: every signal has 0 samples per record", path.display());
    }
    let data = &bytes[header_bytes..];
    let records = if records_field < 0 {
        data.len() / record_bytes // -1: unknown while recording; count whole records
    } else {
        let n = records_field as usize;
        if data.len() < n * record_bytes {
            bail!(
                "{}: truncated: the header declares {n} records of {record_bytes} bytes ({} bytes of data from byte {header_bytes}), the file has {}; record {} is incomplete",
                path.display(),
                n * record_bytes,
                data.len(),
                data.len() / record_bytes
            );
        }
        n
    };
    let annotation_label = if format == Format::Edf {
        "EDF Annotations"
    } else {
        "BDF Annotations"
    };
    let mut signals = vec![];
    let mut annotations = vec![];
    let mut start_offset = None;
    let mut offset_in_record = 0;
    for i in 0..ns {
        let n = spr[i];
        let is_annotation = labels[i].trim() == annotation_label;
        if !is_annotation && dmax[i] == dmin[i] {
            bail!(
                "{}: signal {i} ({}) has digital minimum = maximum = {}",
                path.display(),
                labels[i],
                dmin[i]
            );
        }
        let mut digital = Vec::with_capacity(if is_annotation { 0 } else { n * records });
        for r in 0..records {
            let start = r * record_bytes + offset_in_record;
            let chunk = &data[start..start + n * width];
            if is_annotation {
                let stamp = parse_annotations(chunk, &mut annotations).with_context(|| {
                    format!(
                        "{}: annotations of record {r} (byte {})",
                        path.display(),
                        header_bytes + start
                    )
                })?;
                if r == 0 {
                    start_offset = stamp;
                }
            } else if width == 2 {
                digital.extend(
                    chunk
                        .chunks_exact(2)
                        .map(|b| i16::from_le_bytes([b[0], b[1]]) as i32),
                );
            } else {
                digital.extend(
                    chunk
                        .chunks_exact(3)
                        .map(|b| i32::from_le_bytes([0, b[0], b[1], b[2]]) >> 8),
                );
            }
        }
        offset_in_record += n * width;
        if !is_annotation {
            signals.push(Signal {
                label: labels[i].clone(),
                transducer: transducers[i].clone(),
                unit: units[i].clone(),
                prefilter: prefilters[i].clone(),
                physical_min: pmin[i],
                physical_max: pmax[i],
                digital_min: dmin[i],
                digital_max: dmax[i],
                samples_per_record: n,
                sample_rate: if record_duration > 0.0 {
                    n as f64 / record_duration
                } else {
                    0.0
                },
                digital,
            });
        }
    }
    let start_offset = start_offset.unwrap_or(0.0);
    for a in &mut annotations {
        a.onset -= start_offset;
    }
    let variant = if reserved.starts_with("EDF+") || reserved.starts_with("BDF+") {
        reserved.chars().take(5).collect() // `EDF+C`, `EDF+D`; a bare `EDF+` stays as is
    } else {
        String::new()
    };
    Ok(Recording {
        path: path.to_path_buf(),
        format,
        variant,
        patient,
        recording,
        start_date,
        start_time,
        record_duration,
        records,
        start_offset,
        signals,
        annotations,
    })
}

/// Time-stamped annotation lists: `+onset[\x15duration]\x14text\x14[text\x14...]\x00`. The first
/// list of each record is its time stamp (no text): it is returned, not collected.
fn parse_annotations(chunk: &[u8], out: &mut Vec<Annotation>) -> Result<Option<f64>> {
    let mut stamp = None;
    for tal in chunk.split(|&b| b == 0).filter(|t| !t.is_empty()) {
        let mut parts = tal.split(|&b| b == 0x14);
        let head =
            std::str::from_utf8(parts.next().unwrap_or_default()).context("non-UTF-8 onset")?;
        let (onset, duration) = match head.split_once('\u{15}') {
            Some((o, d)) => (o, Some(d)),
            None => (head, None),
        };
        let onset: f64 = onset
            .parse()
            .ok()
            .with_context(|| format!("bad annotation onset `{onset}`"))?;
        let duration: f64 = match duration {
            Some(d) => d
                .parse()
                .ok()
                .with_context(|| format!("bad annotation duration `{d}`"))?,
            None => 0.0,
        };
        let texts: Vec<&[u8]> = parts.filter(|t| !t.is_empty()).collect();
        if texts.is_empty() && stamp.is_none() {
            stamp = Some(onset);
        }
        for text in texts {
            out.push(Annotation {
                onset,
                duration,
                text: String::from_utf8_lossy(text).into_owned(),
            });
        }
    }
    Ok(stamp)
}

/// Write `rec`'s data signals as a BDF file (24-bit), keeping each signal's calibration, so the
/// digital values — and the volts — round-trip exactly. Written atomically.
pub fn write_bdf(path: &Path, rec: &Recording) -> Result<()> {
    write(path, rec, Format::Bdf)
}

/// Write `rec`'s data signals as EDF (16-bit) or BDF (24-bit), atomically.
pub fn write(path: &Path, rec: &Recording, format: Format) -> Result<()> {
    let ns = rec.signals.len();
    let bits = if format == Format::Edf { 16 } else { 24 };
    for s in &rec.signals {
        if s.digital_min < -(1 << (bits - 1)) || s.digital_max >= 1 << (bits - 1) {
            bail!(
                "signal {} has digital range {}..{}, beyond {bits} bits",
                s.label,
                s.digital_min,
                s.digital_max
            );
        }
        if s.digital.len() != s.samples_per_record * rec.records {
            bail!(
                "signal {} has {} samples, not {} records × {}",
                s.label,
                s.digital.len(),
                rec.records,
                s.samples_per_record
            );
        }
    }
    let field = |s: &str, len: usize| -> Vec<u8> {
        let mut b: Vec<u8> = s.bytes().take(len).collect();
        b.resize(len, b' ');
        b
    };
    let mut out = vec![];
    if format == Format::Edf {
        out.extend_from_slice(b"0       ");
    } else {
        out.push(0xff);
        out.extend_from_slice(b"BIOSEMI");
    }
    out.extend(field(&rec.patient, 80));
    out.extend(field(&rec.recording, 80));
    out.extend(field(&rec.start_date, 8));
    out.extend(field(&rec.start_time, 8));
    out.extend(field(&(256 * (ns + 1)).to_string(), 8));
    out.extend(field(if format == Format::Edf { "" } else { "24BIT" }, 44));
    out.extend(field(&rec.records.to_string(), 8));
    out.extend(field(&format_number(rec.record_duration), 8));
    out.extend(field(&ns.to_string(), 4));
    let per = |f: &dyn Fn(&Signal) -> String, len: usize, out: &mut Vec<u8>| {
        for s in &rec.signals {
            out.extend(field(&f(s), len));
        }
    };
    per(&|s| s.label.clone(), 16, &mut out);
    per(&|s| s.transducer.clone(), 80, &mut out);
    per(&|s| s.unit.clone(), 8, &mut out);
    per(&|s| format_number(s.physical_min), 8, &mut out);
    per(&|s| format_number(s.physical_max), 8, &mut out);
    per(&|s| s.digital_min.to_string(), 8, &mut out);
    per(&|s| s.digital_max.to_string(), 8, &mut out);
    per(&|s| s.prefilter.clone(), 80, &mut out);
    per(&|s| s.samples_per_record.to_string(), 8, &mut out);
    per(&|_| String::new(), 32, &mut out);
    for r in 0..rec.records {
        for s in &rec.signals {
            let n = s.samples_per_record;
            for &d in &s.digital[r * n..(r + 1) * n] {
                out.extend_from_slice(&d.to_le_bytes()[..bits / 8]);
            }
        }
    }
    crate::data::io::write_atomic(path, |w| Ok(w.write_all(&out)?))
}

/// A header number in at most 8 characters, exactly as parsed back.
fn format_number(v: f64) -> String {
    let s = format!("{v}");
    if s.len() <= 8 {
        s
    } else {
        format!(
            "{v:.*}",
            8usize.saturating_sub(format!("{}", v.trunc()).len() + 1)
        )
    }
}
