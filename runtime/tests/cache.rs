//! `dataset.image_column` and `dataset.cache_dir` at the loader: a Parquet split read through
//! another image column, its images decoded once into the cache and read back equal, the cache
//! remade when the table changes, and the errors that name what is wrong.

use std::path::Path;

use signal_diffusion_runtime::data::cache::cached;
use signal_diffusion_runtime::data::loader::{read_split, Split};
use signal_diffusion_runtime::data::table::{Cell, Kind, Table, TableWriter};

/// `train.parquet` with `n` RGB 8×8 images in column `img` whose pixels start at `base`.
fn write_table(dir: &Path, n: usize, base: u8) {
    let mut t = Table::empty(&[("img", Kind::Image), ("class", Kind::Int)]);
    for i in 0..n {
        let px: Vec<u8> = (0..8 * 8 * 3)
            .map(|k| base.wrapping_add((k * 7 + i * 31) as u8))
            .collect();
        let png = signal_diffusion_runtime::data::io::encode_png(&px, 3, 8, 8).unwrap();
        t.push_row(vec![Cell::Image(Some(png)), Cell::Int(Some(i as i64))])
            .unwrap();
    }
    std::fs::create_dir_all(dir).unwrap();
    let mut w = TableWriter::create(&dir.join("train.parquet"), &t).unwrap();
    w.write(&t).unwrap();
    w.finish().unwrap();
}

fn inputs(split: &Split) -> Vec<Vec<f32>> {
    (0..split.len())
        .map(|i| {
            let mut out = vec![];
            split.load(i, &[3, 8, 8], 0, &mut out).unwrap();
            out
        })
        .collect()
}

#[test]
fn a_cached_split_loads_the_same_inputs_and_follows_its_source() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, cache) = (tmp.path().join("data"), tmp.path().join("cache"));
    write_table(&data, 5, 0);
    let read = || read_split(&data, "train", &[], Some("img")).unwrap();
    let plain = inputs(&read());
    let first = cached(read(), &data, &cache, Some("img"), 2).unwrap();
    assert_eq!(inputs(&first), plain);
    let dir = std::fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let pixels = dir.join("train.u8");
    assert_eq!(std::fs::metadata(&pixels).unwrap().len(), 5 * 8 * 8 * 3);
    let stamp = std::fs::metadata(&pixels).unwrap().modified().unwrap();

    // Reused as it is.
    let again = cached(read(), &data, &cache, Some("img"), 2).unwrap();
    assert_eq!(inputs(&again), plain);
    assert_eq!(
        std::fs::metadata(&pixels).unwrap().modified().unwrap(),
        stamp
    );

    // The table changes (other pixels, one row more): decoded again, new inputs.
    write_table(&data, 6, 100);
    let changed = inputs(&read());
    assert_ne!(changed[0], plain[0]);
    let remade = cached(read(), &data, &cache, Some("img"), 2).unwrap();
    assert_eq!(inputs(&remade), changed);
    assert_eq!(std::fs::metadata(&pixels).unwrap().len(), 6 * 8 * 8 * 3);
}

#[test]
fn an_image_column_that_is_not_there_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    write_table(tmp.path(), 1, 0);
    let err = read_split(tmp.path(), "train", &[], Some("image_bytes"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("train.parquet: no column `image_bytes` (`dataset.image_column`)")
            && err.contains("columns: img, class"),
        "{err}"
    );
    // Without the key the loader looks for `image` (or `signal`).
    let err = read_split(tmp.path(), "train", &[], None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no column `image` or `signal`"), "{err}");

    // An image folder lists its files in `file_name`: the key does not apply there.
    std::fs::write(tmp.path().join("val-metadata.csv"), "file_name\n").unwrap();
    let err = read_split(tmp.path(), "val", &[], Some("img"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("`dataset.image_column` = \"img\" names a Parquet column")
            && err.contains("val-metadata.csv is an image folder"),
        "{err}"
    );
}
