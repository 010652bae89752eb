//! Resolved values as Rust source. Codegen writes the whole [`Config`](crate::Config) into
//! pipeline.rs as one typed literal, grouped as the TOML is, each value with the TOML key it came
//! from in a comment: the trainer reads its hyperparameters as code and never parses the TOML
//! again (unless `--set` overrides something).
//!
//! Structs get their [`Literal`] from [`literal!`], which wraps their definition, so a field
//! cannot be added without being written out. A field is commented with `<section>.<field>`
//! unless its definition names the key (`pub x: T = "model.extras.x"`).
//!
//! Paths under the project root are written as `root.join(..)`, so the binary resolves them
//! against the root it runs with (see runtime `Compiled::root`), as re-resolving would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::settings::relative_to;

/// Where a value is written.
#[derive(Clone)]
pub struct At<'a> {
    /// Paths under it are written relative to it.
    pub root: &'a Path,
    /// Nesting depth: lines after the first are indented by it.
    pub depth: usize,
    /// The TOML key of the value: `None` inside lists (no comments), `""` at the top.
    pub key: Option<String>,
}

impl<'a> At<'a> {
    /// The top of a config written for `root`.
    pub fn top(root: &'a Path, depth: usize) -> Self {
        At {
            root,
            depth,
            key: Some(String::new()),
        }
    }

    /// Where field `name` of the value here is written: its key is `explicit`, else this key
    /// followed by the name.
    pub fn field(&self, name: &str, explicit: Option<&str>) -> At<'a> {
        let key = match (explicit, &self.key) {
            (Some(k), Some(_)) => Some(k.to_string()),
            (_, None) => None,
            (None, Some(k)) if k.is_empty() => Some(name.to_string()),
            (None, Some(k)) => Some(format!("{k}.{name}")),
        };
        At {
            key,
            depth: self.depth + 1,
            root: self.root,
        }
    }

    /// One level deeper, inside a list or a map (no key comments).
    fn item(&self) -> At<'a> {
        At {
            key: None,
            depth: self.depth + 1,
            root: self.root,
        }
    }

    /// A struct literal, one field per line, each with its key's comment when its value fits on
    /// the line; the comments of a struct line up.
    pub fn structure(&self, name: &str, fields: &[(&str, Option<&str>, &dyn Literal)]) -> String {
        let pad = "    ".repeat(self.depth + 1);
        let lines: Vec<(String, Option<String>)> = fields
            .iter()
            .map(|(field, explicit, value)| {
                let at = self.field(field, *explicit);
                let text = format!("{pad}{field}: {},", value.literal(&at));
                let comment = at.key.filter(|k| !k.is_empty() && !text.contains('\n'));
                (text, comment)
            })
            .collect();
        let width = lines
            .iter()
            .filter(|(_, c)| c.is_some())
            .map(|(t, _)| t.len())
            .max()
            .unwrap_or(0);
        let mut out = format!("{name} {{\n");
        for (text, comment) in lines {
            match comment {
                Some(c) => out += &format!("{text:width$} // {c}\n"),
                None => out += &format!("{text}\n"),
            }
        }
        out + &"    ".repeat(self.depth) + "}"
    }

    /// `items` inline when they are short, else one per line.
    fn list(&self, open: &str, items: Vec<String>, close: &str) -> String {
        let inline = items.join(", ");
        if !inline.contains('\n') && inline.len() <= 72 {
            return format!("{open}{inline}{close}");
        }
        let pad = "    ".repeat(self.depth + 1);
        let lines: String = items.iter().map(|i| format!("{pad}{i},\n")).collect();
        format!("{open}\n{lines}{}{close}", "    ".repeat(self.depth))
    }
}

/// A value codegen can write as a Rust expression of its own type.
pub trait Literal {
    /// `self` as Rust source; lines after the first are indented for `at.depth`.
    fn literal(&self, at: &At) -> String;
}

/// Defines structs and their [`Literal`]. A field may name its TOML key after its type.
macro_rules! literal {
    ($(
        $(#[$meta:meta])*
        pub struct $name:ident {
            $($(#[$fmeta:meta])* pub $field:ident: $ty:ty $(= $key:literal)?),* $(,)?
        }
    )+) => {$(
        $(#[$meta])*
        pub struct $name { $($(#[$fmeta])* pub $field: $ty),* }

        impl $crate::literal::Literal for $name {
            fn literal(&self, at: &$crate::literal::At) -> String {
                at.structure(stringify!($name), &[$(
                    (stringify!($field), None$(.or(Some($key)))?, &self.$field),
                )*])
            }
        }
    )+};
}
pub(crate) use literal;

impl Literal for bool {
    fn literal(&self, _: &At) -> String {
        self.to_string()
    }
}

impl Literal for usize {
    fn literal(&self, _: &At) -> String {
        self.to_string()
    }
}

impl Literal for u64 {
    fn literal(&self, _: &At) -> String {
        self.to_string()
    }
}

impl Literal for f64 {
    /// The shortest text that reads back as the same value, always with `.` or an exponent.
    fn literal(&self, _: &At) -> String {
        format!("{self:?}")
    }
}

impl Literal for String {
    fn literal(&self, _: &At) -> String {
        format!("{self:?}.into()")
    }
}

impl Literal for PathBuf {
    fn literal(&self, at: &At) -> String {
        let rel = relative_to(at.root, self);
        let text = |p: &Path| format!("{:?}", p.to_string_lossy());
        if rel == *self {
            format!("PathBuf::from({})", text(self))
        } else if rel.as_os_str().is_empty() {
            "root.to_path_buf()".into()
        } else if rel.starts_with("..") {
            format!("normalize(&root.join({}))", text(&rel))
        } else {
            format!("root.join({})", text(&rel))
        }
    }
}

impl<T: Literal> Literal for Option<T> {
    fn literal(&self, at: &At) -> String {
        match self {
            None => "None".into(),
            Some(v) => format!("Some({})", v.literal(at)),
        }
    }
}

impl<T: Literal> Literal for Vec<T> {
    fn literal(&self, at: &At) -> String {
        let items = self.iter().map(|v| v.literal(&at.item())).collect();
        at.list("vec![", items, "]")
    }
}

impl<T: Literal, const N: usize> Literal for [T; N] {
    fn literal(&self, at: &At) -> String {
        let items = self.iter().map(|v| v.literal(&at.item())).collect();
        at.list("[", items, "]")
    }
}

impl<T: Literal> Literal for BTreeMap<String, T> {
    fn literal(&self, at: &At) -> String {
        if self.is_empty() {
            return "BTreeMap::new()".into();
        }
        // An entry's fields are keyed under its name: `datasets.<name>.root`.
        let entries = self
            .iter()
            .map(|(k, v)| format!("({}, {})", k.literal(at), v.literal(&at.field(k, None))))
            .collect();
        at.list("BTreeMap::from([", entries, "])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written<T: Literal>(value: &T) -> String {
        value.literal(&At::top(Path::new("/build/project"), 0))
    }

    #[test]
    fn paths_follow_the_root_only_under_it() {
        let p = |s: &str| written(&PathBuf::from(s));
        assert_eq!(p("/build/project/data/raw"), r#"root.join("data/raw")"#);
        assert_eq!(p("/build/project"), "root.to_path_buf()");
        assert_eq!(
            p("/build/shared/eeg"),
            r#"normalize(&root.join("../shared/eeg"))"#
        );
        assert_eq!(p("/mnt/eeg"), r#"PathBuf::from("/mnt/eeg")"#);
        assert_eq!(p("data/demo"), r#"PathBuf::from("data/demo")"#);
    }

    #[test]
    fn floats_read_back_as_floats_of_the_same_value() {
        for x in [1.0, 0.1, 3e-4, 1e-8, -127.028, 1e20, 0.333] {
            let text = written(&x);
            assert!(
                text.contains(['.', 'e']),
                "{text} would be an integer literal"
            );
            assert_eq!(text.parse::<f64>().unwrap(), x);
        }
    }

    #[test]
    fn strings_are_escaped_rust_literals() {
        assert_eq!(written(&"a \"b\"\n".to_string()), r#""a \"b\"\n".into()"#);
    }

    literal! {
        pub struct Section {
            pub rate: f64,
            pub steps: Option<usize>,
            pub names: Vec<String> = "elsewhere.names",
        }
    }

    #[test]
    fn struct_fields_carry_their_keys_in_aligned_comments() {
        let s = Section {
            rate: 0.5,
            steps: None,
            names: vec!["a".into()],
        };
        let text = s.literal(&At::top(Path::new("/r"), 0).field("section", None));
        assert_eq!(
            text,
            "Section {\n        \
                 rate: 0.5,               // section.rate\n        \
                 steps: None,             // section.steps\n        \
                 names: vec![\"a\".into()], // elsewhere.names\n    \
             }"
        );
    }
}
