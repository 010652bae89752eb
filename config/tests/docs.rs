//! docs/config.md documents every key a config can hold: each key the schema reads (as the
//! generated trainers' `config()` comments name them) appears in one of its tables, so a key
//! added to the schema without a line in the docs fails here. And the class the docs give a key
//! is the code's: a key `--set` accepts (`config::OVERRIDABLE`) is marked "run-time" in every row
//! that names it, and a key with a warning snapshot (config/tests/warnings) is described as a
//! warning in one.

use std::path::Path;

use signal_diffusion_config::literal::{At, Literal};
use signal_diffusion_config::{self as config, settings::Env, Target};

const SECTIONS: &[&str] = &[
    "settings",
    "data",
    "datasets",
    "hf_models",
    "dataset",
    "model",
    "objective",
    "optimizer",
    "scheduler",
    "training",
    "logging",
    "inference",
    "tasks",
];

/// The keys the docs' tables name in their first column: `a.b.c`, with `a.b.c/d` and
/// "`a.b.c`, `d`" naming `a.b.d` too, and `*` or `<name>` matching any part.
fn documented(docs: &str) -> Vec<String> {
    rows(docs).into_iter().flat_map(|(keys, _)| keys).collect()
}

/// Each table row that names keys: (the keys, the row's text).
fn rows(docs: &str) -> Vec<(Vec<String>, &str)> {
    let mut rows = vec![];
    for line in docs.lines().filter(|l| l.starts_with("| `")) {
        let mut keys = vec![];
        let cell = line[1..].split('|').next().unwrap_or("");
        let mut parent = String::new();
        for token in cell.split('`').skip(1).step_by(2) {
            for (i, part) in token.split('/').enumerate() {
                let part = part.trim();
                let absolute = SECTIONS.iter().any(|s| part.starts_with(&format!("{s}.")));
                let key = if absolute || (i == 0 && parent.is_empty()) {
                    part.to_string()
                } else {
                    format!("{parent}.{part}")
                };
                if absolute || (i == 0 && parent.is_empty()) {
                    parent = key
                        .rsplit_once('.')
                        .map_or(String::new(), |(p, _)| p.into());
                }
                keys.push(key);
            }
        }
        rows.push((keys, line));
    }
    rows
}

fn matches(pattern: &str, key: &str) -> bool {
    let (p, k): (Vec<&str>, Vec<&str>) = (pattern.split('.').collect(), key.split('.').collect());
    if p.last() == Some(&"*") && k.len() >= p.len() - 1 {
        return p[..p.len() - 1].iter().zip(&k).all(|(a, b)| a == b);
    }
    p.len() == k.len()
        && p.iter().zip(&k).all(|(a, b)| {
            a == b
                || *a == "<name>"
                || a.strip_suffix('*').is_some_and(|pre| b.starts_with(pre))
                || a.strip_prefix('*').is_some_and(|suf| b.ends_with(suf))
        })
}

/// The TOML keys of a resolved config, from the comments of its literal.
fn keys_of(preset: &str) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let r = config::resolve(
        Path::new(preset),
        &Env::isolated(root.clone()),
        Target::default(),
    )
    .unwrap_or_else(|e| panic!("{preset}: {}", config::render(&e)));
    let text = r.config.literal(&At::top(&root, 0));
    text.lines()
        .filter_map(|l| l.split_once(" // ").map(|(_, c)| c.trim()))
        .filter_map(|c| c.split_whitespace().next())
        .filter(|k| k.contains('.'))
        .map(String::from)
        .collect()
}

#[test]
fn every_key_of_the_schema_is_documented() {
    let docs_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md");
    let docs = std::fs::read_to_string(&docs_path).unwrap();
    let documented = documented(&docs);
    let mut missing = vec![];
    for preset in [
        "config/classification/quickstart.toml",
        "config/classification/transformer-timeseries.toml",
        "config/diffusion/quickstart.toml",
    ] {
        for key in keys_of(preset) {
            if !documented.iter().any(|d| matches(d, &key)) && !missing.contains(&key) {
                missing.push(key);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "keys docs/config.md does not name: {missing:#?}"
    );
}

fn docs_text() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md"))
        .unwrap()
}

#[test]
fn every_overridable_key_is_documented_as_run_time() {
    let docs = docs_text();
    let rows = rows(&docs);
    let mut wrong = vec![];
    for key in config::OVERRIDABLE {
        let naming: Vec<&str> = rows
            .iter()
            .filter(|(keys, _)| keys.iter().any(|d| matches(d, key) || matches(key, d)))
            .map(|(_, row)| *row)
            .collect();
        if naming.is_empty() {
            wrong.push(format!("{key}: no row names it"));
        }
        for row in naming {
            if !row.contains("run-time") {
                wrong.push(format!("{key}: not marked run-time in {row}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn every_key_with_a_warning_is_documented_as_one() {
    let docs = docs_text();
    let rows = rows(&docs);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/warnings");
    let mut wrong = vec![];
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        if entry.path().extension().is_none_or(|e| e != "warnings") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap();
        // "file:line:col: warning: `key` ..."
        for key in text
            .lines()
            .filter_map(|l| l.split_once(": warning: `"))
            .filter_map(|(_, rest)| rest.split_once('`').map(|(k, _)| k))
        {
            let described = rows
                .iter()
                .any(|(keys, row)| keys.iter().any(|d| matches(d, key)) && row.contains("warning"));
            if !described {
                wrong.push(key.to_string());
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "keys with a warning snapshot whose docs row does not say so: {wrong:#?}"
    );
}
