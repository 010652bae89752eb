//! The latent cache (data/latents.rs) with a stand-in encoder whose output is known: each
//! sample reads back as the encoder's mean and log-variance of its image (the mirror image's
//! for the flipped variant), a rerun encodes nothing, an interrupted run re-encodes only its
//! missing shard, and a changed encoder or dataset encodes into a new cache.

use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use candle_core::{Device, Tensor};
use signal_diffusion_runtime::data::image::Augment;
use signal_diffusion_runtime::data::latents::{cached, Encoder, Encoding};
use signal_diffusion_runtime::data::loader::{read_split, Split};

/// An image folder of `n` grey 4×4 images whose pixels differ per image and column.
fn write_images(dir: &Path, n: usize) {
    let mut csv = String::from("file_name,class\n");
    for i in 0..n {
        let px: Vec<u8> = (0..16)
            .map(|k| (i * 13 + (k % 4) * 50 + k / 4) as u8)
            .collect();
        let rel = format!("img-{i}.png");
        signal_diffusion_runtime::data::io::write_png(&dir.join(&rel), &px, 1, 4, 4).unwrap();
        csv.push_str(&format!("{rel},{}\n", i % 2));
    }
    std::fs::write(dir.join("train-metadata.csv"), csv).unwrap();
}

fn split(dir: &Path) -> Arc<Split> {
    let mut s = read_split(dir, "train", &[], None).unwrap();
    s.augment = Augment {
        resize: true,
        random_crop: false,
        random_flip: false,
    };
    Arc::new(s)
}

/// A 2×2×2 "latent": the mean is each 2×2 block's average on channel 0 and each block's first
/// pixel on channel 1; the log-variance is the mean minus 1.
fn fake_encode(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let grey = x.narrow(1, 0, 1)?;
    let avg = grey.avg_pool2d(2)?;
    let first = grey.avg_pool2d_with_stride(1, 2)?;
    let mean = Tensor::cat(&[&avg, &first], 1)?;
    let logvar = (&mean - 1.0)?;
    Ok((mean, logvar))
}

fn spec(data: &Path, cache: &Path) -> Encoding {
    Encoding {
        root: cache.to_path_buf(),
        dataset_dir: data.to_path_buf(),
        random_crop: false,
        random_flip: true,
        resolution: 4,
        image_column: None,
        workers: 2,
        shard_size: 2,
    }
}

fn read_all(s: &Split) -> Vec<Vec<f32>> {
    (0..s.len())
        .flat_map(|i| {
            [false, true].map(|flip| {
                let mut out = vec![];
                // The loader's salt picks the variant; read both directly.
                match &s.samples {
                    signal_diffusion_runtime::data::loader::Samples::Latents(l) => {
                        l.get(i, flip, &mut out).unwrap()
                    }
                    _ => panic!("not latents"),
                }
                out
            })
        })
        .collect()
}

#[test]
fn latents_are_encoded_once_resume_by_shard_and_follow_the_encoder_and_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, cache) = (tmp.path().join("data"), tmp.path().join("cache"));
    write_images(&data, 5);
    let calls = Cell::new(0usize);
    let encode = |x: &Tensor| {
        calls.set(calls.get() + x.dim(0)?);
        fake_encode(x)
    };
    let encoder = |hash| Encoder {
        hash,
        latent: [2, 2, 2],
        encode: &encode,
    };
    let pixels = split(&data);
    let latents = cached(
        &pixels,
        &encoder("vae-a"),
        &spec(&data, &cache),
        &Device::Cpu,
    )
    .unwrap();
    // 5 images and their 5 mirror images.
    assert_eq!(calls.get(), 10);
    let got = read_all(&latents);
    for i in 0..5 {
        let mut image = vec![];
        pixels.load(i, &[3, 4, 4], 0, &mut image).unwrap();
        let mirrored: Vec<f32> = image
            .chunks(4)
            .flat_map(|r| r.iter().rev().copied())
            .collect();
        for (variant, px) in [image, mirrored].into_iter().enumerate() {
            let x = Tensor::from_vec(px, (1, 3, 4, 4), &Device::Cpu).unwrap();
            let (m, l) = fake_encode(&x).unwrap();
            let want: Vec<f32> = [m, l]
                .iter()
                .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect();
            assert_eq!(got[2 * i + variant], want, "sample {i} variant {variant}");
        }
    }
    assert_ne!(got[0], got[1], "the mirror image has other latents");

    // A rerun reads the cache.
    calls.set(0);
    let again = cached(
        &pixels,
        &encoder("vae-a"),
        &spec(&data, &cache),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!((calls.get(), read_all(&again)), (0, got.clone()));

    // Interrupted: one of the 3 shards and the index are missing; only that shard is encoded.
    let dataset_dir = std::fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let dir = std::fs::read_dir(&dataset_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("train-"));
    std::fs::remove_file(dir.join("shard-00001.f32")).unwrap();
    std::fs::remove_file(dir.join("index.json")).unwrap();
    let kept = std::fs::metadata(dir.join("shard-00000.f32"))
        .unwrap()
        .modified()
        .unwrap();
    let resumed = cached(
        &pixels,
        &encoder("vae-a"),
        &spec(&data, &cache),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(calls.get(), 4, "2 samples × 2 variants");
    assert_eq!(read_all(&resumed), got);
    let after = std::fs::metadata(dir.join("shard-00000.f32"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(kept, after, "a whole shard is kept");

    // Another VAE, or a changed image, is another cache.
    calls.set(0);
    cached(
        &pixels,
        &encoder("vae-b"),
        &spec(&data, &cache),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(calls.get(), 10);
    let px: Vec<u8> = vec![200; 16];
    signal_diffusion_runtime::data::io::write_png(&data.join("img-3.png"), &px, 1, 4, 4).unwrap();
    let changed = split(&data);
    calls.set(0);
    let fresh = cached(
        &changed,
        &encoder("vae-a"),
        &spec(&data, &cache),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(calls.get(), 10);
    assert_ne!(read_all(&fresh)[6], got[6]);
    // Two VAEs; the first has the split as it was and as it is.
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);
    assert_eq!(std::fs::read_dir(&dataset_dir).unwrap().count(), 2);
}

#[test]
fn random_crops_of_non_square_images_cannot_be_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    signal_diffusion_runtime::data::io::write_png(&data.join("wide.png"), &[9; 8], 1, 2, 4)
        .unwrap();
    std::fs::write(
        data.join("train-metadata.csv"),
        "file_name,class\nwide.png,0\n",
    )
    .unwrap();
    let encode = |x: &Tensor| fake_encode(x);
    let encoder = Encoder {
        hash: "h",
        latent: [2, 1, 1],
        encode: &encode,
    };
    let mut s = spec(&data, &tmp.path().join("cache"));
    (s.random_crop, s.resolution) = (true, 2);
    let err = cached(&split(&data), &encoder, &s, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("is 4×2: random crops of non-square images cannot be cached"),
        "{err}"
    );
    assert!(err.contains("center_crop = true"), "{err}");
}
