//! Every warning a config can raise that is ours to word, as it reads: each case in
//! tests/warnings is `<case>.toml` (a config that builds) and `<case>.warnings` (its warnings,
//! rendered as the build prints them). After an intended change of wording, regenerate them with
//! `SNAPSHOTS=overwrite cargo test -p signal-diffusion-config --test warnings`.

use std::path::{Path, PathBuf};

use signal_diffusion_config::{self as config, settings::Env, Target};

#[test]
fn warnings_read_as_their_snapshots() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let env = Env::isolated(root.clone());
    let dir = root.join("config/tests/warnings");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no cases in {}", dir.display());
    let overwrite = std::env::var("SNAPSHOTS").is_ok_and(|v| v == "overwrite");
    let mut mismatched = vec![];
    for case in cases {
        let rel = case.strip_prefix(&root).unwrap();
        let resolved = config::resolve(rel, &env, Target::default())
            .unwrap_or_else(|e| panic!("{} must build:\n{}", rel.display(), config::render(&e)));
        assert!(
            !resolved.warnings.is_empty(),
            "{} raises no warning",
            rel.display()
        );
        let got = resolved.warnings.join("\n\n") + "\n";
        let snapshot = case.with_extension("warnings");
        if overwrite {
            std::fs::write(&snapshot, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&snapshot).unwrap_or_default();
        if got != want {
            mismatched.push(format!(
                "{}:\n--- expected\n{want}--- got\n{got}",
                rel.display()
            ));
        }
    }
    assert!(mismatched.is_empty(), "{}", mismatched.join("\n"));
}
