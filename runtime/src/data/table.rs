//! Sample tables in Parquet, as Hugging Face `datasets` writes and reads them.
//!
//! A table is named columns of text, integers, floats or images. An image is the `datasets`
//! `Image` feature: a struct `{bytes: binary, path: string}` holding the encoded PNG (path
//! null). The feature types are also stored as JSON under the `huggingface` key of the file's
//! metadata, which is what makes `datasets` decode the struct as an image. A time-series table
//! has a `signal` column instead, the `Array2D((channels, samples), float32)` feature: a list of
//! lists of floats per row (read only). Files are written through a temporary file and a rename,
//! one row group per `write` call.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use parquet::basic::{Compression, Type as PhysicalType};
use parquet::column::reader::{ColumnReader, ColumnReaderImpl};
use parquet::data_type::{ByteArray, ByteArrayType, DataType, Int64Type};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;

#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    /// Encoded image files (PNG), the `datasets` `Image` feature.
    Image(Vec<Option<Vec<u8>>>),
    /// Lists of equal-length lists of floats (time series), the `Array2D` feature.
    Array2(Vec<Option<Array2>>),
}

/// A row-major 2-D float array: `shape[0]` lists of `shape[1]` values.
#[derive(Debug, Clone, PartialEq)]
pub struct Array2 {
    pub shape: [usize; 2],
    pub values: Vec<f32>,
}

impl Column {
    pub fn len(&self) -> usize {
        match self {
            Column::Text(v) => v.len(),
            Column::Int(v) => v.len(),
            Column::Float(v) => v.len(),
            Column::Image(v) => v.len(),
            Column::Array2(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value of row `i` as text (`None` for null and for images).
    pub fn text(&self, i: usize) -> Option<String> {
        match self {
            Column::Text(v) => v[i].clone(),
            Column::Int(v) => v[i].map(|x| x.to_string()),
            Column::Float(v) => v[i].map(|x| x.to_string()),
            Column::Image(_) | Column::Array2(_) => None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub names: Vec<String>,
    pub columns: Vec<Column>,
}

/// One value of a row, of its column's kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Text(Option<String>),
    Int(Option<i64>),
    Float(Option<f64>),
    Image(Option<Vec<u8>>),
}

impl Table {
    /// An empty table with these columns.
    pub fn empty(columns: &[(&str, Kind)]) -> Table {
        Table {
            names: columns.iter().map(|(n, _)| n.to_string()).collect(),
            columns: columns
                .iter()
                .map(|(_, k)| match k {
                    Kind::Text => Column::Text(vec![]),
                    Kind::Int => Column::Int(vec![]),
                    Kind::Float => Column::Float(vec![]),
                    Kind::Image => Column::Image(vec![]),
                })
                .collect(),
        }
    }

    /// Appends one row: a cell per column, in column order, each of its column's kind.
    pub fn push_row(&mut self, cells: Vec<Cell>) -> Result<()> {
        if cells.len() != self.columns.len() {
            bail!(
                "a row of {} cells for {} columns",
                cells.len(),
                self.columns.len()
            );
        }
        for ((column, cell), name) in self.columns.iter_mut().zip(cells).zip(&self.names) {
            match (column, cell) {
                (Column::Text(v), Cell::Text(x)) => v.push(x),
                (Column::Int(v), Cell::Int(x)) => v.push(x),
                (Column::Float(v), Cell::Float(x)) => v.push(x),
                (Column::Image(v), Cell::Image(x)) => v.push(x),
                (_, cell) => bail!("column `{name}` cannot hold {cell:?}"),
            }
        }
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.columns.first().map_or(0, Column::len)
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        let i = self.names.iter().position(|n| n == name)?;
        Some(&self.columns[i])
    }
}

/// Writes tables with a fixed set of columns, one row group per [`TableWriter::write`].
pub struct TableWriter {
    path: PathBuf,
    tmp: PathBuf,
    kinds: Vec<(String, Kind)>,
    writer: Option<SerializedFileWriter<std::io::BufWriter<File>>>,
}

/// What a column holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Text,
    Int,
    Float,
    Image,
}

/// The written kind of a column (time-series arrays are read, not written).
fn kind(c: &Column) -> Option<Kind> {
    match c {
        Column::Text(_) => Some(Kind::Text),
        Column::Int(_) => Some(Kind::Int),
        Column::Float(_) => Some(Kind::Float),
        Column::Image(_) => Some(Kind::Image),
        Column::Array2(_) => None,
    }
}

impl TableWriter {
    /// `template` gives the column names and types (its rows are not written).
    pub fn create(path: &Path, template: &Table) -> Result<TableWriter> {
        let kinds: Vec<(String, Kind)> = template
            .names
            .iter()
            .cloned()
            .zip(template.columns.iter().map(kind))
            .map(|(n, k)| Ok((n, k.context("time-series array columns are not written")?)))
            .collect::<Result<_>>()?;
        let mut schema = String::from("message schema {\n");
        let mut features = serde_json::Map::new();
        for (name, k) in &kinds {
            let (field, feature) = match k {
                Kind::Text => (
                    format!("optional binary {name} (STRING);"),
                    serde_json::json!({"dtype": "string", "_type": "Value"}),
                ),
                Kind::Int => (
                    format!("optional int64 {name};"),
                    serde_json::json!({"dtype": "int64", "_type": "Value"}),
                ),
                Kind::Float => (
                    format!("optional double {name};"),
                    serde_json::json!({"dtype": "float64", "_type": "Value"}),
                ),
                Kind::Image => (
                    format!(
                        "optional group {name} {{ optional binary bytes; optional binary path (STRING); }}"
                    ),
                    serde_json::json!({"_type": "Image"}),
                ),
            };
            schema.push_str(&field);
            schema.push('\n');
            features.insert(name.clone(), feature);
        }
        schema.push('}');
        let schema = Arc::new(parquet::schema::parser::parse_message_type(&schema)?);
        let hf = serde_json::json!({"info": {"features": features}}).to_string();
        let props = WriterProperties::builder()
            // PNG bytes are already deflated; the text columns are small.
            .set_compression(Compression::UNCOMPRESSED)
            .set_key_value_metadata(Some(vec![KeyValue::new("huggingface".into(), hf)]))
            .build();
        let tmp = crate::data::io::temp_path_for(path)?;
        let file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let writer =
            SerializedFileWriter::new(std::io::BufWriter::new(file), schema, Arc::new(props))?;
        Ok(TableWriter {
            path: path.to_path_buf(),
            tmp,
            kinds,
            writer: Some(writer),
        })
    }

    /// Appends `rows` as one row group; its columns must match the template's.
    pub fn write(&mut self, rows: &Table) -> Result<()> {
        let same = rows.names.len() == self.kinds.len()
            && rows
                .names
                .iter()
                .zip(&rows.columns)
                .zip(&self.kinds)
                .all(|((n, c), (kn, k))| n == kn && kind(c) == Some(*k));
        if !same {
            bail!(
                "{}: rows with other columns than the table's",
                self.path.display()
            );
        }
        let writer = self.writer.as_mut().expect("open until finish");
        let mut group = writer.next_row_group()?;
        for column in &rows.columns {
            match column {
                Column::Text(v) => {
                    let mut col = group.next_column()?.expect("schema column");
                    write_optional::<ByteArrayType, _>(col.typed(), v, 1, |s| {
                        ByteArray::from(s.as_bytes().to_vec())
                    })?;
                    col.close()?;
                }
                Column::Int(v) => {
                    let mut col = group.next_column()?.expect("schema column");
                    write_optional::<Int64Type, _>(col.typed(), v, 1, |&x| x)?;
                    col.close()?;
                }
                Column::Float(v) => {
                    let mut col = group.next_column()?.expect("schema column");
                    write_optional::<parquet::data_type::DoubleType, _>(col.typed(), v, 1, |&x| x)?;
                    col.close()?;
                }
                Column::Array2(_) => unreachable!("the kinds were checked against the schema"),
                Column::Image(v) => {
                    // image.bytes: defined at level 2 when present; image.path: always null
                    // inside a present struct (level 1), absent with it (level 0).
                    let mut col = group.next_column()?.expect("schema column");
                    write_optional::<ByteArrayType, _>(col.typed(), v, 2, |b| {
                        ByteArray::from(b.clone())
                    })?;
                    col.close()?;
                    let mut col = group.next_column()?.expect("schema column");
                    let defs: Vec<i16> = v.iter().map(|b| i16::from(b.is_some())).collect();
                    col.typed::<ByteArrayType>()
                        .write_batch(&[], Some(&defs), None)?;
                    col.close()?;
                }
            }
        }
        group.close()?;
        Ok(())
    }

    /// Closes the file and moves it into place.
    pub fn finish(mut self) -> Result<()> {
        let writer = self.writer.take().expect("open until finish");
        let file = writer
            .into_inner()
            .with_context(|| format!("cannot finish {}", self.tmp.display()))?;
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("cannot move {} into place", self.path.display()))
    }
}

impl Drop for TableWriter {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = std::fs::remove_file(&self.tmp); // not finished: leave nothing behind
        }
    }
}

fn write_optional<T: DataType, V>(
    col: &mut parquet::column::writer::ColumnWriterImpl<'_, T>,
    values: &[Option<V>],
    max_def: i16,
    convert: impl Fn(&V) -> T::T,
) -> Result<()> {
    let present: Vec<T::T> = values.iter().flatten().map(convert).collect();
    let defs: Vec<i16> = values
        .iter()
        .map(|v| if v.is_some() { max_def } else { 0 })
        .collect();
    col.write_batch(&present, Some(&defs), None)?;
    Ok(())
}

/// Reads a whole table. Flat columns of strings, integers, floats and booleans (as integers)
/// are read, `datasets` image structs, and lists of lists of floats (time series); other nested
/// or repeated columns are an error naming the column.
pub fn read(path: &Path) -> Result<Table> {
    let p = path.display();
    let file = File::open(path).with_context(|| format!("cannot open {p}"))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{p}: not a readable Parquet file"))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let mut table = Table::default();
    // Leaf column index -> (table column, role).
    enum Role {
        Flat,
        ImageBytes,
        Lists,
        Skip,
    }
    let mut roles = vec![];
    for (i, leaf) in schema.columns().iter().enumerate() {
        let parts = leaf.path().parts();
        let top = parts[0].clone();
        let role = match (leaf.max_rep_level(), parts.len(), parts.get(1).map(String::as_str)) {
            (2, ..) => Role::Lists,
            (1 | 3.., ..) => bail!("{p}: column `{}` is a list of depth {}; only lists of lists of floats (time series) are read", parts.join("."), leaf.max_rep_level()),
            (0, 1, _) => Role::Flat,
            (0, 2, Some("bytes")) => Role::ImageBytes,
            (0, 2, Some("path")) => Role::Skip,
            _ => bail!("{p}: column `{}` is nested; only flat columns and `{{bytes, path}}` images are read", parts.join(".")),
        };
        if !matches!(role, Role::Skip) {
            let column = match (&role, leaf.physical_type()) {
                (Role::ImageBytes, PhysicalType::BYTE_ARRAY) => Column::Image(vec![]),
                (Role::Flat, PhysicalType::BYTE_ARRAY) => Column::Text(vec![]),
                (Role::Flat, PhysicalType::INT32 | PhysicalType::INT64 | PhysicalType::BOOLEAN) => {
                    Column::Int(vec![])
                }
                (Role::Flat, PhysicalType::FLOAT | PhysicalType::DOUBLE) => Column::Float(vec![]),
                (Role::Lists, PhysicalType::FLOAT) => Column::Array2(vec![]),
                (_, t) => bail!(
                    "{p}: column `{}` has physical type {t}, which is not read",
                    parts.join(".")
                ),
            };
            table.names.push(top);
            table.columns.push(column);
        }
        roles.push((i, role, table.columns.len().wrapping_sub(1)));
    }
    for g in 0..reader.num_row_groups() {
        let group = reader.get_row_group(g)?;
        for (leaf, role, target) in &roles {
            if matches!(role, Role::Skip) {
                continue;
            }
            let max_def = schema.column(*leaf).max_def_level();
            if let Role::Lists = role {
                let (ColumnReader::FloatColumnReader(r), Column::Array2(out)) =
                    (group.get_column_reader(*leaf)?, &mut table.columns[*target])
                else {
                    unreachable!("a list column is read as Array2 from FLOAT leaves")
                };
                let what = format!(
                    "{p}: row group {g}, column `{}`",
                    table_name(&schema, *leaf)
                );
                out.extend(read_arrays(r, max_def).with_context(|| what)?);
                continue;
            }
            let reader = group.get_column_reader(*leaf)?;
            let column = &mut table.columns[*target];
            let ctx = || {
                format!(
                    "{p}: row group {g}, column `{}`",
                    table_name(&schema, *leaf)
                )
            };
            match (reader, column) {
                (ColumnReader::ByteArrayColumnReader(r), Column::Text(out)) => {
                    for v in read_all::<ByteArrayType>(r, max_def).with_context(ctx)? {
                        out.push(v.map(|b| String::from_utf8_lossy(b.data()).into_owned()));
                    }
                }
                (ColumnReader::ByteArrayColumnReader(r), Column::Image(out)) => {
                    for v in read_all::<ByteArrayType>(r, max_def).with_context(ctx)? {
                        out.push(v.map(|b| b.data().to_vec()));
                    }
                }
                (ColumnReader::Int64ColumnReader(r), Column::Int(out)) => {
                    out.extend(read_all::<Int64Type>(r, max_def).with_context(ctx)?);
                }
                (ColumnReader::Int32ColumnReader(r), Column::Int(out)) => {
                    let v =
                        read_all::<parquet::data_type::Int32Type>(r, max_def).with_context(ctx)?;
                    out.extend(v.into_iter().map(|x| x.map(i64::from)));
                }
                (ColumnReader::BoolColumnReader(r), Column::Int(out)) => {
                    let v =
                        read_all::<parquet::data_type::BoolType>(r, max_def).with_context(ctx)?;
                    out.extend(v.into_iter().map(|x| x.map(i64::from)));
                }
                (ColumnReader::DoubleColumnReader(r), Column::Float(out)) => {
                    out.extend(
                        read_all::<parquet::data_type::DoubleType>(r, max_def).with_context(ctx)?,
                    );
                }
                (ColumnReader::FloatColumnReader(r), Column::Float(out)) => {
                    let v =
                        read_all::<parquet::data_type::FloatType>(r, max_def).with_context(ctx)?;
                    out.extend(v.into_iter().map(|x| x.map(f64::from)));
                }
                _ => unreachable!("column kinds follow the physical types above"),
            }
        }
    }
    if let Some(c) = table.columns.iter().position(|c| c.len() != table.rows()) {
        bail!(
            "{p}: column `{}` has {} rows, the table {}",
            table.names[c],
            table.columns[c].len(),
            table.rows()
        );
    }
    Ok(table)
}

fn table_name(schema: &parquet::schema::types::SchemaDescriptor, leaf: usize) -> String {
    schema.column(leaf).path().parts().join(".")
}

/// The rows of a list-of-lists float column chunk (maximum repetition level 2): a new row where
/// the repetition level is 0, a new inner list where it is 1; a row whose definition level is 0
/// is null. Every inner list of a row must have the same length, and nothing inside may be null.
fn read_arrays(
    mut r: ColumnReaderImpl<parquet::data_type::FloatType>,
    max_def: i16,
) -> Result<Vec<Option<Array2>>> {
    let (mut defs, mut reps, mut values) = (vec![], vec![], vec![]);
    loop {
        let (records, _, _) =
            r.read_records(1024, Some(&mut defs), Some(&mut reps), &mut values)?;
        if records == 0 {
            break;
        }
    }
    let mut rows: Vec<Option<(Vec<usize>, Vec<f32>)>> = vec![];
    let mut next = values.into_iter();
    for (&d, &rep) in defs.iter().zip(&reps) {
        if rep == 0 {
            rows.push((d > 0).then(|| (vec![0], vec![])));
        } else if rep == 1 {
            if let Some(Some((lens, _))) = rows.last_mut() {
                lens.push(0);
            }
        }
        if d == max_def {
            let (Some(Some((lens, vals))), Some(v)) = (rows.last_mut(), next.next()) else {
                bail!("malformed list levels");
            };
            *lens.last_mut().expect("a list was started") += 1;
            vals.push(v);
        } else if d > 0 {
            bail!(
                "row {}: an empty or null list or value inside the signal",
                rows.len() - 1
            );
        }
    }
    rows.into_iter()
        .enumerate()
        .map(|(i, row)| {
            let Some((lens, values)) = row else {
                return Ok(None);
            };
            if lens.iter().any(|&l| l != lens[0]) {
                bail!("row {i}: lists of different lengths ({lens:?}); a signal is channels × samples");
            }
            Ok(Some(Array2 {
                shape: [lens.len(), lens[0]],
                values,
            }))
        })
        .collect()
}

/// Every value of a column chunk, `None` where the definition level says null.
fn read_all<T: DataType>(mut r: ColumnReaderImpl<T>, max_def: i16) -> Result<Vec<Option<T::T>>> {
    let mut out = vec![];
    loop {
        let (mut defs, mut values) = (vec![], vec![]);
        let (records, _, _) = r.read_records(4096, Some(&mut defs), None, &mut values)?;
        if records == 0 {
            break;
        }
        if max_def == 0 {
            out.extend(values.into_iter().map(Some)); // a required column: no levels
            continue;
        }
        let mut next = values.into_iter();
        for d in defs {
            out.push(if d == max_def { next.next() } else { None });
        }
    }
    Ok(out)
}
