//! MATLAB level-5 MAT-files: the container of EEGLAB's `.set` (MATLAB `save` up to `-v7`, and
//! scipy's `savemat`). Version 7.3 files are HDF5 and are refused with a way out.
//!
//! A file is a 128-byte header then data elements. An element is an 8-byte tag (type, byte
//! count) and its data padded to 8 bytes; a "small" element packs a count ≤ 4 and its data into
//! the tag itself. `miCOMPRESSED` holds one zlib-deflated element (not padded); `miMATRIX` holds
//! an array: flags (class), dimensions, name, then the class's content. Numeric arrays may be
//! stored in a narrower type than their class (a double array of small integers as `miUINT8`).
//! All values are read as f64 (column-major, MATLAB's order); only little-endian files exist in
//! practice and only those are read.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any numeric or logical class, real part, column-major.
    Numeric { dims: Vec<usize>, data: Vec<f64> },
    /// A character array; the rows of a 2-D one are joined by `\n`.
    Char(String),
    /// A struct array: `values[element * fields.len() + field]`.
    Struct {
        dims: Vec<usize>,
        fields: Vec<String>,
        values: Vec<Value>,
    },
    Cell {
        dims: Vec<usize>,
        values: Vec<Value>,
    },
    /// Sparse matrices, function handles and other classes no EEG file field needs.
    Unsupported { class: u8 },
}

impl Value {
    /// A field of a 1×1 struct (or of the first element of a struct array).
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.field_of(0, name)
    }

    /// A field of element `i` of a struct array.
    pub fn field_of(&self, i: usize, name: &str) -> Option<&Value> {
        match self {
            Value::Struct { fields, values, .. } => {
                let f = fields.iter().position(|f| f == name)?;
                values.get(i * fields.len() + f)
            }
            _ => None,
        }
    }

    /// Number of elements (product of the dimensions).
    pub fn len(&self) -> usize {
        match self {
            Value::Numeric { dims, .. } | Value::Struct { dims, .. } | Value::Cell { dims, .. } => {
                dims.iter().product()
            }
            Value::Char(s) => s.chars().count(),
            Value::Unsupported { .. } => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value of a numeric scalar.
    pub fn scalar(&self) -> Option<f64> {
        match self {
            Value::Numeric { data, .. } if data.len() == 1 => Some(data[0]),
            _ => None,
        }
    }

    pub fn text(&self) -> Option<&str> {
        match self {
            Value::Char(s) => Some(s),
            _ => None,
        }
    }
}

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;
const MI_UTF16: u32 = 17;
const MI_UTF32: u32 = 18;

const CLASS_CELL: u8 = 1;
const CLASS_STRUCT: u8 = 2;
const CLASS_OBJECT: u8 = 3;
const CLASS_CHAR: u8 = 4;

/// The top-level variables of a MAT-file, in file order.
pub fn read(path: &Path) -> Result<Vec<(String, Value)>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(path, &bytes)
}

pub fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<(String, Value)>> {
    let p = path.display();
    if bytes.len() < 128 {
        bail!(
            "{p}: truncated: a MAT-file starts with a 128-byte header, the file has {} bytes",
            bytes.len()
        );
    }
    let text = String::from_utf8_lossy(&bytes[..116]);
    if text.starts_with("MATLAB 7.3") || bytes.starts_with(b"\x89HDF") {
        bail!("{p}: a MATLAB v7.3 (HDF5) file; only level-5 MAT-files (MATLAB -v7 and older) are read. Resave it from EEGLAB with pop_saveset(EEG, 'filename', ..., 'version', '7'), or from MATLAB with save(..., '-v7')");
    }
    if !text.starts_with("MATLAB 5.0 MAT-file") {
        bail!(
            "{p}: not a MAT-file (a level-5 header starts with `MATLAB 5.0 MAT-file`; byte 0 is {:?})",
            String::from_utf8_lossy(&bytes[..20.min(bytes.len())])
        );
    }
    match &bytes[126..128] {
        b"IM" => {}
        b"MI" => bail!("{p}: a big-endian MAT-file (endian indicator at byte 126 is `MI`); resave it on a little-endian machine"),
        other => bail!("{p}: endian indicator at byte 126 is {other:?}, expected `IM`"),
    }
    let mut vars = vec![];
    let mut r = Reader {
        bytes,
        pos: 128,
        path,
        context: String::new(),
    };
    while r.pos < bytes.len() {
        let at = r.pos;
        let (ty, data) = r.element()?;
        let (name, value) = match ty {
            MI_COMPRESSED => {
                // A bound on what one element may inflate to: real variables compress a few
                // times; far beyond that is a corrupt (or hostile) stream.
                let limit = (data.len() as u64).saturating_mul(1000).max(1 << 20);
                let mut inflated = vec![];
                flate2::read::ZlibDecoder::new(data)
                    .take(limit + 1)
                    .read_to_end(&mut inflated)
                    .with_context(|| {
                        format!("{p}: the compressed element at byte {at} does not inflate")
                    })?;
                if inflated.len() as u64 > limit {
                    bail!("{p}: the compressed element at byte {at} inflates to more than {limit} bytes (1000 times its size); the file is corrupt");
                }
                let mut inner = Reader {
                    bytes: &inflated,
                    pos: 0,
                    path,
                    context: format!(" (inside the compressed element at byte {at})"),
                };
                let (ty, data) = inner.element()?;
                if ty != MI_MATRIX {
                    bail!("{p}: the compressed element at byte {at} holds data type {ty}, expected a matrix (14)");
                }
                inner.matrix(data, at)?
            }
            MI_MATRIX => r.matrix(data, at)?,
            other => bail!(
                "{p}: element at byte {at} has data type {other}; a top-level variable is a matrix (14) or compressed (15)"
            ),
        };
        vars.push((name, value));
    }
    Ok(vars)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Appended to byte offsets of decompressed data.
    context: String,
}

impl<'a> Reader<'a> {
    fn u32_at(&self, at: usize, field: &str) -> Result<u32> {
        let b = self.bytes.get(at..at + 4).with_context(|| {
            format!(
                "{}: truncated: {field} needs bytes {at}..{}{}, the data ends at {}",
                self.path.display(),
                at + 4,
                self.context,
                self.bytes.len()
            )
        })?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    /// The next element's data type and bytes; advances past it (and its padding).
    fn element(&mut self) -> Result<(u32, &'a [u8])> {
        let at = self.pos;
        let tag = self.u32_at(at, "an element tag")?;
        if tag >> 16 != 0 {
            let (ty, n) = (tag & 0xffff, (tag >> 16) as usize);
            if n > 4 {
                bail!(
                    "{}: small element at byte {at}{} claims {n} bytes; at most 4 fit",
                    self.path.display(),
                    self.context
                );
            }
            self.pos = at + 8;
            let data = self.bytes.get(at + 4..at + 4 + n).with_context(|| {
                format!(
                    "{}: truncated small element at byte {at}{}",
                    self.path.display(),
                    self.context
                )
            })?;
            return Ok((ty, data));
        }
        let n = self.u32_at(at + 4, "an element size")? as usize;
        let start = at + 8;
        let data = self.bytes.get(start..start + n).with_context(|| {
            format!(
                "{}: truncated: the element at byte {at}{} (type {tag}) declares {n} bytes, only {} remain",
                self.path.display(),
                self.context,
                self.bytes.len().saturating_sub(start)
            )
        })?;
        // Compressed elements are not padded; every other element is padded to 8 bytes.
        let padded = if tag == MI_COMPRESSED {
            n
        } else {
            n.div_ceil(8) * 8
        };
        self.pos = (start + padded).min(self.bytes.len());
        Ok((tag, data))
    }

    /// Parses the body of a `miMATRIX` element into its name and value.
    fn matrix(&mut self, body: &'a [u8], at: usize) -> Result<(String, Value)> {
        if body.is_empty() {
            // An empty array inside a struct or cell: `[]`.
            return Ok((
                String::new(),
                Value::Numeric {
                    dims: vec![0, 0],
                    data: vec![],
                },
            ));
        }
        let mut sub = Reader {
            bytes: body,
            pos: 0,
            path: self.path,
            context: format!("{} (in the array at byte {at})", self.context),
        };
        let (ty, flags) = sub.element()?;
        if ty != MI_UINT32 || flags.len() < 8 {
            bail!(
                "{}: array at byte {at}{}: its first sub-element must be 8 bytes of array flags",
                self.path.display(),
                self.context
            );
        }
        let class = flags[0];
        let complex = flags[1] & 0x08 != 0;
        let (_, dims_raw) = sub.element()?;
        let dims: Vec<usize> = numbers(MI_INT32, dims_raw)
            .context("dimensions")?
            .into_iter()
            .map(|d| d.max(0.0) as usize)
            .collect();
        let (_, name_raw) = sub.element()?;
        let name = String::from_utf8_lossy(name_raw).into_owned();
        let err = |what: String| {
            anyhow::anyhow!(
                "{}: array `{name}` at byte {at}{}: {what}",
                self.path.display(),
                self.context
            )
        };
        // Every element of a cell or struct takes at least one 8-byte tag: a count beyond what
        // the body can hold is corrupt (and must not size an allocation).
        let count = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&c| c <= body.len())
            .ok_or_else(|| {
                err(format!(
                    "dimensions {dims:?} do not fit its {} bytes",
                    body.len()
                ))
            })?;
        let value = match class {
            CLASS_CELL => {
                let mut values = Vec::with_capacity(count);
                for _ in 0..count {
                    let at = sub.pos;
                    let (ty, data) = sub.element()?;
                    if ty != MI_MATRIX {
                        return Err(err(format!(
                            "cell element has data type {ty}, not a matrix"
                        )));
                    }
                    values.push(sub.matrix(data, at)?.1);
                }
                Value::Cell { dims, values }
            }
            CLASS_STRUCT | CLASS_OBJECT => {
                if class == CLASS_OBJECT {
                    sub.element()?; // the class name
                }
                let (ty, len_raw) = sub.element()?;
                let name_len = numbers(ty, len_raw)
                    .ok()
                    .and_then(|v| v.first().copied())
                    .ok_or_else(|| err("no field-name length".into()))?
                    as usize;
                let (_, names_raw) = sub.element()?;
                if name_len == 0 && !names_raw.is_empty() {
                    return Err(err("field names without a field-name length".into()));
                }
                let fields: Vec<String> = names_raw
                    .chunks(name_len.max(1))
                    .map(|c| {
                        let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
                        String::from_utf8_lossy(&c[..end]).into_owned()
                    })
                    .filter(|_| name_len > 0)
                    .collect();
                let total = count
                    .checked_mul(fields.len())
                    .filter(|&t| t <= body.len() / 8)
                    .ok_or_else(|| {
                        err(format!(
                            "{count} elements of {} fields do not fit",
                            fields.len()
                        ))
                    })?;
                let mut values = Vec::with_capacity(total);
                for _ in 0..total {
                    let at = sub.pos;
                    let (ty, data) = sub.element()?;
                    if ty != MI_MATRIX {
                        return Err(err(format!(
                            "struct field has data type {ty}, not a matrix"
                        )));
                    }
                    values.push(sub.matrix(data, at)?.1);
                }
                Value::Struct {
                    dims,
                    fields,
                    values,
                }
            }
            CLASS_CHAR => {
                let (ty, data) = sub.element()?;
                let units: Vec<char> = match ty {
                    MI_UTF8 | MI_UINT8 | MI_INT8 => String::from_utf8_lossy(data).chars().collect(),
                    MI_UINT16 | MI_UTF16 => char::decode_utf16(
                        data.chunks_exact(2)
                            .map(|c| u16::from_le_bytes([c[0], c[1]])),
                    )
                    .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
                    .collect(),
                    MI_UTF32 | MI_UINT32 => data
                        .chunks_exact(4)
                        .map(|c| {
                            char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                                .unwrap_or(char::REPLACEMENT_CHARACTER)
                        })
                        .collect(),
                    other => return Err(err(format!("character data of data type {other}"))),
                };
                // Column-major m×n: row r holds units r, r+m, r+2m...
                let rows = dims.first().copied().unwrap_or(0);
                let text = if rows <= 1 {
                    units.into_iter().collect()
                } else {
                    (0..rows)
                        .map(|r| units.iter().skip(r).step_by(rows).collect::<String>())
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                Value::Char(text)
            }
            6..=15 => {
                let (ty, data) = sub.element()?;
                let values = numbers(ty, data).map_err(|e| err(format!("{e}")))?;
                if values.len() != count {
                    return Err(err(format!(
                        "dimensions {dims:?} need {count} values, the data holds {}",
                        values.len()
                    )));
                }
                if complex {
                    sub.element()?; // the imaginary part: no EEG field is complex
                }
                Value::Numeric { dims, data: values }
            }
            other => Value::Unsupported { class: other },
        };
        Ok((name, value))
    }
}

/// Decodes a numeric data element of type `ty` to f64.
fn numbers(ty: u32, b: &[u8]) -> Result<Vec<f64>> {
    macro_rules! decode {
        ($t:ty) => {
            b.chunks_exact(std::mem::size_of::<$t>())
                .map(|c| <$t>::from_le_bytes(c.try_into().expect("exact chunk")) as f64)
                .collect()
        };
    }
    Ok(match ty {
        MI_INT8 => decode!(i8),
        MI_UINT8 => decode!(u8),
        MI_INT16 => decode!(i16),
        MI_UINT16 => decode!(u16),
        MI_INT32 => decode!(i32),
        MI_UINT32 => decode!(u32),
        MI_SINGLE => decode!(f32),
        MI_DOUBLE => decode!(f64),
        MI_INT64 => decode!(i64),
        MI_UINT64 => decode!(u64),
        other => bail!("numeric data of unknown data type {other}"),
    })
}

/// Writes a level-5 MAT-file (uncompressed) holding `vars`: numeric arrays as double,
/// text as UTF-16 characters, structs and cells nested. What MATLAB's `load` and scipy's
/// `loadmat` read.
pub fn write(path: &Path, vars: &[(&str, &Value)]) -> Result<()> {
    let mut file = b"MATLAB 5.0 MAT-file, written by signal-diffusion".to_vec();
    file.resize(116, b' ');
    file.extend_from_slice(&[0; 8]); // no subsystem data
    file.extend_from_slice(&0x0100u16.to_le_bytes());
    file.extend_from_slice(b"IM");
    for (name, value) in vars {
        matrix(&mut file, name, value);
    }
    crate::data::io::write_atomic(path, |w| Ok(w.write_all(&file)?))
}

/// A data element: tag, data, padding to 8 bytes.
fn element(out: &mut Vec<u8>, ty: u32, data: &[u8]) {
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(8), 0);
}

fn matrix(out: &mut Vec<u8>, name: &str, value: &Value) {
    let (class, dims): (u8, Vec<usize>) = match value {
        Value::Numeric { dims, .. } => (6, dims.clone()),
        Value::Char(s) => (CLASS_CHAR, vec![1, s.encode_utf16().count()]),
        Value::Struct { dims, .. } => (CLASS_STRUCT, dims.clone()),
        Value::Cell { dims, .. } => (CLASS_CELL, dims.clone()),
        Value::Unsupported { .. } => (6, vec![0, 0]),
    };
    let mut body = vec![];
    element(&mut body, MI_UINT32, &[class, 0, 0, 0, 0, 0, 0, 0]);
    let d: Vec<u8> = dims
        .iter()
        .flat_map(|&d| (d as i32).to_le_bytes())
        .collect();
    element(&mut body, MI_INT32, &d);
    element(&mut body, MI_INT8, name.as_bytes());
    match value {
        Value::Numeric { data, .. } => {
            let b: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            element(&mut body, MI_DOUBLE, &b);
        }
        Value::Char(s) => {
            let b: Vec<u8> = s.encode_utf16().flat_map(u16::to_le_bytes).collect();
            element(&mut body, MI_UINT16, &b);
        }
        Value::Struct { fields, values, .. } => {
            let width = fields.iter().map(|f| f.len() + 1).max().unwrap_or(1).max(8);
            element(&mut body, MI_INT32, &(width as i32).to_le_bytes());
            let names: Vec<u8> = fields
                .iter()
                .flat_map(|f| {
                    let mut b = f.as_bytes().to_vec();
                    b.resize(width, 0);
                    b
                })
                .collect();
            element(&mut body, MI_INT8, &names);
            for v in values {
                matrix(&mut body, "", v);
            }
        }
        Value::Cell { values, .. } => {
            for v in values {
                matrix(&mut body, "", v);
            }
        }
        Value::Unsupported { .. } => {
            element(&mut body, MI_DOUBLE, &[]);
        }
    }
    element(out, MI_MATRIX, &body);
}
