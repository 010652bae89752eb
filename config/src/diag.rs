//! Diagnostics that point into the user's TOML.
//!
//! Every message carries the file it came from (as the user named it), a byte span, and is
//! rendered like rustc renders its own errors: `file:LINE:COL: error: message`, then the
//! offending line with a caret under the span, then an optional `help:` line. Validation
//! collects all diagnostics instead of stopping at the first, so one build shows every mistake.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One loaded text (a TOML file, or a virtual source such as a `--set` override).
#[derive(Debug, Clone)]
pub struct Source {
    /// What the user sees in messages: the path as they wrote it (or `--set key=value`).
    pub name: String,
    /// Where it lives on disk, when it is a file.
    pub path: Option<PathBuf>,
    pub text: String,
}

/// Index into [`Sources`].
pub type FileId = usize;

/// All texts read while resolving one config (the training config, the settings chain, overrides).
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub files: Vec<Source>,
}

impl Sources {
    pub fn add(&mut self, name: String, path: Option<PathBuf>, text: String) -> FileId {
        self.files.push(Source { name, path, text });
        self.files.len() - 1
    }

    pub fn get(&self, id: FileId) -> &Source {
        &self.files[id]
    }

    /// Every file on disk that took part (for `rerun-if-changed`).
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().filter_map(|f| f.path.as_deref())
    }
}

/// A place in a source: the file and a byte range into its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub file: FileId,
    pub span: Range<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub severity: Severity,
    /// None when the mistake is not inside a file (a missing file, an unset variable).
    pub loc: Option<Loc>,
    pub message: String,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(loc: Option<Loc>, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            loc,
            message: message.into(),
            help: None,
        }
    }
    pub fn warning(loc: Option<Loc>, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            loc,
            message: message.into(),
            help: None,
        }
    }
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// `file:LINE:COL` of the start of the span, 1-based, columns counted in characters.
    pub fn location(&self, sources: &Sources) -> Option<String> {
        let loc = self.loc.as_ref()?;
        let src = sources.get(loc.file);
        let (line, col) = line_col(&src.text, loc.span.start);
        Some(format!("{}:{}:{}", src.name, line, col))
    }

    /// The first line of the rendering: `file:L:C: error: message`.
    pub fn headline(&self, sources: &Sources) -> String {
        let kind = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        match self.location(sources) {
            Some(at) => format!("{at}: {kind}: {}", self.message),
            None => format!("{kind}: {}", self.message),
        }
    }

    /// The full rendering: headline, source line with a caret, help.
    pub fn render(&self, sources: &Sources) -> String {
        let mut out = self.headline(sources);
        if let Some(loc) = &self.loc {
            let src = sources.get(loc.file);
            let (line_no, col) = line_col(&src.text, loc.span.start);
            let line = src.text.lines().nth(line_no - 1).unwrap_or("");
            let width = line_no.to_string().len();
            let span_len = src.text[loc.span.start..loc.span.end.min(src.text.len())]
                .lines()
                .next()
                .map(|s| s.chars().count())
                .unwrap_or(0)
                .max(1);
            let pad = " ".repeat(width);
            out.push_str(&format!(
                "\n{pad} |\n{line_no} | {line}\n{pad} | {}{}",
                " ".repeat(col - 1),
                "^".repeat(span_len)
            ));
        }
        if let Some(help) = &self.help {
            out.push_str(&format!("\n  = help: {help}"));
        }
        out
    }
}

/// 1-based line and character column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col = text[line_start..offset].chars().count() + 1;
    (line, col)
}

/// What resolution and validation produced besides values: errors and warnings, in order.
#[derive(Debug, Default, Clone)]
pub struct Diagnostics {
    pub list: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.list.push(d);
    }
    pub fn error(&mut self, loc: Option<Loc>, message: impl Into<String>) {
        self.push(Diagnostic::error(loc, message));
    }
    pub fn has_errors(&self) -> bool {
        self.list.iter().any(|d| d.severity == Severity::Error)
    }
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.list.iter().filter(|d| d.severity == Severity::Error)
    }
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.list.iter().filter(|d| d.severity == Severity::Warning)
    }
}

/// A failed resolution: the sources (to render locations) and what went wrong.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub sources: Sources,
    pub diagnostics: Diagnostics,
}

impl ConfigError {
    /// Every error, rendered, separated by blank lines; warnings are left out.
    pub fn render_errors(&self) -> String {
        let mut parts: Vec<String> = self
            .diagnostics
            .errors()
            .map(|d| d.render(&self.sources))
            .collect();
        let n = parts.len();
        if n > 1 {
            parts.push(format!("{n} errors in the config"));
        }
        parts.join("\n\n")
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render_errors())
    }
}

impl std::error::Error for ConfigError {}

/// Levenshtein distance, for "did you mean" hints.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate within a distance that still reads as a typo.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let t = "a = 1\nbb = 2\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 6), (2, 1));
        assert_eq!(line_col(t, 11), (2, 6));
    }

    #[test]
    fn suggests_close_keys_only() {
        let keys = ["learning_rate", "weight_decay", "betas"];
        assert_eq!(suggest("learnig_rate", keys), Some("learning_rate"));
        assert_eq!(suggest("momentum", keys), None);
    }

    #[test]
    fn renders_caret_under_span() {
        let mut s = Sources::default();
        let id = s.add("c.toml".into(), None, "[a]\nlr = \"x\"\n".into());
        let d = Diagnostic::error(
            Some(Loc {
                file: id,
                span: 9..12,
            }),
            "expected a float",
        )
        .help("write a number");
        assert_eq!(
            d.render(&s),
            "c.toml:2:6: error: expected a float\n  |\n2 | lr = \"x\"\n  |      ^^^\n  = help: write a number"
        );
    }
}
