//! The weighted meta-dataset: two small preprocessed datasets merged into Parquet, read back by
//! our reader and by Python's pyarrow (what Hugging Face `datasets` reads it with).

use std::path::Path;
use std::process::Command;

use signal_diffusion_config::settings::Env;
use signal_diffusion_runtime::data::signal::meta::{run, MetaOptions};
use signal_diffusion_runtime::data::table::{self, Column};

/// A dataset output dir with `n_subjects` × 2 grey PNGs per split and its metadata CSVs.
fn dataset(dir: &Path, header: &str, row: impl Fn(usize) -> String, per_split: &[(&str, usize)]) {
    let mut k = 0;
    for &(split, n) in per_split {
        let mut csv = format!("{header}\n");
        for i in 0..n {
            let file = format!("{split}/sub{k:02}/spectrogram-{i}.png");
            let px: Vec<u8> = (0..256 * 256)
                .map(|p| ((p * 7 + k * 31) % 256) as u8)
                .collect();
            signal_diffusion_runtime::data::io::write_png(&dir.join(&file), &px, 1, 256, 256)
                .unwrap();
            csv.push_str(&format!("{file},{split},{}\n", row(k)));
            k += 1;
        }
        std::fs::write(dir.join(format!("{split}-metadata.csv")), csv).unwrap();
    }
}

#[test]
fn weighted_parquet_in_the_hugging_face_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let out_root = tmp.path().join("out");
    // "big": math-like (no health column), 8 train samples; "small": parkinsons-like, 2.
    dataset(
        &out_root.join("big/stfts"),
        "file_name,split,state,gender,doingmath,age,math_condition",
        |k| {
            format!(
                "1,{},False,{},0",
                if k % 2 == 0 { "F" } else { "M" },
                20 + k
            )
        },
        &[("train", 8), ("val", 2), ("test", 1)],
    );
    dataset(
        &out_root.join("small/stfts"),
        "file_name,split,gender,health,age,parkinsons_condition",
        |k| format!("{},PD,{},2", if k == 0 { "F" } else { "M" }, 60 + k),
        &[("train", 2), ("val", 1), ("test", 1)],
    );
    let settings_path = tmp.path().join("settings.toml");
    std::fs::write(
        &settings_path,
        "[data]\nroot = \"raw\"\noutput_root = \"out\"\n\n[datasets.big]\noutput = \"big/stfts\"\n\n[datasets.small]\noutput = \"small/stfts\"\n",
    )
    .unwrap();
    let env = Env::isolated(tmp.path().to_path_buf());
    let settings = signal_diffusion_config::load_settings(Some(&settings_path), &env).unwrap();
    let mut args = MetaOptions {
        datasets: vec!["big".into(), "small".into()],
        output_dir: None,
        copy_splits: vec!["train".into(), "val".into(), "test".into()],
        max_sampling_weight: None,
        overwrite: false,
        jobs: 2,
    };
    let summary = run(&args, &settings).unwrap();
    let out = out_root.join("reweighted_meta_dataset_log_n2048_fs125");
    assert_eq!(summary.output, out);
    // train: pF = 0.5 (5 of 10), d = (0.8, 0.2): big keeps 1 copy each, small gets 1.857:
    // 1 + 2 copies.
    assert_eq!(
        summary.splits[0],
        ("train".to_string(), vec![(8, 8), (2, 3)])
    );

    let t = table::read(&out.join("train.parquet")).unwrap();
    assert_eq!(
        t.names,
        [
            "file_name",
            "split",
            "gender",
            "health",
            "age",
            "caption",
            "image"
        ]
    );
    assert_eq!(t.rows(), 11);
    // Rows by weight bucket, copies adjacent: the big dataset first, then the small one's.
    assert_eq!(
        t.column("file_name").unwrap().text(8).as_deref(),
        Some("train/sub00/spectrogram-0.png")
    );
    assert_eq!(
        t.column("file_name").unwrap().text(9),
        t.column("file_name").unwrap().text(10)
    );
    assert_eq!(t.column("health").unwrap().text(0).as_deref(), Some("H"));
    assert_eq!(
        t.column("caption").unwrap().text(10).as_deref(),
        Some("a spectrogram image of a 61 year old, male subject with Parkinson's disease")
    );
    let Column::Image(images) = t.column("image").unwrap() else {
        panic!("image column")
    };
    let (px, c, h, w) =
        signal_diffusion_runtime::data::io::decode_png(images[0].as_ref().unwrap(), "row 0")
            .unwrap();
    assert_eq!((c, h, w), (3, 256, 256), "grey converted to RGB");
    assert!(px.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));

    // Python's pyarrow reads the same table, with the types `datasets` expects.
    let script = r#"
import json, sys, pyarrow.parquet as pq
d = sys.argv[1]
for split, n in [("train", 11), ("val", None), ("test", None)]:
    t = pq.read_table(f"{d}/{split}.parquet")
    if n is not None:
        assert t.num_rows == n, t.num_rows
    assert str(t.schema.field("file_name").type) == "string"
    assert str(t.schema.field("age").type) == "int64"
    assert str(t.schema.field("image").type) == "struct<bytes: binary, path: string>", t.schema.field("image").type
    feats = json.loads(t.schema.metadata[b"huggingface"])["info"]["features"]
    assert feats["image"] == {"_type": "Image"}, feats
    row = t.slice(9, 1).to_pylist()[0] if split == "train" else t.slice(0, 1).to_pylist()[0]
    png = row["image"]["bytes"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and row["image"]["path"] is None
    w, h = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (w, h, png[25]) == (256, 256, 2), (w, h, png[25])  # colour type 2: RGB
    assert row["split"] == split
print("ok", t.num_rows)
"#;
    let res = Command::new("python3")
        .args(["-c", script, out.to_str().unwrap()])
        .output()
        .expect("python3 runs");
    assert!(
        res.status.success(),
        "pyarrow could not read the meta-dataset: {}{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
    let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        readme.contains("- split: validation\n    path: val.parquet"),
        "{readme}"
    );

    // Existing output is kept unless --overwrite.
    let e = run(&args, &settings).unwrap_err().to_string();
    assert!(e.contains("--overwrite"), "{e}");
    args.overwrite = true;
    run(&args, &settings).unwrap();
    assert!(!out.with_extension("partial").exists());
}
