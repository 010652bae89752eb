//! docs/config.md documents every key a config can hold: each key the schema reads (as the
//! generated trainers' `config()` comments name them) appears in one of its tables, so a key
//! added to the schema without a line in the docs fails here.

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
    let mut keys = vec![];
    for line in docs.lines().filter(|l| l.starts_with("| `")) {
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
    }
    keys
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
