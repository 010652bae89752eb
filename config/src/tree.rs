//! An owned TOML tree that remembers where every key and value came from, and a reader that
//! turns it into typed values while recording every key it was asked for.
//!
//! Reading a section goes through [`Section`]: each getter checks the type, records the key's
//! location (for cross-field rules later) and marks the key as known. When the section is done,
//! [`Section::finish`] reports every key nobody asked for, with a "did you mean" hint. That is
//! how unknown keys become errors without a second list of valid keys to keep in sync.

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::choice::{self, Choice};
use crate::diag::{suggest, Diagnostic, Diagnostics, FileId, Loc, Sources};

#[derive(Debug, Clone)]
pub enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime(String),
    Array(Vec<Node>),
    Table(Table),
}

#[derive(Debug, Clone)]
pub struct Node {
    pub value: Value,
    pub loc: Loc,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub key_loc: Loc,
    pub node: Node,
}

#[derive(Debug, Clone)]
pub struct Table {
    pub entries: Vec<Entry>,
    pub loc: Loc,
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::Datetime(_) => "a datetime",
            Value::Array(_) => "an array",
            Value::Table(_) => "a table",
        }
    }
}

impl Table {
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// Overlay `child` on `self`: child keys win, tables merge key by key.
    pub fn merge_from(&mut self, child: &Table) {
        for ce in &child.entries {
            match self.entries.iter_mut().find(|e| e.key == ce.key) {
                Some(pe) => match (&mut pe.node.value, &ce.node.value) {
                    (Value::Table(pt), Value::Table(ct)) => pt.merge_from(ct),
                    _ => *pe = ce.clone(),
                },
                None => self.entries.push(ce.clone()),
            }
        }
    }

    /// Set `a.b.c = value`, creating tables on the way (used by `--set`).
    pub fn set_path(&mut self, path: &[&str], node: Node, key_loc: Loc) -> Result<(), String> {
        let (first, rest) = path.split_first().ok_or("empty key")?;
        if rest.is_empty() {
            let entry = Entry {
                key: first.to_string(),
                key_loc,
                node,
            };
            match self.entries.iter_mut().find(|e| e.key == *first) {
                Some(e) => *e = entry,
                None => self.entries.push(entry),
            }
            return Ok(());
        }
        if self.get(first).is_none() {
            let empty = Table {
                entries: vec![],
                loc: key_loc.clone(),
            };
            self.entries.push(Entry {
                key: first.to_string(),
                key_loc: key_loc.clone(),
                node: Node {
                    value: Value::Table(empty),
                    loc: key_loc.clone(),
                },
            });
        }
        let entry = self
            .entries
            .iter_mut()
            .find(|e| e.key == *first)
            .expect("inserted above");
        match &mut entry.node.value {
            Value::Table(t) => t.set_path(rest, node, key_loc),
            other => Err(format!("`{first}` is {}, not a table", other.type_name())),
        }
    }
}

/// Parse one source into a tree. A syntax error becomes a diagnostic at the parser's span.
pub fn parse(sources: &Sources, file: FileId) -> Result<Table, Diagnostic> {
    let text = &sources.get(file).text;
    match toml::de::DeTable::parse(text) {
        Ok(doc) => {
            let span = doc.span();
            Ok(convert_table(doc.into_inner(), span, file))
        }
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let msg = e.message().trim().to_string();
            Err(Diagnostic::error(
                Some(Loc { file, span }),
                format!("invalid TOML: {msg}"),
            ))
        }
    }
}

/// Parse a single TOML value (the right-hand side of `--set key=value`).
pub fn parse_value(sources: &Sources, file: FileId) -> Result<Node, Diagnostic> {
    let text = &sources.get(file).text;
    match toml::de::DeValue::parse(text) {
        Ok(v) => {
            let span = v.span();
            Ok(convert(v.into_inner(), span, file))
        }
        Err(e) => Err(Diagnostic::error(
            Some(Loc {
                file,
                span: e.span().unwrap_or(0..text.len()),
            }),
            format!("invalid TOML value: {}", e.message().trim()),
        )),
    }
}

fn convert_table(t: toml::de::DeTable<'_>, span: std::ops::Range<usize>, file: FileId) -> Table {
    let entries = t
        .into_iter()
        .map(|(k, v)| {
            let key_loc = Loc {
                file,
                span: k.span(),
            };
            let vspan = v.span();
            Entry {
                key: k.into_inner().into_owned(),
                key_loc,
                node: convert(v.into_inner(), vspan, file),
            }
        })
        .collect();
    Table {
        entries,
        loc: Loc { file, span },
    }
}

fn convert(v: toml::de::DeValue<'_>, span: std::ops::Range<usize>, file: FileId) -> Node {
    use toml::de::DeValue as D;
    let loc = Loc {
        file,
        span: span.clone(),
    };
    let value = match v {
        D::String(s) => Value::Str(s.into_owned()),
        D::Integer(i) => match i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()) {
            Ok(n) => Value::Int(n),
            Err(_) => Value::Float(f64::NAN),
        },
        D::Float(f) => Value::Float(f.as_str().replace('_', "").parse().unwrap_or(f64::NAN)),
        D::Boolean(b) => Value::Bool(b),
        D::Datetime(d) => Value::Datetime(d.to_string()),
        D::Array(a) => Value::Array(
            a.into_iter()
                .map(|e| {
                    let s = e.span();
                    convert(e.into_inner(), s, file)
                })
                .collect(),
        ),
        D::Table(t) => Value::Table(convert_table(t, span, file)),
    };
    Node { value, loc }
}

/// What reading produces besides values: diagnostics, and where each dotted key was written.
#[derive(Debug, Default)]
pub struct Ctx {
    pub diags: Diagnostics,
    pub locs: BTreeMap<String, Loc>,
}

impl Ctx {
    pub fn loc(&self, key: &str) -> Option<Loc> {
        self.locs.get(key).cloned()
    }
    /// The location of the first of `keys` that was written; rules about several keys point at
    /// whichever the user actually wrote.
    pub fn loc_any(&self, keys: &[&str]) -> Option<Loc> {
        keys.iter().find_map(|k| self.loc(k))
    }
    pub fn error(&mut self, key: &str, message: impl Into<String>) -> &mut Diagnostic {
        let loc = self.loc(key);
        self.diags.push(Diagnostic::error(loc, message));
        self.diags.list.last_mut().expect("just pushed")
    }
    pub fn warn(&mut self, key: &str, message: impl Into<String>) -> &mut Diagnostic {
        let loc = self.loc(key);
        self.diags.push(Diagnostic::warning(loc, message));
        self.diags.list.last_mut().expect("just pushed")
    }
}

/// A table being read. Absent sections read as empty (every key takes its default).
pub struct Section<'a> {
    table: Option<&'a Table>,
    /// Dotted path, e.g. `training` or `model.extras`.
    pub path: String,
    asked: RefCell<Vec<String>>,
}

impl<'a> Section<'a> {
    pub fn root(table: &'a Table) -> Self {
        Section {
            table: Some(table),
            path: String::new(),
            asked: RefCell::new(vec![]),
        }
    }

    pub fn is_present(&self) -> bool {
        self.table.is_some()
    }

    pub fn loc(&self) -> Option<Loc> {
        self.table.map(|t| t.loc.clone())
    }

    fn dotted(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Mark `key` as known and return its node, recording its location.
    pub fn node(&self, ctx: &mut Ctx, key: &str) -> Option<&'a Node> {
        self.asked.borrow_mut().push(key.to_string());
        let e = self.table?.get(key)?;
        ctx.locs.insert(self.dotted(key), e.node.loc.clone());
        Some(&e.node)
    }

    pub fn has(&self, key: &str) -> bool {
        self.table.and_then(|t| t.get(key)).is_some()
    }

    fn type_error(&self, ctx: &mut Ctx, key: &str, node: &Node, expected: &str) {
        ctx.diags.push(
            Diagnostic::error(
                Some(node.loc.clone()),
                format!(
                    "`{}` must be {expected}, found {}",
                    self.dotted(key),
                    node.value.type_name()
                ),
            )
            .help(format!(
                "write `{key} = <{expected}>` or remove the key to take its default"
            )),
        );
    }

    /// A sub-table; a non-table value is reported and read as absent.
    pub fn section(&self, ctx: &mut Ctx, key: &str) -> Section<'a> {
        let path = self.dotted(key);
        let table = match self.node(ctx, key) {
            Some(Node {
                value: Value::Table(t),
                ..
            }) => Some(t),
            Some(n) => {
                self.type_error(ctx, key, n, "a table");
                None
            }
            None => None,
        };
        Section {
            table,
            path,
            asked: RefCell::new(vec![]),
        }
    }

    pub fn string(&self, ctx: &mut Ctx, key: &str) -> Option<String> {
        match self.node(ctx, key)? {
            Node {
                value: Value::Str(s),
                ..
            } => Some(s.clone()),
            n => {
                self.type_error(ctx, key, n, "a string");
                None
            }
        }
    }

    pub fn string_or(&self, ctx: &mut Ctx, key: &str, default: &str) -> String {
        self.string(ctx, key).unwrap_or_else(|| default.to_string())
    }

    /// A value from `allowed` (listed in messages in that order); an unknown value gets the list
    /// and the closest match, and reads as `default`.
    pub fn pick<C: Choice>(&self, ctx: &mut Ctx, key: &str, default: C, allowed: &[C]) -> C {
        if let Some(v) = self.string(ctx, key) {
            if let Some(c) = allowed.iter().find(|c| c.aliases().contains(&v.as_str())) {
                return *c;
            }
        }
        let text = self.choice(ctx, key, default.toml(), &choice::names(allowed));
        choice::from_toml(&text).unwrap_or(default)
    }

    /// A string from a closed set; an unknown value gets the list and the closest match.
    pub(crate) fn choice(
        &self,
        ctx: &mut Ctx,
        key: &str,
        default: &str,
        allowed: &[&str],
    ) -> String {
        let Some(v) = self.string(ctx, key) else {
            return default.to_string();
        };
        if allowed.contains(&v.as_str()) {
            return v;
        }
        let node = self.node(ctx, key).expect("read above");
        let mut d = Diagnostic::error(
            Some(node.loc.clone()),
            format!(
                "`{}` = \"{v}\" is not one of: {}",
                self.dotted(key),
                allowed
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        if let Some(s) = suggest(&v.to_lowercase(), allowed.iter().copied()) {
            d = d.help(format!("did you mean \"{s}\"?"));
        }
        ctx.diags.push(d);
        default.to_string()
    }

    pub fn int(&self, ctx: &mut Ctx, key: &str) -> Option<i64> {
        match self.node(ctx, key)? {
            Node {
                value: Value::Int(i),
                ..
            } => Some(*i),
            n => {
                self.type_error(ctx, key, n, "an integer");
                None
            }
        }
    }

    /// An integer that must be at least `min` (counts, sizes, steps).
    pub fn count(&self, ctx: &mut Ctx, key: &str, default: usize, min: usize) -> usize {
        self.count_opt(ctx, key, min).unwrap_or(default)
    }

    pub fn count_opt(&self, ctx: &mut Ctx, key: &str, min: usize) -> Option<usize> {
        let v = self.int(ctx, key)?;
        if v < min as i64 {
            let loc = self.node(ctx, key).map(|n| n.loc.clone());
            ctx.diags.push(Diagnostic::error(
                loc,
                format!("`{}` = {v} must be at least {min}", self.dotted(key)),
            ));
            return None;
        }
        Some(v as usize)
    }

    pub fn float(&self, ctx: &mut Ctx, key: &str) -> Option<f64> {
        match self.node(ctx, key)? {
            Node {
                value: Value::Float(f),
                ..
            } if f.is_finite() => Some(*f),
            Node {
                value: Value::Int(i),
                ..
            } => Some(*i as f64),
            n => {
                self.type_error(ctx, key, n, "a finite number");
                None
            }
        }
    }

    /// A float within `[lo, hi]`.
    pub fn float_in(&self, ctx: &mut Ctx, key: &str, default: f64, lo: f64, hi: f64) -> f64 {
        let Some(v) = self.float(ctx, key) else {
            return default;
        };
        if v < lo || v > hi {
            let loc = self.node(ctx, key).map(|n| n.loc.clone());
            ctx.diags.push(Diagnostic::error(
                loc,
                format!("`{}` = {v} is outside [{lo}, {hi}]", self.dotted(key)),
            ));
            return default;
        }
        v
    }

    pub fn bool_or(&self, ctx: &mut Ctx, key: &str, default: bool) -> bool {
        match self.node(ctx, key) {
            None => default,
            Some(Node {
                value: Value::Bool(b),
                ..
            }) => *b,
            Some(n) => {
                self.type_error(ctx, key, n, "a boolean (true or false)");
                default
            }
        }
    }

    /// A list of strings; like the reference, a comma-separated string is accepted too.
    pub fn string_list(&self, ctx: &mut Ctx, key: &str) -> Option<Vec<String>> {
        match self.node(ctx, key)? {
            Node {
                value: Value::Str(s),
                ..
            } => Some(
                s.split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect(),
            ),
            Node {
                value: Value::Array(items),
                ..
            } => {
                let mut out = vec![];
                for it in items {
                    match &it.value {
                        Value::Str(s) => out.push(s.clone()),
                        v => {
                            ctx.diags.push(Diagnostic::error(
                                Some(it.loc.clone()),
                                format!(
                                    "`{}` must hold strings, found {}",
                                    self.dotted(key),
                                    v.type_name()
                                ),
                            ));
                        }
                    }
                }
                Some(out)
            }
            n => {
                self.type_error(ctx, key, n, "a list of strings");
                None
            }
        }
    }

    pub fn float_list(&self, ctx: &mut Ctx, key: &str) -> Option<Vec<f64>> {
        self.list(ctx, key, "a list of numbers", |v| match v {
            Value::Float(f) if f.is_finite() => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        })
    }

    pub fn int_list(&self, ctx: &mut Ctx, key: &str) -> Option<Vec<i64>> {
        self.list(ctx, key, "a list of integers", |v| match v {
            Value::Int(i) => Some(*i),
            _ => None,
        })
    }

    fn list<T>(
        &self,
        ctx: &mut Ctx,
        key: &str,
        expected: &str,
        item: impl Fn(&Value) -> Option<T>,
    ) -> Option<Vec<T>> {
        let node = self.node(ctx, key)?;
        let Value::Array(items) = &node.value else {
            self.type_error(ctx, key, node, expected);
            return None;
        };
        let mut out = vec![];
        for it in items {
            match item(&it.value) {
                Some(v) => out.push(v),
                None => {
                    ctx.diags.push(Diagnostic::error(
                        Some(it.loc.clone()),
                        format!(
                            "`{}` must be {expected}, found {} in it",
                            self.dotted(key),
                            it.value.type_name()
                        ),
                    ));
                    return None;
                }
            }
        }
        Some(out)
    }

    /// The keys of this table, for tables keyed by the user (task weights, datasets).
    pub fn keys(&self) -> Vec<String> {
        self.table
            .map(|t| t.entries.iter().map(|e| e.key.clone()).collect())
            .unwrap_or_default()
    }

    /// Report keys no getter asked for. `tolerated` keys are ones the reference silently ignores:
    /// they get a warning with the reason instead of an error.
    pub fn finish(&self, ctx: &mut Ctx, tolerated: &[(&str, &str)]) {
        let Some(table) = self.table else { return };
        let asked = self.asked.borrow().clone();
        for e in &table.entries {
            if asked.iter().any(|a| a == &e.key) {
                continue;
            }
            let dotted = if self.path.is_empty() {
                e.key.clone()
            } else {
                format!("{}.{}", self.path, e.key)
            };
            if let Some((_, why)) = tolerated.iter().find(|(k, _)| *k == e.key) {
                ctx.diags.push(Diagnostic::warning(
                    Some(e.key_loc.clone()),
                    format!("`{dotted}` has no effect: {why}"),
                ));
                continue;
            }
            let what = if self.path.is_empty() {
                "section"
            } else {
                "key"
            };
            let mut d = Diagnostic::error(
                Some(e.key_loc.clone()),
                format!("unknown {what} `{dotted}`"),
            );
            let known: Vec<&str> = asked.iter().map(String::as_str).collect();
            if let Some(s) = suggest(&e.key, known.iter().copied()) {
                d = d.help(format!("did you mean `{s}`?"));
            } else if !known.is_empty() {
                let mut list = known.clone();
                list.sort();
                list.dedup();
                d = d.help(if self.path.is_empty() {
                    format!("the sections are: {}", list.join(", "))
                } else {
                    format!("`[{}]` accepts: {}", self.path, list.join(", "))
                });
            }
            ctx.diags.push(d);
        }
    }
}
