//! Sample tables in Parquet, as Hugging Face `datasets` writes and reads them.
//!
//! A table is named columns of text, integers, floats or images. An image is the `datasets`
//! `Image` feature: a struct `{bytes: binary, path: string}` holding the encoded PNG (path
//! null). The feature types are also stored as JSON under the `huggingface` key of the file's
//! metadata, which is what makes `datasets` decode the struct as an image. Files are written
//! through a temporary file and a rename, one row group per `write` call.

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
}

impl Column {
    pub fn len(&self) -> usize {
        match self {
            Column::Text(v) => v.len(),
            Column::Int(v) => v.len(),
            Column::Float(v) => v.len(),
            Column::Image(v) => v.len(),
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
            Column::Image(_) => None,
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

fn kind(c: &Column) -> Kind {
    match c {
        Column::Text(_) => Kind::Text,
        Column::Int(_) => Kind::Int,
        Column::Float(_) => Kind::Float,
        Column::Image(_) => Kind::Image,
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
            .collect();
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
        let tmp = crate::io::temp_path_for(path)?;
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
                .all(|((n, c), (kn, k))| n == kn && kind(c) == *k);
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
/// are read, and `datasets` image structs; other nested or repeated columns are an error naming
/// the column (time-series `signal` lists are not read yet).
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
        Skip,
    }
    let mut roles = vec![];
    for (i, leaf) in schema.columns().iter().enumerate() {
        let parts = leaf.path().parts();
        let top = parts[0].clone();
        if leaf.max_rep_level() > 0 {
            bail!("{p}: column `{}` is a list; only flat columns and images are read (time-series tables are not supported yet)", parts.join("."));
        }
        let role = match (parts.len(), parts.get(1).map(String::as_str)) {
            (1, _) => Role::Flat,
            (2, Some("bytes")) => Role::ImageBytes,
            (2, Some("path")) => Role::Skip,
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
