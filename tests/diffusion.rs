//! End-to-end DiT training through macro-compiled trainers on the small image dataset of
//! tests/common: exact resume, files TensorBoard and Python safetensors read, and the
//! augmentation loop the project exists for (a classifier trained only on generated samples
//! recognises real images); and a DiT on time series whose samples carry their class's rhythm.

use std::path::Path;
use std::process::ExitCode;

use crate::common::{
    copy_dir, only_run_dir, python, series, test_metric, train, wandb_inspect, wandb_runs,
    write_dataset, write_parquet_copy,
};
use signal_diffusion_runtime::config::choice::Sampler;
use signal_diffusion_runtime::diffusion::fidelity::BANDS;
use signal_diffusion_runtime::train::sample::SampleOptions;
use signal_diffusion_runtime::train::RunOptions;

/// A macro-compiled trainer's entry point.
type Trainer = fn(RunOptions) -> ExitCode;

mod tiny_dit {
    signal_diffusion_macros::trainer!("train/tiny_dit.toml");
}

mod augment_dit {
    signal_diffusion_macros::trainer!("train/augment_dit.toml");
}

mod tiny_latent_dit {
    signal_diffusion_macros::trainer!("train/tiny_latent_dit.toml");
}

mod tiny_latent_localmamba {
    signal_diffusion_macros::trainer!("train/tiny_latent_localmamba.toml");
}

mod caption_dit {
    signal_diffusion_macros::trainer!("train/caption_dit.toml");
}

mod caption_hourglass {
    signal_diffusion_macros::trainer!("train/caption_hourglass.toml");
}

mod caption_localmamba {
    signal_diffusion_macros::trainer!("train/caption_localmamba.toml");
}

mod series_dit {
    signal_diffusion_macros::trainer!("train/series_dit.toml");
}

mod tiny_hourglass {
    signal_diffusion_macros::trainer!("train/tiny_hourglass.toml");
}

mod series_hourglass {
    signal_diffusion_macros::trainer!("train/series_hourglass.toml");
}

mod series_localmamba {
    signal_diffusion_macros::trainer!("train/series_localmamba.toml");
}

mod classifier {
    signal_diffusion_macros::trainer!("train/tiny.toml");
}
mod lora_dit {
    signal_diffusion_macros::trainer!("train/lora_dit.toml");
}

mod sd15_lora {
    signal_diffusion_macros::trainer!("train/sd15_lora.toml");
}

mod sd35_lora {
    signal_diffusion_macros::trainer!("train/sd35_lora.toml");
}

mod sd35_full {
    signal_diffusion_macros::trainer!("train/sd35_full.toml");
}

/// Three samples of `checkpoint` into `out`, 3 denoising steps, in batches of 2, seed 1.
fn three_samples(checkpoint: std::path::PathBuf, out: std::path::PathBuf) -> SampleOptions {
    SampleOptions {
        n: Some(3),
        steps: Some(3),
        batch_size: 2,
        seed: 1,
        ..SampleOptions::new(checkpoint, out)
    }
}

/// Train a DiT on `data` into `out`; the mean loss of the last `window` updates must be below
/// 0.7× that of the first. Returns the run directory.
fn train_dit(trainer: Trainer, data: &Path, out: &Path, window: usize) -> std::path::PathBuf {
    train_until_loss_falls(trainer, data, out, window, 0.7)
}

/// Train `trainer` on `data` into `out`; the mean loss of the last `window` updates must be
/// below `factor` × that of the first. Returns the run directory.
fn train_until_loss_falls(
    trainer: Trainer,
    data: &Path,
    out: &Path,
    window: usize,
    factor: f64,
) -> std::path::PathBuf {
    train(
        trainer,
        &[("dataset.name", data.display().to_string())],
        out,
        None,
    );
    let run = only_run_dir(out);
    let losses = series(&run, "train/loss");
    let mean = |s: &[(u64, f64)]| s.iter().map(|(_, v)| v).sum::<f64>() / s.len() as f64;
    let (first, last) = (
        mean(&losses[..window]),
        mean(&losses[losses.len() - window..]),
    );
    assert!(
        last < factor * first,
        "the diffusion loss went from {first:.4} to {last:.4}: {losses:?}"
    );
    run
}

#[test]
fn dit_trains_resumes_exactly_and_writes_readable_files() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    let sets = [("dataset.name", data.display().to_string())];

    // 1. 8 updates of 2 micro-batches, evaluations at 0, 4, 8, checkpoints at 3 and 6.
    let out_a = tmp.path().join("a");
    train(tiny_dit::run, &sets, &out_a, None);
    let run_a = only_run_dir(&out_a);
    let losses = series(&run_a, "train/loss");
    assert_eq!(losses.len(), 8);
    assert!(
        losses.iter().all(|(_, v)| v.is_finite() && *v > 0.0),
        "{losses:?}"
    );
    assert_eq!(series(&run_a, "val/loss").len(), 3);
    assert!(run_a
        .join("checkpoints/checkpoint-3/ema.safetensors")
        .exists());
    assert!(run_a.join("samples/step-000004.png").exists());
    let best: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(run_a.join("best_eval/metadata.json")).unwrap(),
    )
    .unwrap();
    assert!(!best.is_empty() && best.len() <= 3, "{best:?}");

    // 2. Resumed from update 3 (mid-epoch: 32 training images are 4 batches, 2 updates per
    // epoch), the later losses, validation losses and KIDs equal the uninterrupted run's.
    let out_b = tmp.path().join("b");
    copy_dir(
        &run_a.join("checkpoints/checkpoint-3"),
        &out_b.join("run/checkpoints/checkpoint-3"),
    );
    train(
        tiny_dit::run,
        &sets,
        &out_b,
        Some(out_b.join("run/checkpoints/checkpoint-3")),
    );
    for tag in ["train/loss", "val/loss", "eval/kid_mean", "eval/mmd2"] {
        let a: Vec<(u64, f64)> = series(&run_a, tag)
            .into_iter()
            .filter(|(s, _)| *s > 3)
            .collect();
        let b = series(&out_b.join("run"), tag);
        assert!(!a.is_empty());
        assert_eq!(a, b, "{tag} after resume");
    }
    //    Resumed in fp16 instead, the run starts a loss scaler, which its checkpoints keep.
    let out_c = tmp.path().join("c");
    copy_dir(
        &run_a.join("checkpoints/checkpoint-3"),
        &out_c.join("run/checkpoints/checkpoint-3"),
    );
    let fp16 = [
        sets[0].clone(),
        ("training.mixed_precision", "fp16".to_string()),
    ];
    train(
        tiny_dit::run,
        &fp16,
        &out_c,
        Some(out_c.join("run/checkpoints/checkpoint-3")),
    );
    let state =
        std::fs::read_to_string(out_c.join("run/checkpoints/checkpoint-6/state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["loss_scaler"]["scale"], 65536.0, "{state}");
    assert_eq!(
        state["config"]["run"]["training"]["mixed_precision"],
        "fp16"
    );

    // 3. The same images as Parquet tables whose image column is `img` (`dataset.image_column`),
    //    decoded once into `dataset.cache_dir`: the same losses and KIDs as the image folder's,
    //    on the run that fills the cache and on the run that reads it; a changed table is decoded
    //    again.
    let parquet = tmp.path().join("parquet");
    write_parquet_copy(&data, &parquet, "img");
    let cache = tmp.path().join("cache");
    let cached_sets = [
        ("dataset.name", parquet.display().to_string()),
        ("dataset.image_column", "img".to_string()),
        ("dataset.cache_dir", cache.display().to_string()),
    ];
    let mut stamps = vec![];
    for pass in ["fills", "reads"] {
        let out = tmp.path().join(format!("cache-{pass}"));
        train(tiny_dit::run, &cached_sets, &out, None);
        for tag in ["train/loss", "val/loss", "eval/kid_mean"] {
            let want = series(&run_a, tag);
            assert_eq!(
                series(&only_run_dir(&out), tag),
                want,
                "{tag}: cache {pass}"
            );
        }
        let cached: Vec<_> =
            std::fs::read_dir(cache.read_dir().unwrap().next().unwrap().unwrap().path())
                .unwrap()
                .map(|e| e.unwrap())
                .collect();
        // The train and val splits: pixels and index each.
        assert_eq!(cached.len(), 4, "{cached:?}");
        stamps.push(
            cached
                .iter()
                .map(|e| e.metadata().unwrap().modified().unwrap())
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(stamps[0], stamps[1], "the second run decoded again");

    // 4. TensorBoard reads the scalars and the sample grids; Python's safetensors reads the
    // final weights under diffusers' names.
    let tb = python(
        "import sys\nfrom tensorboard.backend.event_processing.event_accumulator import EventAccumulator as E\n\
         e=E(sys.argv[1]); e.Reload(); i=e.Images('eval/generated_samples')\n\
         print(len(e.Scalars('train/loss')), len(e.Scalars('eval/kid_mean')), len(i), i[-1].width, i[-1].height)",
        &[&run_a.join("tensorboard")],
    );
    // 4 samples of 16×16 in one row with 2-pixel gaps: 74 × 20.
    assert_eq!(tb.trim(), "8 3 3 74 20", "tensorboard saw: {tb}");
    let st = python(
        "import sys, json\nfrom safetensors.numpy import load_file\nd=load_file(sys.argv[1]+'/diffusion_pytorch_model.safetensors')\n\
         c=json.load(open(sys.argv[1]+'/config.json'))\n\
         print(d['transformer_blocks.1.attn1.to_q.weight'].shape, d['pos_embed.proj.weight'].shape, d['transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight'].shape, c['_class_name'], c['num_layers'])\n\
         print(d['transformer_blocks.0.ff.net.0.proj.weight'].shape, d['transformer_blocks.1.norm3.bias'].shape, 'transformer_blocks.0.attn1.to_q.bias' in d, c['activation_fn'], c['attention_bias'], c['norm_elementwise_affine'], c['dropout'])",
        &[&run_a.join("final/ema")],
    );
    assert_eq!(
        st.trim(),
        "(16, 16) (16, 3, 4, 4) (6, 16) DiTTransformer2DModel 2\n(128, 16) (16,) False geglu False True 0.1",
        "safetensors saw: {st}"
    );
    // MLflow (`[logging] mlflow = true`) reads the run: finished, KID history, the sample grids.
    let ml = python(
        "import os, sys\nos.environ['MLFLOW_ALLOW_FILE_STORE'] = 'true'\n\
         from mlflow.tracking import MlflowClient\n\
         c = MlflowClient('file:' + sys.argv[1])\n\
         r = c.search_runs([e.experiment_id for e in c.search_experiments()])[0]\n\
         grids = [a.path for a in c.list_artifacts(r.info.run_id, 'eval/generated_samples')]\n\
         print(r.info.status, len(c.get_metric_history(r.info.run_id, 'eval/kid_mean')), grids)",
        &[&out_a.join("mlruns")],
    );
    assert_eq!(
        ml.trim(),
        "FINISHED 3 ['eval/generated_samples/step-00000000.png', 'eval/generated_samples/step-00000004.png', 'eval/generated_samples/step-00000008.png']",
        "MLflow saw: {ml}"
    );
    // W&B (`[logging] wandb_project`, read by wandb's own reader): finished, the lowest KID in
    // the summary, the sample grids as image files its media records and rows name, with their
    // size and sha256; parameter histograms every 4 updates.
    let runs = wandb_runs(&run_a);
    let (summary, _) = wandb_inspect(&runs[0], true);
    let s = &summary[0];
    let kid = series(&run_a, "eval/kid_mean");
    let lowest = kid.iter().map(|(_, v)| *v).fold(f64::MAX, f64::min);
    assert_eq!(
        (&s["state"], &s["project"]),
        (&"finished".into(), &"eeg-dit".into())
    );
    assert_eq!(s["summary"]["best/kid_mean"], lowest);
    let (records, _) = wandb_inspect(&runs[0], false);
    let files: Vec<&str> = records
        .iter()
        .filter(|r| r["type"] == "files")
        .map(|r| r["files"]["files"][0]["path"].as_str().unwrap())
        .collect();
    let rows: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["type"] == "history")
        .map(|r| &r["history"]["item"])
        .collect();
    let images: Vec<&serde_json::Value> = rows
        .iter()
        .map(|r| &r["eval/generated_samples"])
        .filter(|v| !v.is_null())
        .collect();
    assert_eq!(images.len(), 3);
    for (image, file) in images.iter().zip(&files) {
        assert_eq!(
            (&image["_type"], &image["path"]),
            (&"image-file".into(), &(*file).into())
        );
        assert_eq!(
            (&image["width"], &image["height"]),
            (&74.into(), &20.into())
        );
        let png = std::fs::read(runs[0].join("files").join(file)).unwrap();
        assert_eq!(image["size"], png.len());
        let sha = python(
            "import sys, hashlib\nprint(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())",
            &[&runs[0].join("files").join(file)],
        );
        assert_eq!(image["sha256"], sha.trim());
    }
    let with_histograms: Vec<u64> = rows
        .iter()
        .filter(|r| r["parameters/pos_embed.proj.weight"]["_type"] == "histogram")
        .map(|r| r["_step"].as_u64().unwrap())
        .collect();
    assert_eq!(with_histograms, [4, 8]);
}

/// The hourglass transformer on the tiny images (gender × health and age): 8 updates resumed
/// from update 3 give the uninterrupted run's losses, validation losses and KIDs (the optimizer's
/// parameter groups, dropout's draws and the EMA restored); bf16 autocast follows them; Python's safetensors reads the final
/// weights under the reference's state-dict names; `sigdiff sample` draws from them with a
/// condition of each kind.
#[test]
fn hourglass_trains_resumes_exactly_and_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    let sets = [("dataset.name", data.display().to_string())];
    let out_a = tmp.path().join("a");
    train(tiny_hourglass::run, &sets, &out_a, None);
    let run_a = only_run_dir(&out_a);
    assert_eq!(series(&run_a, "train/loss").len(), 8);
    let out_b = tmp.path().join("b");
    copy_dir(
        &run_a.join("checkpoints/checkpoint-3"),
        &out_b.join("run/checkpoints/checkpoint-3"),
    );
    train(
        tiny_hourglass::run,
        &sets,
        &out_b,
        Some(out_b.join("run/checkpoints/checkpoint-3")),
    );
    for tag in ["train/loss", "train/grad_norm", "val/loss", "eval/kid_mean"] {
        let a: Vec<(u64, f64)> = series(&run_a, tag)
            .into_iter()
            .filter(|(s, _)| *s > 3)
            .collect();
        assert!(!a.is_empty());
        assert_eq!(a, series(&out_b.join("run"), tag), "{tag} after resume");
    }
    // Under bf16 autocast (neighbourhood and global attention, GEGLU, the mapping network) the
    // same updates follow the f32 losses within bf16's rounding.
    let out_bf16 = tmp.path().join("bf16");
    let bf16 = [
        sets[0].clone(),
        ("training.mixed_precision", "bf16".to_string()),
    ];
    train(tiny_hourglass::run, &bf16, &out_bf16, None);
    let f32_losses = series(&run_a, "train/loss");
    for ((step, got), (_, want)) in series(&only_run_dir(&out_bf16), "train/loss")
        .iter()
        .zip(&f32_losses)
    {
        assert!(
            (got - want).abs() < 1e-2 * want,
            "update {step}: bf16 loss {got} against f32 {want}"
        );
    }
    let st = python(
        "import sys, json\nfrom safetensors.numpy import load_file\nd=load_file(sys.argv[1]+'/hourglass_model.safetensors')\n\
         c=json.load(open(sys.argv[1]+'/config.json'))\n\
         print(c['_class_name'], len(d), d['down_levels.0.0.self_attn.qkv_proj.weight'].shape, d['mid_level.0.ff.up_proj.weight'].shape, d['class_emb.weight'].shape)\n\
         print(d['mapping_cond_in_proj.weight'].shape, d['age_emb.weight'].shape, d['splits.0.fac'].shape, d['down_levels.0.0.self_attn.pos_emb.freqs'].shape, d['patch_out.proj.weight'].shape)",
        &[&run_a.join("final/ema")],
    );
    // 71 state-dict entries of the reference's model (its buffers included) and our age features.
    assert_eq!(
        st.trim(),
        "Hourglass2DModel 72 (48, 16) (96, 32) (5, 16)\n(16, 16) (8, 1) (1,) (2, 1) (12, 16)",
        "safetensors saw: {st}"
    );
    for (i, condition) in ["gender=F,health=PD,age=63", "gender=M,health=H,age="]
        .iter()
        .enumerate()
    {
        let out = tmp.path().join(format!("synthetic-{i}"));
        signal_diffusion_runtime::train::sample::run(&SampleOptions {
            ema: true,
            condition: Some(condition.to_string()),
            ..three_samples(run_a.join("final"), out.clone())
        })
        .unwrap();
        let meta = std::fs::read_to_string(out.join("train-metadata.csv")).unwrap();
        assert_eq!(meta.lines().count(), 4, "{meta}");
        assert!(out.join("train/synthetic/sample-00002.png").exists());
    }
}

/// LoRA on a DiT (tests/train/lora_dit.toml, over the random weights of tests/fixtures/lora_base):
/// the loss falls while only the adapters and the targeted layers' biases train. The final
/// weights are the pretrained ones with the adapters merged (every other tensor bit for bit the
/// pretrained one), PEFT's adapter files beside them; a checkpoint holds only what trains; and
/// sampling from a checkpoint (pretrained weights + adapters) and from the merged weights gives
/// the same images; a resumed run repeats the uninterrupted one's losses.
#[test]
fn a_lora_dit_trains_only_its_adapters_and_samples_merged_or_not() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    let run = train_lora(lora_dit::run, &data, &tmp.path().join("out"), 5);

    let load = |p: &Path| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    assert_only_targets_changed(
        "tests/fixtures/lora_base/diffusion_pytorch_model.safetensors",
        &run,
        (&["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"], &[]),
        true,
    );
    let adapters = load(&run.join("final/lora/adapter_model.safetensors"));
    // 2 blocks × 5 layers × (A, B) and the 2 × 2 biases (to_out.0, ff.net.2; no q/k/v biases).
    assert_eq!(adapters.len(), 24);
    assert!(adapters
        .keys()
        .all(|k| k.starts_with("base_model.model.transformer_blocks.")));
    assert!(adapters.contains_key("base_model.model.transformer_blocks.1.ff.net.2.base_layer.bias"));
    let peft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("final/lora/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (peft["r"].as_u64(), peft["lora_alpha"].as_f64()),
        (Some(4), Some(8.0))
    );
    let checkpoint = load(&run.join("checkpoints/last/model.safetensors"));
    assert!(!checkpoint.contains_key("transformer_blocks.0.attn1.to_q.weight"));
    assert!(checkpoint.contains_key("transformer_blocks.0.attn1.to_q.lora_B.weight"));
    // Dropout's masks included.
    assert_resumes_exactly_from_update_20(lora_dit::run, &data, &run, tmp.path());

    assert_adapted_samples_are_the_merged_ones(&run, tmp.path(), None, 16);
}

/// Stable Diffusion 1.5 with LoRA on the tiny random pipeline of tests/fixtures/sd15-tiny
/// (tests/fixtures/sd15_tiny.py): captions embedded once into CLIP text states, images encoded
/// by the pipeline's VAE, ε-prediction on its scaled-linear schedule, the UNet checkpointed per
/// block. The loss falls, only the targeted layers change, the adapters are PEFT's and
/// diffusers', a resumed run repeats the same updates, and samples of the adapted checkpoint
/// are the merged model's.
#[test]
fn a_stable_diffusion_15_lora_run_trains_its_adapters_and_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let data = gender_captioned_dataset(tmp.path());
    let run = train_lora(sd15_lora::run, &data, &tmp.path().join("out"), 10);
    let targeted = [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
    ];
    assert_only_targets_changed(
        "tests/fixtures/sd15-tiny/unet/diffusion_pytorch_model.safetensors",
        &run,
        (&targeted, &[]),
        false,
    );
    let load = |p: &Path| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let adapters = load(&run.join("final/lora/adapter_model.safetensors"));
    // 4 transformers (one down, the middle's, two up) of 2 attentions × 4 projections and 2
    // feed-forward layers, × (A, B).
    assert_eq!(adapters.len(), 4 * 10 * 2, "{:?}", adapters.keys());
    // And as diffusers' LoRA file (`pipe.load_lora_weights`, benches/sd15_lora_interop.py):
    // the same tensors under `unet.`, the LoRA config in the file's metadata.
    let file = run.join("final/lora/pytorch_lora_weights.safetensors");
    let diffusers = load(&file);
    assert_eq!(diffusers.len(), adapters.len());
    for (key, t) in &diffusers {
        let peft = format!("base_model.model.{}", key.strip_prefix("unet.").unwrap());
        assert_eq!(max_abs_diff(t, &adapters[&peft]), 0.0, "{key}");
    }
    let header = python(
        "import sys, json\nfrom safetensors import safe_open\nm = safe_open(sys.argv[1], 'numpy').metadata()\nc = json.loads(m['lora_adapter_metadata'])\nprint(c['unet.r'], c['unet.lora_alpha'], m['format'])",
        &[&file],
    );
    assert_eq!(header.trim(), "4 4.0 pt");
    // `sigdiff export` of the last checkpoint: merged, the final weights; unmerged, the final
    // adapters; `--merge` of a checkpoint without adapters is an error.
    use signal_diffusion_runtime::train::export::export;
    let (merged, adapters_only) = (
        tmp.path().join("exported"),
        tmp.path().join("exported-adapters"),
    );
    export(&run.join("checkpoints/last"), &merged, false, true, false).unwrap();
    export(
        &run.join("checkpoints/last"),
        &adapters_only,
        false,
        false,
        false,
    )
    .unwrap();
    let same_files = |a: &Path, b: &Path| {
        let (a, b) = (load(a), load(b));
        assert_eq!(a.len(), b.len());
        for (k, t) in &a {
            assert_eq!(max_abs_diff(t, &b[k]), 0.0, "{k}");
        }
    };
    let weights = "diffusion_pytorch_model.safetensors";
    same_files(&merged.join(weights), &run.join("final").join(weights));
    for f in [
        "adapter_model.safetensors",
        "pytorch_lora_weights.safetensors",
    ] {
        same_files(&adapters_only.join(f), &run.join("final/lora").join(f));
    }
    assert!(!adapters_only.join(weights).exists());
    let err = export(
        &run.join("final"),
        &tmp.path().join("x"),
        false,
        true,
        false,
    )
    .unwrap_err();
    assert!(err.to_string().contains("nothing to merge"), "{err}");
    // LoRA's dropout masks and the checkpointed recompute included.
    assert_resumes_exactly_from_update_20(sd15_lora::run, &data, &run, tmp.path());
    assert_adapted_samples_are_the_merged_ones(&run, tmp.path(), Some("female"), 32);
}

/// Stable Diffusion 3.5 with LoRA on the tiny random pipeline of tests/fixtures/sd35-tiny
/// (tests/fixtures/sd35_tiny.py): captions embedded once by CLIP-L and CLIP-G (their states side
/// by side, T5's zero tokens after them, their pooled vectors), images encoded by the pipeline's
/// VAE (shift and scale), the rectified flow on the pipeline's shifted timesteps, the MMDiT
/// checkpointed per block. The loss falls, only the targeted layers change, the adapters are
/// PEFT's and diffusers' (`transformer.`-prefixed), `sigdiff export` writes the same, a resumed
/// run repeats the same updates, and samples of the adapted checkpoint are the merged model's.
#[test]
fn a_stable_diffusion_35_lora_run_trains_its_adapters_and_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let data = gender_captioned_dataset(tmp.path());
    let run = train_lora(sd35_lora::run, &data, &tmp.path().join("out"), 10);
    let targeted = [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "proj_out",
    ];
    assert_only_targets_changed(
        "tests/fixtures/sd35-tiny/transformer/diffusion_pytorch_model.safetensors",
        &run,
        // The last block's text queries feed only its text outputs, which it drops: no gradient
        // reaches them (diffusers' model has the same), so their adapters stay zero.
        (&targeted, &["transformer_blocks.1.attn.add_q_proj"]),
        false,
    );
    let load = |p: &Path| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let adapters = load(&run.join("final/lora/adapter_model.safetensors"));
    // Block 0: 8 joint-attention projections, its second attention's 4 (SD 3.5's dual block)
    // and 2 of `ff` (not `ff_context`: PEFT matches the name's last parts); the last block 7
    // (no `to_add_out`) and 2; `proj_out`; × (A, B).
    assert_eq!(adapters.len(), (14 + 9 + 1) * 2, "{:?}", adapters.keys());
    let file = run.join("final/lora/pytorch_lora_weights.safetensors");
    let diffusers = load(&file);
    assert_eq!(diffusers.len(), adapters.len());
    for (key, t) in &diffusers {
        let peft = format!(
            "base_model.model.{}",
            key.strip_prefix("transformer.").unwrap()
        );
        assert_eq!(max_abs_diff(t, &adapters[&peft]), 0.0, "{key}");
    }
    let header = python(
        "import sys, json\nfrom safetensors import safe_open\nm = safe_open(sys.argv[1], 'numpy').metadata()\nc = json.loads(m['lora_adapter_metadata'])\nprint(c['transformer.r'], c['transformer.lora_alpha'], m['format'])",
        &[&file],
    );
    assert_eq!(header.trim(), "4 4.0 pt");
    // The final weights are the pipeline's transformer: its config.json, every tensor.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("final/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["_class_name"], "SD3Transformer2DModel");
    use signal_diffusion_runtime::train::export::export;
    let merged = tmp.path().join("exported");
    export(&run.join("checkpoints/last"), &merged, false, true, false).unwrap();
    let weights = "diffusion_pytorch_model.safetensors";
    let (a, b) = (
        load(&merged.join(weights)),
        load(&run.join("final").join(weights)),
    );
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        assert_eq!(max_abs_diff(t, &b[k]), 0.0, "{k}");
    }
    assert_resumes_exactly_from_update_20(sd35_lora::run, &data, &run, tmp.path());
    assert_adapted_samples_are_the_merged_ones(&run, tmp.path(), Some("female"), 32);
}

/// Stable Diffusion 3.5 as the reference trains it: the whole tiny transformer fine-tuned with
/// 8-bit AdamW and per-block checkpointing. The loss falls; every weight moves but the last
/// block's text queries (no gradient reaches them: the block drops its text tokens), which stay
/// as loaded; `final/` is the transformer under diffusers' names; a resumed run (the 8-bit
/// moments from the checkpoint) repeats the same updates.
#[test]
fn a_stable_diffusion_35_full_fine_tune_trains_with_8bit_adamw_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = gender_captioned_dataset(tmp.path());
    let run = train_until_loss_falls(sd35_full::run, &data, &tmp.path().join("out"), 10, 0.85);
    let load = |p: &Path| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let base = load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sd35-tiny/transformer/diffusion_pytorch_model.safetensors"
    )));
    let trained = load(&run.join("final/diffusion_pytorch_model.safetensors"));
    let mut keys: Vec<&String> = base.keys().collect();
    keys.sort();
    assert_eq!(keys, {
        let mut k: Vec<&String> = trained.keys().collect();
        k.sort();
        k
    });
    for key in keys {
        let inert = key.starts_with("transformer_blocks.1.attn.add_q_proj.")
            || key.starts_with("transformer_blocks.1.attn.norm_added_q.")
            || key == "pos_embed.pos_embed";
        let same = max_abs_diff(&base[key], &trained[key]) == 0.0;
        assert_eq!(same, inert, "{key}: changed {}", !same);
    }
    assert_resumes_exactly_from_update_20(sd35_full::run, &data, &run, tmp.path());
}

/// The small image dataset of tests/common in `dir`/data, captioned "female" or "male".
fn gender_captioned_dataset(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data");
    write_dataset(&data);
    add_captions(&data, |row| {
        match row.split(',').nth(2) == Some("F") {
            true => "female",
            false => "male",
        }
        .to_string()
    });
    data
}

/// A 40-update LoRA run of `trainer` on `data` into `out`: the mean loss of the last `window`
/// updates must be below 0.85× that of the first. Returns the run directory.
fn train_lora(trainer: Trainer, data: &Path, out: &Path, window: usize) -> std::path::PathBuf {
    let run = train_until_loss_falls(trainer, data, out, window, 0.85);
    assert_eq!(series(&run, "train/loss").len(), 40);
    run
}

/// Resumed from `run`'s checkpoint at update 20 (the pretrained weights reloaded, the adapters
/// and their AdamW state from the checkpoint), the later losses are the uninterrupted run's.
fn assert_resumes_exactly_from_update_20(trainer: Trainer, data: &Path, run: &Path, tmp: &Path) {
    let resumed = tmp.join("resumed");
    let from = resumed.join("run/checkpoints/checkpoint-20");
    copy_dir(&run.join("checkpoints/checkpoint-20"), &from);
    train(
        trainer,
        &[("dataset.name", data.display().to_string())],
        &resumed,
        Some(from),
    );
    let after: Vec<(u64, f64)> = series(run, "train/loss")
        .into_iter()
        .filter(|(s, _)| *s > 20)
        .collect();
    assert_eq!(
        after,
        series(&resumed.join("run"), "train/loss"),
        "losses after resume"
    );
}

/// The merged weights of a LoRA `run` (`final/`) against the pretrained ones (`base`, under the
/// project root): the same keys; a tensor changed exactly when its layer is `targeted` (its
/// weight, and its bias with `biases`: `bias = "lora_only"`), unless the layer is `inert` (no
/// gradient reaches it by construction: it must stay as it was).
fn assert_only_targets_changed(
    base: &str,
    run: &Path,
    (targeted, inert): (&[&str], &[&str]),
    biases: bool,
) {
    let load = |p: &Path| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let base = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(base));
    let merged = load(&run.join("final/diffusion_pytorch_model.safetensors"));
    let mut keys: Vec<&String> = base.keys().collect();
    keys.sort();
    assert_eq!(keys, {
        let mut k: Vec<&String> = merged.keys().collect();
        k.sort();
        k
    });
    for key in keys {
        let (module, kind) = key.rsplit_once('.').unwrap();
        // PEFT's match: the module's name, or its last dotted parts.
        let trains = targeted
            .iter()
            .any(|t| module == *t || module.ends_with(&format!(".{t}")))
            && (kind == "weight" || biases)
            && !inert.contains(&module);
        let same = max_abs_diff(&base[key], &merged[key]) == 0.0;
        assert_eq!(same, !trains, "{key}: changed {}, targeted {trains}", !same);
    }
}

/// max |a − b| over every element.
fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .unwrap()
}

/// Samples of a LoRA `run`'s last checkpoint (adapters over the pretrained weights) and of its
/// merged final weights are the same images.
/// `caption`: what a caption model samples; `side`: the dataset's resolution, which the images
/// must have.
fn assert_adapted_samples_are_the_merged_ones(
    run: &Path,
    tmp: &Path,
    caption: Option<&str>,
    side: usize,
) {
    let images = |dir: &Path, name: &str| {
        let out = tmp.join(name);
        signal_diffusion_runtime::train::sample::run(&SampleOptions {
            caption: caption.map(String::from),
            ..three_samples(dir.to_path_buf(), out.clone())
        })
        .unwrap();
        (0..3)
            .map(|i| {
                let png = out.join(format!("train/synthetic/sample-{i:05}.png"));
                let (pixels, _, h, w) = signal_diffusion_runtime::data::io::read_png(&png).unwrap();
                assert_eq!((h, w), (side, side), "{}", png.display());
                pixels
            })
            .collect::<Vec<_>>()
    };
    let (adapted, plain) = (
        images(&run.join("checkpoints/last"), "adapted"),
        images(&run.join("final"), "merged"),
    );
    for (a, p) in adapted.iter().zip(&plain) {
        // The same numbers up to f32 summation order: a pixel may round the other way.
        let worst = a.iter().zip(p).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        assert!(
            worst <= 1,
            "merged and adapted samples differ by {worst} levels"
        );
    }
}

/// A DiT in the latent space of a tiny random VAE (runtime/tests/fixtures/vae/sd35-tiny, found
/// by the build beside the config): the images are encoded once into a cache beside the dataset
/// (mirror images too), each step draws latents from the cached distributions and the loss
/// falls, a resumed run repeats the same updates (same draws), a second run reuses the cache,
/// and `sigdiff sample` decodes images at the dataset's resolution.
#[test]
fn a_latent_dit_trains_on_cached_latents_resumes_exactly_and_samples_images() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    let sets = [("dataset.name", data.display().to_string())];
    // `sigdiff cache-latents` first: the trainer then finds every latent encoded.
    let overrides = [("dataset.name".to_string(), data.display().to_string())];
    let config = tiny_latent_dit::compiled().resolve(&overrides).unwrap();
    let signal_diffusion_runtime::config::Kind::Diffusion(d) = &config.kind else {
        panic!("a diffusion config")
    };
    signal_diffusion_runtime::train::diffusion::cache_latents(d).unwrap();
    let cached_at = |data: &std::path::Path| {
        let cache = std::fs::read_dir(data)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("latents-data-")
            })
            .unwrap();
        let train = std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("train-")
            })
            .unwrap();
        std::fs::metadata(train.join("shard-00000.f32"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let encoded = cached_at(&data);
    let out_a = tmp.path().join("a");
    train(tiny_latent_dit::run, &sets, &out_a, None);
    assert_eq!(
        cached_at(&data),
        encoded,
        "the trainer encoded the images again"
    );
    let run_a = only_run_dir(&out_a);
    let losses = series(&run_a, "train/loss");
    assert_eq!(losses.len(), 24);
    let mean = |s: &[(u64, f64)]| s.iter().map(|(_, v)| v).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&losses[..4]), mean(&losses[20..]));
    // The floor is high: the tiny VAE's latent distributions are wide (each draw carries
    // noise of variance ≈ 2.3 after scaling), so a fall of an eighth is learning (measured 0.83).
    assert!(
        last < 0.88 * first,
        "loss {first:.4} -> {last:.4}: {losses:?}"
    );
    // The validation loss (the same levels and noise at every evaluation, the first before
    // training) falls at every evaluation (measured 7.08, 6.33, 6.01, 5.78).
    let val = series(&run_a, "val/loss");
    assert_eq!(val.len(), 4);
    assert!(val.windows(2).all(|w| w[1].1 < w[0].1), "{val:?}");
    assert_eq!(series(&run_a, "eval/kid_mean").len(), 4);
    // One cache for this VAE and these settings, with both splits, beside the dataset.
    let caches: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("latents-data-")
        })
        .collect();
    assert_eq!(caches.len(), 1, "{caches:?}");
    let splits: Vec<String> = std::fs::read_dir(&caches[0])
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(splits.len(), 2, "{splits:?}");
    let split_dir = |name: &str| {
        let prefix = format!("{name}-");
        caches[0].join(splits.iter().find(|s| s.starts_with(&prefix)).unwrap())
    };
    let train_dir = split_dir("train");
    // Validation images are evaluated as they are: no mirror images.
    let val_shard = split_dir("val").join("shard-00000.f32");
    assert_eq!(
        std::fs::metadata(val_shard).unwrap().len(),
        16 * 2 * 16 * 8 * 8 * 4
    );
    let shard = train_dir.join("shard-00000.f32");
    // 64 images and their mirror images, each a 16×8×8 mean and log-variance in f32.
    assert_eq!(
        std::fs::metadata(&shard).unwrap().len(),
        64 * 2 * 2 * 16 * 8 * 8 * 4
    );
    let stamp = std::fs::metadata(&shard).unwrap().modified().unwrap();

    let out_b = tmp.path().join("b");
    copy_dir(
        &run_a.join("checkpoints/checkpoint-12"),
        &out_b.join("run/checkpoints/checkpoint-12"),
    );
    train(
        tiny_latent_dit::run,
        &sets,
        &out_b,
        Some(out_b.join("run/checkpoints/checkpoint-12")),
    );
    for tag in ["train/loss", "val/loss", "eval/kid_mean"] {
        let a: Vec<(u64, f64)> = series(&run_a, tag)
            .into_iter()
            .filter(|(s, _)| *s > 12)
            .collect();
        assert!(!a.is_empty());
        assert_eq!(a, series(&out_b.join("run"), tag), "{tag} after resume");
    }
    let reused = std::fs::metadata(&shard).unwrap().modified().unwrap();
    assert_eq!(stamp, reused, "the resumed run encoded the images again");

    let synthetic = tmp.path().join("synthetic");
    let shape = sampled_image_shape(run_a.join("final"), synthetic, "gender=F,health=PD,age=63");
    assert_eq!(
        shape,
        (1, 16, 16),
        "decoded db-only images at the resolution"
    );
}

/// Three samples of `checkpoint` under `condition` by `sigdiff sample` into `out`: the
/// (channels, height, width) of the last PNG.
fn sampled_image_shape(
    checkpoint: std::path::PathBuf,
    out: std::path::PathBuf,
    condition: &str,
) -> (usize, usize, usize) {
    signal_diffusion_runtime::train::sample::run(&SampleOptions {
        condition: Some(condition.into()),
        ..three_samples(checkpoint, out.clone())
    })
    .unwrap();
    let png = out.join("train/synthetic/sample-00002.png");
    let (_, channels, h, w) = signal_diffusion_runtime::data::io::read_png(&png).unwrap();
    (channels, h, w)
}

/// LocalMamba in the same latent space (the shape of localmamba-db-only): trained from the
/// latent cache, its validation loss falls at every evaluation, and `sigdiff sample` decodes
/// its samples into images at the dataset's resolution.
#[test]
fn a_latent_localmamba_trains_and_samples_images() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    let sets = [("dataset.name", data.display().to_string())];
    let out = tmp.path().join("lm");
    train(tiny_latent_localmamba::run, &sets, &out, None);
    let run = only_run_dir(&out);
    let val = series(&run, "val/loss");
    assert_eq!(val.len(), 4);
    assert!(val.windows(2).all(|w| w[1].1 < w[0].1), "{val:?}");
    let synthetic = tmp.path().join("synthetic");
    let shape = sampled_image_shape(run.join("final"), synthetic, "gender=M,health=H,age=40");
    assert_eq!(shape, (1, 16, 16));
}

/// Caption conditioning: a DiT trained on images captioned by their subject's gender (female:
/// a bright band at the top, male: at the bottom) draws, from `sigdiff sample --caption`, the
/// band of the caption it is given.
#[test]
fn a_caption_dit_draws_what_its_caption_says() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    // One word each: the tiny random text encoder tells "female" from "male" (cosine −0.06),
    // while in the reference's long captions one differing word moves its pooled state little
    // (cosine 0.98), which a real CLIP separates and 200 updates of this DiT do not.
    let caption = |female: bool| if female { "female" } else { "male" }.to_string();
    add_captions(&data, |row| caption(row.split(',').nth(2) == Some("F")));
    let run = train_dit(caption_dit::run, &data, &tmp.path().join("dit"), 30);
    // Mean of the top 8 rows minus the bottom 8 over 8 samples of each caption.
    let contrast = |female: bool| {
        let out = tmp.path().join(format!("synthetic-{female}"));
        signal_diffusion_runtime::train::sample::run(&SampleOptions {
            caption: Some(caption(female)),
            n: Some(8),
            batch_size: 8,
            seed: 4,
            ..SampleOptions::new(run.join("final/ema"), out.clone())
        })
        .unwrap();
        (0..8)
            .map(|i| {
                let png = out.join(format!("train/synthetic/sample-{i:05}.png"));
                let (px, c, h, w) = signal_diffusion_runtime::data::io::read_png(&png).unwrap();
                let mean = |rows: std::ops::Range<usize>| {
                    let n = rows.len() * w * c;
                    rows.flat_map(|y| px[y * w * c..(y + 1) * w * c].to_vec())
                        .map(f64::from)
                        .sum::<f64>()
                        / n as f64
                };
                mean(0..8) - mean(h - 8..h)
            })
            .sum::<f64>()
            / 8.0
    };
    // Metadata without captions (the test split's) is captioned as the reference captions its
    // subjects: one sample per row.
    let from_subjects = tmp.path().join("synthetic-subjects");
    signal_diffusion_runtime::train::sample::run(&SampleOptions {
        like: Some(data.join("test-metadata.csv")),
        ..SampleOptions::new(run.join("final/ema"), from_subjects.clone())
    })
    .unwrap();
    let meta = std::fs::read_to_string(from_subjects.join("train-metadata.csv")).unwrap();
    assert_eq!(meta.lines().count(), 17, "{meta}");
    let (female, male) = (contrast(true), contrast(false));
    println!("top − bottom contrast: female {female:.1}, male {male:.1}");
    // The real images' contrast is ±120 grey levels.
    assert!(
        female > 40.0 && male < -40.0,
        "female {female:.1}, male {male:.1}"
    );
}

/// The same 8 updates in f32, under bf16 autocast and under fp16 autocast with its loss scale
/// (overridden at run time): each loss and gradient norm follows the f32 run's within its
/// type's rounding (measured: bf16 2e-4, fp16 3e-5 of the loss), which the gradient norm could
/// not if the loss scale were left in the gradients (AdamW would hardly notice); only fp16 logs a
/// loss scale, and an fp16 run resumed from a checkpoint continues with the same losses and scale.
#[test]
fn mixed_precision_training_follows_the_f32_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    let run = |precision: &str| {
        let out = tmp.path().join(precision);
        let sets = [
            ("dataset.name", data.display().to_string()),
            ("training.eval_strategy", "none".to_string()),
            ("training.mixed_precision", precision.to_string()),
        ];
        train(tiny_dit::run, &sets, &out, None);
        only_run_dir(&out)
    };
    let (f32_run, bf16_run, fp16_run) = (run("no"), run("bf16"), run("fp16"));
    for (run, tolerance) in [(&bf16_run, 5e-3), (&fp16_run, 1e-3)] {
        for tag in ["train/loss", "train/grad_norm"] {
            let got = series(run, tag);
            let want = series(&f32_run, tag);
            assert_eq!(got.len(), 8, "{tag}");
            let worst = got
                .iter()
                .zip(&want)
                .map(|((_, a), (_, b))| (a - b).abs() / b)
                .fold(0f64, f64::max);
            eprintln!("{}: {tag} within {worst:.2e} of f32", run.display());
            // The gradient norm moves more than the loss: it is a sum over every product's
            // rounding.
            let tolerance = if tag == "train/loss" {
                tolerance
            } else {
                10.0 * tolerance
            };
            assert!(
                worst > 0.0 && worst < tolerance,
                "{} {tag}: {got:?} vs f32 {want:?}",
                run.display()
            );
        }
    }
    assert!(series(&f32_run, "train/loss_scale").is_empty());
    assert!(series(&bf16_run, "train/loss_scale").is_empty());
    let scales = series(&fp16_run, "train/loss_scale");
    assert_eq!(scales.len(), 8);
    assert!(
        scales.iter().all(|(_, s)| *s > 0.0 && *s <= 65536.0),
        "{scales:?}"
    );

    // fp16 resumes exactly: the loss scale and the skipped-update count are in state.json.
    let ckpt = fp16_run.join("checkpoints/checkpoint-3");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("state.json")).unwrap()).unwrap();
    assert!(state["loss_scaler"]["scale"].as_f64().is_some(), "{state}");
    let resumed = tmp.path().join("fp16-resumed");
    copy_dir(&ckpt, &resumed.join("run/checkpoints/checkpoint-3"));
    let sets = [
        ("dataset.name", data.display().to_string()),
        ("training.eval_strategy", "none".to_string()),
        ("training.mixed_precision", "fp16".to_string()),
    ];
    train(
        tiny_dit::run,
        &sets,
        &resumed,
        Some(resumed.join("run/checkpoints/checkpoint-3")),
    );
    for tag in ["train/loss", "train/loss_scale"] {
        let want: Vec<(u64, f64)> = series(&fp16_run, tag)
            .into_iter()
            .filter(|(s, _)| *s > 3)
            .collect();
        assert_eq!(
            series(&resumed.join("run"), tag),
            want,
            "{tag} after resume"
        );
    }
}

/// The augmentation loop: a DiT trained on the images, `sigdiff sample` conditioned like the
/// training rows, a classifier trained only on those samples, evaluated on the real test split.
#[test]
fn a_classifier_trained_on_generated_samples_recognises_real_images() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    let run = train_dit(augment_dit::run, &data, &tmp.path().join("dit"), 30);

    // 128 samples conditioned like the training rows (cycled), EMA weights.
    let synth = tmp.path().join("synthetic");
    signal_diffusion_runtime::train::sample::run(&SampleOptions {
        checkpoint: run.join("final/ema"),
        ema: false,
        n: Some(128),
        condition: None,
        like: Some(data.join("train-metadata.csv")),
        caption: None,
        out: synth.clone(),
        split: "train".into(),
        steps: None,
        cfg_scale: None,
        sampler: None,
        batch_size: 32,
        seed: 1,
        overwrite: false,
    })
    .unwrap();
    // The classifier validates on synthetic images and is tested on the real test split.
    std::fs::copy(
        data.join("test-metadata.csv"),
        synth.join("test-metadata.csv"),
    )
    .unwrap();
    copy_dir(&data.join("test"), &synth.join("test"));
    let cls_out = tmp.path().join("cls");
    train(
        classifier::run,
        &[
            ("dataset.name", synth.display().to_string()),
            ("dataset.val_split", "train".into()),
            (
                "training.metrics_summary_path",
                cls_out.join("summary.csv").display().to_string(),
            ),
        ],
        &cls_out,
        None,
    );
    let gender = test_metric(&cls_out, "last", "accuracy/gender");
    let health = test_metric(&cls_out, "last", "accuracy/health");
    // 16 real test images, chance 0.5.
    assert!(
        gender >= 0.8 && health >= 0.8,
        "real test accuracy: gender {gender}, health {health}"
    );
}

/// Tone frequencies (cycles per 128 samples) of the two classes of `write_series`: Welch bins 12
/// and 44 of 1..=64, in bands 1 and 5 of `fidelity::BANDS` = 8 (bins 9..=16 and 41..=48).
const TONES: [usize; 2] = [12, 44];

/// z-scored-like time series of 4 channels × 128 samples in the preprocessed layout (`.npy` of
/// (channels, samples) and `{split}-metadata.csv`): class k is a tone at `TONES[k]` with a random
/// phase per channel and amplitude ≈ 1.3, plus white noise of std 0.3.
fn write_series(dir: &Path) {
    let mut state = 9u64;
    let mut uniform = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    for (split, n) in [("train", 64), ("val", 16)] {
        let mut rows = String::from("file_name,split,class\n");
        for i in 0..n {
            let class = i % 2;
            let mut x = vec![0f32; 4 * 128];
            for ch in 0..4 {
                let phase = uniform() * std::f64::consts::TAU;
                let amp = 1.1 + 0.4 * uniform();
                for t in 0..128 {
                    let arg =
                        std::f64::consts::TAU * TONES[class] as f64 * t as f64 / 128.0 + phase;
                    let noise = (uniform() - 0.5) * 0.3 * 12f64.sqrt();
                    x[ch * 128 + t] = (amp * arg.sin() + noise) as f32;
                }
            }
            let rel = format!("{split}/sub-{i:02}/timeseries-0.npy");
            std::fs::create_dir_all(dir.join(&rel).parent().unwrap()).unwrap();
            signal_diffusion_runtime::data::io::write_npy_f32(&dir.join(&rel), &[4, 128], &x)
                .unwrap();
            rows.push_str(&format!("{rel},{split},{class}\n"));
        }
        std::fs::write(dir.join(format!("{split}-metadata.csv")), rows).unwrap();
    }
}

/// A `caption` column, `caption_of(row)`, appended to the train and val metadata in `dir`.
fn add_captions(dir: &Path, caption_of: impl Fn(&str) -> String) {
    for split in ["train", "val"] {
        let path = dir.join(format!("{split}-metadata.csv"));
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines = text.lines();
        let mut out = format!("{},caption\n", lines.next().unwrap());
        for line in lines {
            out.push_str(&format!("{line},{}\n", caption_of(line)));
        }
        std::fs::write(&path, out).unwrap();
    }
}

/// DiT on time series: (1, 4, 128) with 1 × 8 patches, class-conditional. The loss falls, the
/// evaluation writes the signals losslessly (`.npy`, read by numpy) and KID on signal features,
/// and `sigdiff sample` writes `.npy` samples whose spectrum peaks in their class's band.
#[test]
fn a_time_series_dit_generates_the_rhythm_of_its_class() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_series(&data);
    let run = train_dit(series_dit::run, &data, &tmp.path().join("dit"), 20);
    assert_eq!(series(&run, "eval/kid_mean").len(), 2);
    let shape = python(
        "import sys, numpy as np\nprint(np.load(sys.argv[1]).shape)",
        &[&run.join("samples/step-000200.npy")],
    );
    assert_eq!(shape.trim(), "(4, 1, 4, 128)");
    let synth = tmp.path().join("synthetic");
    samples_carry_the_rhythm_of_their_class(&run, &data, &synth, by_class);
    // A sampler that does not fit the flow path is refused, naming the ones that do.
    let err = signal_diffusion_runtime::train::sample::run(&SampleOptions {
        checkpoint: run.join("final/ema"),
        ema: false,
        n: Some(1),
        condition: Some("class=0".into()),
        like: None,
        caption: None,
        out: synth.join("ddim"),
        split: "train".into(),
        steps: None,
        cfg_scale: None,
        sampler: Some(Sampler::Ddim),
        batch_size: 1,
        seed: 2,
        overwrite: false,
    })
    .unwrap_err();
    assert!(err.to_string().contains("euler, heun or dpmpp_2m"), "{err}");
}

/// The hourglass transformer and LocalMamba on the same series: the loss falls, and `sigdiff
/// sample` draws each class's rhythm from the final EMA weights.
#[test]
fn the_hourglass_and_localmamba_generate_the_rhythm_of_each_class() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_series(&data);
    let trainers: [(&str, Trainer); 2] = [
        ("hourglass", series_hourglass::run),
        ("localmamba", series_localmamba::run),
    ];
    for (name, trainer) in trainers {
        let run = train_dit(trainer, &data, &tmp.path().join(name), 20);
        let weights = run.join(format!("final/ema/{name}_model.safetensors"));
        assert!(weights.exists(), "{}", weights.display());
        let synth = tmp.path().join(format!("{name}-synthetic"));
        samples_carry_the_rhythm_of_their_class(&run, &data, &synth, by_class);
    }
}

/// `sigdiff sample`'s condition for class k: `--condition class=k`.
fn by_class(class: usize) -> (Option<String>, Option<String>) {
    (Some(format!("class={class}")), None)
}

/// The caption of the recordings of class k (`write_series`): "low tone" or "high tone".
fn tone_caption(class: usize) -> (Option<String>, Option<String>) {
    (None, Some(["low tone", "high tone"][class].to_string()))
}

/// Caption conditioning of the hourglass-shaped models: trained on recordings captioned after
/// their tone (the tiny text encoder's pooled embeddings of the two captions: cosine 0.39),
/// they draw, from `sigdiff sample --caption`, the tone their caption names.
#[test]
fn the_hourglass_and_localmamba_generate_the_tone_their_caption_names() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_series(&data);
    add_captions(&data, |row| {
        let class: usize = row.rsplit(',').next().unwrap().parse().unwrap();
        tone_caption(class).1.unwrap()
    });
    let trainers: [(&str, Trainer); 2] = [
        ("hourglass", caption_hourglass::run),
        ("localmamba", caption_localmamba::run),
    ];
    for (name, trainer) in trainers {
        let run = train_dit(trainer, &data, &tmp.path().join(name), 20);
        let synth = tmp.path().join(format!("{name}-synthetic"));
        samples_carry_the_rhythm_of_their_class(&run, &data, &synth, tone_caption);
    }
}

/// `sigdiff sample` from the final EMA weights of `run`, each class (conditioned as
/// `condition_of` says: `--condition`, `--caption`) with the trained sampler (flow Euler) and
/// with DPM-Solver++ 2M: the samples' contrast between the two classes' bands is at least half
/// the real data's.
fn samples_carry_the_rhythm_of_their_class(
    run: &Path,
    data: &Path,
    synth: &Path,
    condition_of: fn(usize) -> (Option<String>, Option<String>),
) {
    for (class, sampler) in (0..2).flat_map(|c| [(c, None), (c, Some(Sampler::DpmPP2M))]) {
        let out = synth.join(format!("class-{class}-{sampler:?}"));
        let (condition, caption) = condition_of(class);
        signal_diffusion_runtime::train::sample::run(&SampleOptions {
            checkpoint: run.join("final/ema"),
            ema: false,
            n: Some(16),
            condition,
            like: None,
            caption,
            out: out.clone(),
            split: "train".into(),
            steps: None,
            cfg_scale: None,
            sampler,
            batch_size: 16,
            seed: 2,
            overwrite: false,
        })
        .unwrap();
        let meta = std::fs::read_to_string(out.join("train-metadata.csv")).unwrap();
        assert_eq!(meta.lines().count(), 17, "{meta}");
        let files: Vec<_> = (0..16)
            .map(|i| out.join(format!("train/synthetic/sample-{i:05}.npy")))
            .collect();
        let generated = band_contrast(&files, class);
        let real_files: Vec<_> = (0..8)
            .map(|i| data.join(format!("val/sub-{:02}/timeseries-0.npy", 2 * i + class)))
            .collect();
        let real = band_contrast(&real_files, class);
        assert!(
            generated > 0.5 * real,
            "class {class}, sampler {sampler:?}: its band is {generated:.2} decades above the other class's band in the samples, {real:.2} in the real data"
        );
    }
}

/// Mean over files and channels of log10 band power in `class`'s tone band minus that in the
/// other class's band (Welch features of `fidelity`).
fn band_contrast(files: &[std::path::PathBuf], class: usize) -> f64 {
    let mut sum = 0f64;
    for file in files {
        let (dims, x) = signal_diffusion_runtime::data::io::read_npy_f32(file).unwrap();
        assert_eq!(dims, [4, 128], "{}", file.display());
        let f = signal_diffusion_runtime::diffusion::fidelity::signal_features(&x, 4, 128);
        for ch in 0..4 {
            // The band of class k's tone, on channel ch.
            let band = |k: usize| f[ch * (BANDS + 1) + (TONES[k] - 1) * BANDS / 64] as f64;
            sum += band(class) - band(1 - class);
        }
    }
    sum / (4 * files.len()) as f64
}
