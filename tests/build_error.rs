//! A bad `SD_CONFIG` makes `cargo build` fail with the TOML location and nothing noisy.
//! Reuses the test run's own target directory, so only build.rs runs (no dependency rebuild).

use std::process::Command;

#[test]
fn a_bad_sd_config_fails_the_build_at_the_toml_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/classification/quickstart.toml"
    ))
    .unwrap()
    .replace(
        "learning_rate = 0.003",
        "learning_rate = 0.003\nmomentum = 0.9",
    )
    .replace(
        "config = \"config/default.toml\"",
        &format!(
            "config = \"{}/config/default.toml\"",
            env!("CARGO_MANIFEST_DIR")
        ),
    );
    std::fs::write(&bad, &text).unwrap();
    let line = text
        .lines()
        .position(|l| l.starts_with("momentum"))
        .unwrap()
        + 1;
    let out = Command::new(env!("CARGO"))
        .args(["build", "--bin", "train", "--quiet"])
        .env("SD_CONFIG", &bad)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the build succeeded:\n{stderr}");
    // The path is shown relative to the project root where that is shorter: match its end.
    let expected = format!("bad.toml:{line}:12: error: `optimizer.momentum` applies to sgd only");
    assert!(
        stderr.contains(&expected),
        "expected `{expected}` in:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
