//! Neuroscan `.cnt` continuous recordings (SEED's format), read as MNE's `read_raw_cnt` reads
//! them, plus a writer for tests and tools.
//!
//! Layout: a 900-byte SETUP header, one 75-byte electrode record per channel, the samples
//! (16- or 32-bit little-endian integers, multiplexed in blocks of `channel_offset` samples per
//! channel; usually 1, i.e. interleaved), then the event table. Volts per channel:
//! `(raw − baseline) · calibration · sensitivity · 1e-6 / 204.8`.
//!
//! The header's sample count is unreliable, so the sample width is inferred as MNE 1.5.1 (the
//! version the reference pins) does: `width = data bytes // (channels · header samples)` when
//! that is 2 or 4, else 2 with the sample count recomputed from the data size. MNE ≥ 1.6 raises
//! instead when the data size is not an exact multiple, which is why one SEED recording needs
//! the old MNE; here such a file reads as it did for the reference, with a warning, and the
//! sample count is capped at what the file holds.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub const SETUP_BYTES: usize = 900;
pub const ELECTRODE_BYTES: usize = 75;
const CHANNELS_AT: usize = 370;
const RATE_AT: usize = 376;
const SAMPLES_AT: usize = 864;
const EVENT_TABLE_AT: usize = 886;
const CHANNEL_OFFSET_AT: usize = 894;

#[derive(Debug, Clone, PartialEq)]
pub struct Electrode {
    pub label: String,
    pub baseline: i16,
    pub sensitivity: f32,
    pub calibration: f32,
}

impl Electrode {
    pub fn volts_per_count(&self) -> f64 {
        self.calibration as f64 * self.sensitivity as f64 * 1e-6 / 204.8
    }
}

#[derive(Debug, Clone)]
pub struct Header {
    pub path: PathBuf,
    pub sample_rate: f64,
    pub electrodes: Vec<Electrode>,
    pub samples: usize,
    /// Bytes per sample: 2 or 4.
    pub width: usize,
    /// Samples of one channel stored together.
    pub channel_offset: usize,
    /// Why the sample count or width disagree with the header, if they do.
    pub warning: Option<String>,
}

fn field<const N: usize>(h: &[u8], at: usize, path: &Path, name: &str) -> Result<[u8; N]> {
    h.get(at..at + N)
        .and_then(|b| b.try_into().ok())
        .with_context(|| {
            format!(
                "{}: truncated header: `{name}` needs bytes {at}..{}, the file has {}",
                path.display(),
                at + N,
                h.len()
            )
        })
}

pub fn read_header(path: &Path) -> Result<Header> {
    let p = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {p}"))?;
    let file_len = file.metadata()?.len() as usize;
    // The SETUP header and at most 65535 electrode records: all a header can span.
    let mut head = vec![];
    file.take((SETUP_BYTES + ELECTRODE_BYTES * u16::MAX as usize) as u64)
        .read_to_end(&mut head)
        .with_context(|| format!("cannot read {p}"))?;
    parse_header(path, &head, file_len)
}

/// The header from the file's first bytes (`head`: at least the SETUP header and the electrode
/// records, if the file has them) and the file's length.
pub fn parse_header(path: &Path, head: &[u8], file_len: usize) -> Result<Header> {
    let p = path.display();
    let setup = &head[..SETUP_BYTES.min(head.len())];
    let n = u16::from_le_bytes(field(setup, CHANNELS_AT, path, "number of channels")?) as usize;
    if n == 0 {
        bail!("{p}: the header (byte {CHANNELS_AT}) declares 0 channels");
    }
    let sample_rate = u16::from_le_bytes(field(setup, RATE_AT, path, "sampling rate")?) as f64;
    if sample_rate == 0.0 {
        bail!("{p}: the header (byte {RATE_AT}) declares a sampling rate of 0 Hz");
    }
    let header_samples = i32::from_le_bytes(field(setup, SAMPLES_AT, path, "number of samples")?);
    let event_table =
        i32::from_le_bytes(field(setup, EVENT_TABLE_AT, path, "event table position")?);
    let channel_offset_raw =
        i32::from_le_bytes(field(setup, CHANNEL_OFFSET_AT, path, "channel offset")?);
    let data_start = SETUP_BYTES + ELECTRODE_BYTES * n;
    let records = head.get(SETUP_BYTES..data_start).with_context(|| {
        format!(
            "{p}: truncated: {n} electrode records need bytes {SETUP_BYTES}..{data_start}, the file has {file_len}"
        )
    })?;
    let electrodes = records
        .chunks_exact(ELECTRODE_BYTES)
        .map(|r| {
            let end = r[..10].iter().position(|&b| b == 0).unwrap_or(10);
            Electrode {
                label: String::from_utf8_lossy(&r[..end]).trim().to_string(),
                baseline: i16::from_le_bytes([r[47], r[48]]),
                sensitivity: f32::from_le_bytes(r[59..63].try_into().expect("4 bytes")),
                calibration: f32::from_le_bytes(r[71..75].try_into().expect("4 bytes")),
            }
        })
        .collect();

    // Files of 2 GB and more overflow the event table position; MNE then needs the width
    // given. None of the datasets has such files.
    if file_len >= 2_000_000_000 {
        bail!("{p}: CNT files of 2 GB or more (this one is {file_len} bytes) have an unreliable event table position and are not supported");
    }
    let data_bytes = if (event_table as i64) < data_start as i64 {
        bail!("{p}: the event table position (byte {EVENT_TABLE_AT}) is {event_table}, before the end of the electrode records ({data_start})");
    } else {
        event_table as usize - data_start
    };
    // What a truncated file still holds.
    let present = file_len.saturating_sub(data_start).min(data_bytes);
    let mut warning = None;
    let (width, mut samples) = {
        let per_channel_sample = n * header_samples.max(0) as usize;
        let inferred = data_bytes.checked_div(per_channel_sample).unwrap_or(0);
        if inferred == 2 || inferred == 4 {
            if data_bytes % per_channel_sample != 0 {
                warning = Some(format!("the data size ({data_bytes} bytes) is not {n} channels × {header_samples} samples × {inferred} bytes; read as {inferred}-byte samples, as MNE 1.5 does (MNE ≥ 1.6 refuses this file)"));
            }
            (inferred, header_samples as usize)
        } else {
            warning = Some(format!("the header's sample count ({header_samples}) does not fit the data size ({data_bytes} bytes, {n} channels); read as 16-bit samples, as MNE 1.5 does"));
            (2, data_bytes / (2 * n))
        }
    };
    if samples * n * width > present {
        let held = present / (n * width);
        warning = Some(format!(
            "truncated: the header promises {samples} samples, the file holds {held}; reading {held}"
        ));
        samples = held;
    }
    if samples == 0 {
        bail!("{p}: holds no samples (data from byte {data_start} to the event table at {event_table})");
    }
    let channel_offset = if channel_offset_raw > 1 {
        (channel_offset_raw as usize / width).max(1)
    } else {
        1
    };
    Ok(Header {
        path: path.to_path_buf(),
        sample_rate,
        electrodes,
        samples,
        width,
        channel_offset,
        warning,
    })
}

impl Header {
    pub fn labels(&self) -> Vec<String> {
        self.electrodes.iter().map(|e| e.label.clone()).collect()
    }

    /// The channels `picks` in volts, streaming through the file.
    pub fn volts(&self, picks: &[usize]) -> Result<Vec<Vec<f64>>> {
        let p = self.path.display();
        let n = self.electrodes.len();
        if let Some(&bad) = picks.iter().find(|&&c| c >= n) {
            bail!("{p}: has {n} channels; channel index {bad} was asked for");
        }
        let mut file =
            std::fs::File::open(&self.path).with_context(|| format!("cannot read {p}"))?;
        let start = SETUP_BYTES + ELECTRODE_BYTES * n;
        file.seek(SeekFrom::Start(start as u64))?;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        let block = self.channel_offset;
        let chunk_bytes = block * n * self.width;
        let mut chunk = vec![0u8; chunk_bytes];
        let mut out = vec![Vec::with_capacity(self.samples); picks.len()];
        let scale: Vec<(f64, f64)> = picks
            .iter()
            .map(|&c| {
                let e = &self.electrodes[c];
                (e.baseline as f64, e.volts_per_count())
            })
            .collect();
        let mut t = 0;
        while t < self.samples {
            let got = read_up_to(&mut reader, &mut chunk)?;
            let frames = (self.samples - t).min(block);
            if got < ((n - 1) * block + frames) * self.width {
                bail!("{p}: truncated: the samples end inside sample {t}");
            }
            for (o, (&c, &(baseline, cal))) in out.iter_mut().zip(picks.iter().zip(&scale)) {
                for s in 0..frames {
                    let i = (c * block + s) * self.width;
                    let raw = match self.width {
                        2 => i16::from_le_bytes([chunk[i], chunk[i + 1]]) as f64,
                        _ => {
                            i32::from_le_bytes(chunk[i..i + 4].try_into().expect("4 bytes")) as f64
                        }
                    };
                    o.push((raw - baseline) * cal);
                }
            }
            t += frames;
        }
        Ok(out)
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..])? {
            0 => {
                buf[got..].fill(0);
                break;
            }
            k => got += k,
        }
    }
    Ok(got)
}

/// Writes a continuous `.cnt` with 32-bit or 16-bit samples, interleaved (channel offset 1),
/// and an empty event table. `raw[c][t]` are integer counts; `electrodes` give the scaling.
pub fn write(
    path: &Path,
    sample_rate: u16,
    electrodes: &[Electrode],
    raw: &[Vec<i32>],
    width: usize,
) -> Result<()> {
    let n = electrodes.len();
    let samples = raw.first().map_or(0, Vec::len);
    let data_start = SETUP_BYTES + ELECTRODE_BYTES * n;
    let event_table = data_start + samples * n * width;
    let mut setup = vec![0u8; SETUP_BYTES];
    setup[..12].copy_from_slice(b"Version 3.0\0");
    setup[225..233].copy_from_slice(b"01/01/20");
    setup[235..243].copy_from_slice(b"12:00:00");
    setup[CHANNELS_AT..CHANNELS_AT + 2].copy_from_slice(&(n as u16).to_le_bytes());
    setup[RATE_AT..RATE_AT + 2].copy_from_slice(&sample_rate.to_le_bytes());
    setup[SAMPLES_AT..SAMPLES_AT + 4].copy_from_slice(&(samples as i32).to_le_bytes());
    setup[EVENT_TABLE_AT..EVENT_TABLE_AT + 4].copy_from_slice(&(event_table as i32).to_le_bytes());
    setup[CHANNEL_OFFSET_AT..CHANNEL_OFFSET_AT + 4].copy_from_slice(&(width as i32).to_le_bytes());
    crate::data::io::write_atomic(path, |w| {
        w.write_all(&setup)?;
        for e in electrodes {
            let mut r = [0u8; ELECTRODE_BYTES];
            let label = e.label.as_bytes();
            r[..label.len().min(9)].copy_from_slice(&label[..label.len().min(9)]);
            r[47..49].copy_from_slice(&e.baseline.to_le_bytes());
            r[59..63].copy_from_slice(&e.sensitivity.to_le_bytes());
            r[71..75].copy_from_slice(&e.calibration.to_le_bytes());
            w.write_all(&r)?;
        }
        let mut frame = Vec::with_capacity(n * width);
        for t in 0..samples {
            frame.clear();
            for ch in raw {
                match width {
                    2 => frame.extend_from_slice(&(ch[t] as i16).to_le_bytes()),
                    _ => frame.extend_from_slice(&ch[t].to_le_bytes()),
                }
            }
            w.write_all(&frame)?;
        }
        // Empty event table: TEEG type 1, size 0, offset 0.
        w.write_all(&[1, 0, 0, 0, 0, 0, 0, 0, 0])?;
        Ok(())
    })
}
