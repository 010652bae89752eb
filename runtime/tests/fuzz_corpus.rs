//! Replays the fuzzers' kept corpus (fuzz/corpus, grown by `cargo +nightly fuzz run`) through
//! the parsers on stable: every input must give a value or an error, never a panic, and the
//! seed files (real-format samples) must parse.

use std::path::{Path, PathBuf};

use signal_diffusion_runtime::data::signal::{cnt, edf, mat};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{}: no corpus", dir.display());
    files
}

fn replay(target: &str, parse: impl Fn(&Path, &[u8]) -> bool) {
    let (mut ok, mut seeds) = (0, 0);
    for f in corpus(target) {
        let bytes = std::fs::read(&f).unwrap();
        let parsed = parse(&f, &bytes);
        if f.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("seed_")
        {
            assert!(parsed, "{}: a seed must parse", f.display());
            seeds += 1;
        }
        ok += usize::from(parsed);
    }
    assert!(
        seeds >= 2 && ok >= seeds,
        "{target}: {seeds} seeds, {ok} parsed"
    );
}

#[test]
fn edf_corpus() {
    replay("edf_header", |p, b| edf::parse(p, b).is_ok());
}

#[test]
fn mat_corpus() {
    replay("mat_file", |p, b| mat::parse(p, b).is_ok());
}

#[test]
fn cnt_corpus() {
    replay("cnt_header", |p, b| {
        cnt::parse_header(p, b, b.len()).is_ok()
    });
}
