//! Helpers the integration tests share: the small labelled image dataset they train on, and
//! readers of a run's outputs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use signal_diffusion_runtime::train::RunOptions;

/// 32×32 grey images: women have a bright band at the top, men at the bottom; Parkinson's adds
/// a bright left stripe; age sets the background level. Plus noise.
pub fn write_dataset(dir: &Path) {
    let mut state = 12345u64;
    let mut noise = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % 40) as i32 - 20
    };
    for (split, n) in [("train", 64), ("val", 16), ("test", 16)] {
        let mut rows = String::from("file_name,split,gender,health,age\n");
        for i in 0..n {
            let female = i % 2 == 0;
            let pd = (i / 2) % 2 == 0;
            let age = 20 + (i * 7) % 60;
            let mut px = vec![0u8; 32 * 32];
            for y in 0..32 {
                for x in 0..32 {
                    let mut v = 40 + age + noise();
                    if (female && y < 8) || (!female && y >= 24) {
                        v += 120;
                    }
                    if pd && x < 6 {
                        v += 90;
                    }
                    px[y * 32 + x] = v.clamp(0, 255) as u8;
                }
            }
            let rel = format!("{split}/sub-{i:02}/img.png");
            signal_diffusion_runtime::data::io::write_png(&dir.join(&rel), &px, 1, 32, 32).unwrap();
            rows.push_str(&format!(
                "{rel},{split},{},{},{age}\n",
                if female { "F" } else { "M" },
                if pd { "PD" } else { "H" }
            ));
        }
        std::fs::write(dir.join(format!("{split}-metadata.csv")), rows).unwrap();
    }
}

/// The one run directory in an output directory (beside it, an MLflow store `mlruns/` may be).
pub fn only_run_dir(out: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !p.ends_with("mlruns"))
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

/// (step, value) of a scalar tag from a run's metrics.jsonl.
pub fn series(run: &Path, tag: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["tag"] == tag)
        .map(|v| (v["step"].as_u64().unwrap(), v["value"].as_f64().unwrap()))
        .collect()
}

pub fn python(script: &str, args: &[&Path]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Held-out accuracy from a run's metrics_summary_path CSV.
pub fn test_metric(out: &Path, weights: &str, name: &str) -> f64 {
    let summary = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    summary
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0] == weights && f[1] == name).then(|| f[2].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("{weights} {name} missing in {summary}"))
}

/// Run a compiled trainer with `--set` overrides into `out`; fails the test unless it succeeds.
pub fn train(
    trainer: fn(RunOptions) -> ExitCode,
    sets: &[(&str, String)],
    out: &Path,
    resume: Option<PathBuf>,
) {
    let code = trainer(RunOptions {
        sets: sets
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        output_dir: Some(out.to_path_buf()),
        resume,
        ..Default::default()
    });
    assert_eq!(
        format!("{code:?}"),
        format!("{:?}", ExitCode::SUCCESS),
        "training failed"
    );
}

/// Copy a directory tree (a checkpoint, say).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// The image folder written as one Parquet table per split, as `sigdiff meta-dataset` and
/// Hugging Face `datasets` store it: RGB PNG bytes in an image struct column named `column`, the
/// validation split under HF's name `validation`.
pub fn write_parquet_copy(folder: &Path, out: &Path, column: &str) {
    use signal_diffusion_runtime::data::table::{Cell, Kind, Table, TableWriter};
    for (split, file) in [("train", "train"), ("val", "validation"), ("test", "test")] {
        let csv = std::fs::read_to_string(folder.join(format!("{split}-metadata.csv"))).unwrap();
        let mut t = Table::empty(&[
            ("file_name", Kind::Text),
            ("gender", Kind::Text),
            ("health", Kind::Text),
            ("age", Kind::Int),
            (column, Kind::Image),
        ]);
        for line in csv.lines().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            let (px, _, h, w) =
                signal_diffusion_runtime::data::io::read_png(&folder.join(f[0])).unwrap();
            let rgb: Vec<u8> = px.iter().flat_map(|&v| [v, v, v]).collect();
            let png = signal_diffusion_runtime::data::io::encode_png(&rgb, 3, h, w).unwrap();
            let text = |v: &str| Cell::Text(Some(v.to_string()));
            t.push_row(vec![
                text(f[0]),
                text(f[2]),
                text(f[3]),
                Cell::Int(Some(f[4].parse().unwrap())),
                Cell::Image(Some(png)),
            ])
            .unwrap();
        }
        let mut w = TableWriter::create(&out.join(format!("{file}.parquet")), &t).unwrap();
        w.write(&t).unwrap();
        w.finish().unwrap();
    }
}

/// `wandb leet inspect` (wandb's own reader, the one `wandb sync` uses; offline) on a run
/// directory or `.wandb` file: with `summary`, the run's summary object; else every record, one
/// JSON object per line. Returns the parsed output and stderr (where it reports corrupt data).
pub fn wandb_inspect(path: &Path, summary: bool) -> (Vec<serde_json::Value>, String) {
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "wandb", "leet", "inspect", "--json"]);
    if summary {
        cmd.arg("--summary");
    }
    let out = cmd
        .arg(path)
        .env("WANDB_MODE", "offline")
        .output()
        .expect("python3 -m wandb runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "wandb leet inspect failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let values = if summary {
        vec![serde_json::from_str(&stdout).expect("one JSON object")]
    } else {
        stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON record"))
            .collect()
    };
    (values, stderr)
}

/// A run directory's W&B offline runs (`<run>/wandb/offline-run-*`), oldest first.
pub fn wandb_runs(root: &Path) -> Vec<PathBuf> {
    let mut runs: Vec<PathBuf> = std::fs::read_dir(root.join("wandb"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    runs.sort();
    runs
}
