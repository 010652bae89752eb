//! File formats: PNG and NPY read/write, and atomic writes (temporary file + rename), so an
//! interrupted run never leaves half a file behind.

use std::io::{BufWriter, Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Write `bytes` to `path` through a temporary file in the same directory, synced to disk,
/// then rename: after a crash the file is either the old one or the whole new one.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    write_through_temp(path, true, write)
}

/// As [`write_atomic`] without the sync, for the many small files of a dataset: an interrupted
/// process still never leaves a partial file, but after a power loss a file may be empty, so
/// readers that resume (preprocessing) treat an empty file as missing. Syncing each of
/// thousands of PNGs costs a fifth of the preprocessing throughput on two threads.
pub fn write_atomic_unsynced(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    write_through_temp(path, false, write)
}

/// A temporary file name next to `path` (hidden, with the process id), its directory created:
/// where an atomic write goes before its rename.
pub fn temp_path_for(path: &Path) -> Result<std::path::PathBuf> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    )))
}

fn write_through_temp(
    path: &Path,
    sync: bool,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let tmp = temp_path_for(path)?;
    let result = (|| {
        let f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = BufWriter::new(f);
        write(&mut w)?;
        w.flush()?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        if sync {
            file.sync_all()?;
        }
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} into place", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Decode an 8-bit grey or RGB PNG file: (pixels, channels, height, width).
pub fn read_png(path: &Path) -> Result<(Vec<u8>, usize, usize, usize)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot open {}", path.display()))?;
    decode_png(&bytes, &path.display().to_string())
}

/// Decode PNG bytes (named `what` in errors): (pixels, channels, height, width); alpha is
/// dropped, 16-bit samples are cut to 8.
pub fn decode_png(bytes: &[u8], what: &str) -> Result<(Vec<u8>, usize, usize, usize)> {
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec
        .read_info()
        .with_context(|| format!("{what}: not a readable PNG"))?;
    let mut buf = vec![0; reader.output_buffer_size().context("PNG too large")?];
    let info = reader
        .next_frame(&mut buf)
        .with_context(|| format!("{what}: corrupt PNG data"))?;
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => bail!("{what}: indexed PNG after expansion"),
    };
    buf.truncate(info.buffer_size());
    let (h, w) = (info.height as usize, info.width as usize);
    if channels == 2 || channels == 4 {
        // Drop alpha: the datasets are L or RGB.
        let keep = channels - 1;
        let px: Vec<u8> = buf
            .chunks(channels)
            .flat_map(|c| c[..keep].to_vec())
            .collect();
        return Ok((px, keep, h, w));
    }
    Ok((buf, channels, h, w))
}

/// Encode 8-bit grey (1 channel) or RGB (3) pixels as PNG bytes (fast deflate: still a valid
/// PNG, several times quicker to write than the default level).
pub fn encode_png(pixels: &[u8], channels: usize, height: usize, width: usize) -> Result<Vec<u8>> {
    let mut out = vec![];
    let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
    enc.set_color(if channels == 1 {
        png::ColorType::Grayscale
    } else {
        png::ColorType::Rgb
    });
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fastest);
    let mut wr = enc.write_header()?;
    wr.write_image_data(pixels)?;
    wr.finish()?;
    Ok(out)
}

/// Encode an 8-bit grey (1) or RGB (3) PNG, atomically (not synced: see
/// [`write_atomic_unsynced`]).
pub fn write_png(
    path: &Path,
    pixels: &[u8],
    channels: usize,
    height: usize,
    width: usize,
) -> Result<()> {
    let bytes = encode_png(pixels, channels, height, width)?;
    write_atomic_unsynced(path, |w| Ok(w.write_all(&bytes)?))
        .with_context(|| format!("writing {}", path.display()))
}

/// Read a C-order `.npy` file: (shape, dtype descr such as `<f4`, raw data bytes).
pub fn read_npy(path: &Path) -> Result<(Vec<usize>, String, Vec<u8>)> {
    let mut bytes = vec![];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("{}: not an .npy file (bad magic)", path.display());
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => bail!("{}: unsupported .npy version {v}", path.display()),
    };
    let header = std::str::from_utf8(
        bytes
            .get(start..start + hlen)
            .context("truncated .npy header")?,
    )
    .context("non-UTF-8 .npy header")?;
    if header.contains("'fortran_order': True") {
        bail!(
            "{}: Fortran-order arrays are not supported; save with C order",
            path.display()
        );
    }
    let descr = header
        .split("'descr': '")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .context("no descr in .npy header")?
        .to_string();
    let shape_txt = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .context("no shape in .npy header")?;
    let shape: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().context("bad .npy shape"))
        .collect::<Result<_>>()?;
    let item = match descr.as_str() {
        "<f4" => 4,
        "<f8" => 8,
        "|u1" | "<u1" => 1,
        d => bail!(
            "{}: unsupported dtype `{d}` (expected <f4, <f8 or u1)",
            path.display()
        ),
    };
    let data = bytes[start + hlen..].to_vec();
    let n: usize = shape.iter().product();
    if data.len() != item * n {
        bail!(
            "{}: {} data bytes for shape {shape:?} of {descr} (expected {}); the file is truncated",
            path.display(),
            data.len(),
            item * n
        );
    }
    Ok((shape, descr, data))
}

/// A float32 `.npy` array (the time-series sample format).
pub fn read_npy_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let (shape, descr, data) = read_npy(path)?;
    if descr != "<f4" {
        bail!(
            "{}: expected float32 ('<f4') data, found `{descr}`",
            path.display()
        );
    }
    Ok((
        shape,
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    ))
}

/// A float64 `.npy` array.
pub fn read_npy_f64(path: &Path) -> Result<(Vec<usize>, Vec<f64>)> {
    let (shape, descr, data) = read_npy(path)?;
    if descr != "<f8" {
        bail!(
            "{}: expected float64 ('<f8') data, found `{descr}`",
            path.display()
        );
    }
    Ok((
        shape,
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    ))
}

/// Write a float32, C-order `.npy` file (format 1.0), atomically.
pub fn write_npy_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape_txt = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Pad so that the data starts on a 64-byte boundary, ending the header with a newline.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    write_atomic_unsynced(path, |w| {
        w.write_all(b"\x93NUMPY\x01\x00")?;
        w.write_all(&(header.len() as u16).to_le_bytes())?;
        w.write_all(header.as_bytes())?;
        for v in data {
            w.write_all(&v.to_le_bytes())?;
        }
        Ok(())
    })
    .with_context(|| format!("writing {}", path.display()))
}

/// FNV-1a: the config hash a checkpoint records, and a cache's source fingerprint.
pub fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
