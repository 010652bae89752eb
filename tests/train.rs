//! End-to-end training through a macro-compiled trainer on a small image dataset the test writes:
//! the model must learn (accuracy above chance, loss down), resume bit-exactly, and write files
//! that Python's TensorBoard and safetensors read.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use crate::common::{
    copy_dir, only_run_dir, python, series, test_metric, train, wandb_inspect, wandb_runs,
    write_dataset, write_parquet_copy,
};

use signal_diffusion_runtime::train::checkpoint::{check_config, State};
use signal_diffusion_runtime::train::RunOptions;

mod tiny {
    signal_diffusion_macros::trainer!("train/tiny.toml");
}

mod tiny_cnn {
    signal_diffusion_macros::trainer!("train/tiny_cnn.toml");
}

mod tiny_series {
    signal_diffusion_macros::trainer!("train/tiny_series.toml");
}

mod tiny_swa {
    signal_diffusion_macros::trainer!("train/tiny_swa.toml");
}

mod tiny_transformer {
    signal_diffusion_macros::trainer!("train/tiny_transformer.toml");
}

fn run(data: &Path, out: &Path, extra: &[(&str, &str)], resume: Option<PathBuf>) {
    run_with(tiny::run, data, out, extra, resume)
}

fn run_with(
    trainer: fn(RunOptions) -> ExitCode,
    data: &Path,
    out: &Path,
    extra: &[(&str, &str)],
    resume: Option<PathBuf>,
) {
    let mut sets = vec![
        ("dataset.name".to_string(), data.display().to_string()),
        (
            "training.metrics_summary_path".to_string(),
            out.join("summary.csv").display().to_string(),
        ),
    ];
    sets.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let sets: Vec<(&str, String)> = sets.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    train(trainer, &sets, out, resume);
}

#[test]
fn trains_above_chance_resumes_exactly_and_writes_readable_files() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);

    // 1. A full run: 10 epochs × 8 batches = 80 steps.
    let out_a = tmp.path().join("a");
    run(&data, &out_a, &[], None);
    let run_a = only_run_dir(&out_a);
    let loss = series(&run_a, "train/loss");
    let (first, last) = (loss.first().unwrap().1, loss.last().unwrap().1);
    assert!(
        last < 0.5 * first,
        "training loss did not fall: {first} -> {last}"
    );
    // Chance is 0.5 for both binary tasks; the held-out split is 16 images.
    for task in ["gender", "health"] {
        let acc = test_metric(&out_a, "best", &format!("accuracy/{task}"));
        assert!(acc >= 0.9, "held-out {task} accuracy {acc} (chance 0.5)");
    }
    let mae = test_metric(&out_a, "last", "mae/age");
    assert!(mae < 20.0, "held-out age MAE {mae}");

    // 2. Resume from the step-24 checkpoint in a fresh directory: the losses of steps 25..80
    //    equal the uninterrupted run's bit for bit.
    let out_b = tmp.path().join("b");
    let ck = out_b.join("run/checkpoints/step-00000024");
    copy_dir(&run_a.join("checkpoints/step-00000024"), &ck);
    run(&data, &out_b, &[], Some(ck));
    let a: Vec<(u64, f64)> = series(&run_a, "train/loss_step")
        .into_iter()
        .filter(|(s, _)| *s > 24)
        .collect();
    let b = series(&out_b.join("run"), "train/loss_step");
    assert_eq!(a.len(), 56);
    assert_eq!(a, b, "resumed losses differ from the uninterrupted run");

    //    From the step-20 checkpoint, in the middle of epoch 3 (batch 4 of 8): the same.
    let out_c = tmp.path().join("c");
    let mid = out_c.join("run/checkpoints/step-00000020");
    copy_dir(&run_a.join("checkpoints/step-00000020"), &mid);
    run(&data, &out_c, &[], Some(mid.clone()));
    let a: Vec<(u64, f64)> = series(&run_a, "train/loss_step")
        .into_iter()
        .filter(|(s, _)| *s > 20)
        .collect();
    assert_eq!(a.len(), 60);
    assert_eq!(
        a,
        series(&out_c.join("run"), "train/loss_step"),
        "resumed mid-epoch"
    );

    //    A trainer of another model refuses the checkpoint, naming what differs; other keys
    //    (here the dataset path, which the test sets) only differ.
    let state: State =
        serde_json::from_str(&std::fs::read_to_string(mid.join("state.json")).unwrap()).unwrap();
    // The macro's project root is the directory of the file that invokes it.
    let root = &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let err = check_config(&tiny_cnn::config(root), &state, &mid)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`model.backbone` = \"cnn\" (the checkpoint's: \"cnn_light\")"),
        "{err}"
    );
    check_config(&tiny::config(root), &state, &mid).unwrap();
    let refused = tiny_cnn::run(RunOptions {
        sets: vec![("dataset.name".into(), data.display().to_string())],
        output_dir: Some(tmp.path().join("d")),
        resume: Some(mid),
        ..Default::default()
    });
    assert_eq!(format!("{refused:?}"), format!("{:?}", ExitCode::FAILURE));

    // 3. TensorBoard reads the event file; Python's safetensors reads the weights.
    let tb = python(
        "import sys\nfrom tensorboard.backend.event_processing.event_accumulator import EventAccumulator as E\n\
         e=E(sys.argv[1]); e.Reload(); s=e.Scalars('train/loss'); c=e.Tensors('config')[0].tensor_proto\n\
         from tensorboard.plugins.hparams import plugin_data_pb2 as P\n\
         h=e.PluginTagToContent('hparams'); start=P.HParamsPluginData.FromString(h['_hparams_/session_start_info']).session_start_info\n\
         end=P.HParamsPluginData.FromString(h['_hparams_/session_end_info']).session_end_info\n\
         print(len(s), s[-1].step, len(e.Scalars('val/accuracy/gender')), int(b'\"backbone\": \"cnn_light\"' in c.string_val[0]),\n\
               int(start.hparams['run.optimizer.learning_rate'].number_value * 1000), end.status)",
        &[&run_a.join("tensorboard")],
    );
    let f: Vec<u64> = tb.split_whitespace().map(|x| x.parse().unwrap()).collect();
    // Then: the resolved config in the Text tab; the hparams session (learning rate 0.01 × 1000,
    // status 1 = success) that the HParams tab compares runs by.
    assert_eq!(f, vec![40, 80, 10, 1, 10, 1], "tensorboard saw: {tb}");
    let st = python(
        "import sys\nfrom safetensors.numpy import load_file\nd=load_file(sys.argv[1]); print(d['backbone.input_conv.0.weight'].shape, d['heads.gender.net.2.weight'].shape, len(d))",
        &[&run_a.join("checkpoints/last/model.safetensors")],
    );
    assert_eq!(
        st.trim(),
        "(4, 1, 5, 5) (2, 32) 24",
        "safetensors saw: {st}"
    );
}

#[test]
fn structural_overrides_are_refused_and_scalars_accepted() {
    let exe = env!("CARGO_BIN_EXE_train");
    let out = Command::new(exe)
        .args(["--set", "dataset.batch_size=4", "--print-config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`dataset.batch_size` is structural") && err.contains("rebuild"),
        "{err}"
    );

    let out = Command::new(exe)
        .args(["--set", "optimizer.learning_rate=0.5", "--print-config"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cfg["run"]["optimizer"]["learning_rate"], 0.5);

    let out = Command::new(exe)
        .args(["--set", "optimizer.learning_rate=fast", "--print-config"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("--set optimizer.learning_rate:1:1")
            && err.contains("must be a finite number"),
        "{err}"
    );

    let out = Command::new(exe).arg("--plan").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("total parameters"));
}

#[test]
fn residual_cnn_and_transformer_learn_the_task() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    for (name, trainer) in [
        ("cnn", tiny_cnn::run as fn(RunOptions) -> ExitCode),
        ("transformer", tiny_transformer::run),
    ] {
        let out = tmp.path().join(name);
        run_with(trainer, &data, &out, &[], None);
        for task in ["gender", "health"] {
            let acc = test_metric(&out, "best", &format!("accuracy/{task}"));
            assert!(
                acc >= 0.9,
                "{name}: held-out {task} accuracy {acc} (chance 0.5)"
            );
        }
    }
}

#[test]
fn swa_averages_the_extra_epochs_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    // 6 epochs + max(1, 6 × 0.5) = 3 SWA epochs, 8 batches each: 72 steps; SWA from step 48.
    let out_a = tmp.path().join("a");
    run_with(tiny_swa::run, &data, &out_a, &[], None);
    let run_a = only_run_dir(&out_a);
    assert_eq!(series(&run_a, "train/loss_step").len(), 72);
    for task in ["gender", "health"] {
        let acc = test_metric(&out_a, "swa", &format!("accuracy/{task}"));
        assert!(acc >= 0.9, "SWA model: held-out {task} accuracy {acc}");
    }
    // The learning rate anneals to learning_rate × swa_lr_frac = 0.005 in the SWA phase.
    let lr = series(&run_a, "train/lr");
    assert!((lr.last().unwrap().1 - 0.005).abs() < 1e-12, "{lr:?}");

    // Resume inside the SWA phase (step 64: the average holds the snapshot of step 56): training
    // losses and the evaluations of the averaged model equal the uninterrupted run's.
    let out_b = tmp.path().join("b");
    let ck = out_b.join("run/checkpoints/step-00000064");
    std::fs::create_dir_all(&ck).unwrap();
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "swa.safetensors",
        "state.json",
    ] {
        std::fs::copy(run_a.join("checkpoints/step-00000064").join(f), ck.join(f)).unwrap();
    }
    run_with(tiny_swa::run, &data, &out_b, &[], Some(ck));
    let after = |run: &Path, tag: &str| -> Vec<(u64, f64)> {
        series(run, tag)
            .into_iter()
            .filter(|(s, _)| *s > 64)
            .collect()
    };
    for tag in ["train/loss_step", "val/loss", "val/accuracy/gender"] {
        let a = after(&run_a, tag);
        assert!(!a.is_empty(), "{tag}");
        assert_eq!(a, after(&out_b.join("run"), tag), "{tag} after resume");
    }
}

#[test]
fn a_parquet_meta_dataset_trains_exactly_like_its_image_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (folder, parquet) = (tmp.path().join("folder"), tmp.path().join("parquet"));
    write_dataset(&folder);
    write_parquet_copy(&folder, &parquet, "image");
    let steps = [("training.max_steps", "16")];
    run(&folder, &tmp.path().join("a"), &steps, None);
    run(&parquet, &tmp.path().join("b"), &steps, None);
    let a = series(&only_run_dir(&tmp.path().join("a")), "train/loss_step");
    let b = series(&only_run_dir(&tmp.path().join("b")), "train/loss_step");
    assert_eq!(a.len(), 16);
    // Grey replicated to RGB and back (PIL's luma of equal channels) is the same pixel: the
    // same batches, the same losses, bit for bit.
    assert_eq!(a, b, "the Parquet copy trains differently");
    let val_a = series(&only_run_dir(&tmp.path().join("a")), "val/loss");
    let val_b = series(&only_run_dir(&tmp.path().join("b")), "val/loss");
    assert!(!val_a.is_empty());
    assert_eq!(val_a, val_b, "the `validation` table is the val split");
}

/// `use_amp` (bf16 autocast, overridden at run time): 16 steps of the cnn_light follow the f32
/// run's losses within bf16's rounding (measured 6e-4, asserted below 1e-2), and differ from
/// them (the products really ran rounded).
#[test]
fn use_amp_follows_the_f32_losses_within_bf16_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    let losses = |amp: &str| {
        let out = tmp.path().join(amp);
        run(
            &data,
            &out,
            &[("training.max_steps", "16"), ("training.use_amp", amp)],
            None,
        );
        series(&only_run_dir(&out), "train/loss_step")
    };
    let (f32_losses, bf16_losses) = (losses("false"), losses("true"));
    assert_eq!(bf16_losses.len(), 16);
    let worst = bf16_losses
        .iter()
        .zip(&f32_losses)
        .map(|((_, a), (_, b))| (a - b).abs() / b)
        .fold(0f64, f64::max);
    eprintln!("use_amp: losses within {worst:.2e} of f32");
    assert!(
        worst > 0.0 && worst < 1e-2,
        "bf16 {bf16_losses:?} vs f32 {f32_losses:?}"
    );
}

/// Time series from Parquet, as the reference's time-series meta-dataset stores them (a `signal`
/// column of (channels, samples) float lists, written here by pyarrow): the reader returns
/// numpy's values exactly, and cnn_1d learns which of two rhythms (12 or 44 cycles per window,
/// random phase per channel, noise) the channels carry, on held-out rows.
#[test]
fn cnn_1d_learns_time_series_from_parquet_signal_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    python(
        "import sys, numpy as np, pyarrow as pa, pyarrow.parquet as pq\n\
         rng = np.random.default_rng(0); t = np.arange(128)\n\
         for split, n in [('train', 64), ('validation', 16), ('test', 16)]:\n\
         \x20   sig = []\n\
         \x20   for i in range(n):\n\
         \x20       ph = rng.uniform(0, 2 * np.pi, (4, 1))\n\
         \x20       x = 1.3 * np.sin(2 * np.pi * [12, 44][i % 2] * t / 128 + ph) + 0.3 * rng.standard_normal((4, 128))\n\
         \x20       sig.append(x.astype(np.float32))\n\
         \x20   if split == 'test': np.save(sys.argv[1] + '/test-row-3.npy', sig[3])\n\
         \x20   col = pa.array([s.tolist() for s in sig], type=pa.list_(pa.list_(pa.float32())))\n\
         \x20   pq.write_table(pa.table({'signal': col, 'class': [i % 2 for i in range(n)], 'split': [split] * n}), f'{sys.argv[1]}/{split}.parquet')",
        &[&data],
    );
    let split =
        signal_diffusion_runtime::data::loader::read_split(&data, "test", &[], None).unwrap();
    let (dims, want) =
        signal_diffusion_runtime::data::io::read_npy_f32(&data.join("test-row-3.npy")).unwrap();
    assert_eq!(dims, [4, 128]);
    let mut got = vec![];
    split.load(3, &[4, 128], 0, &mut got).unwrap();
    assert_eq!(got, want, "row 3 of the test split");

    let out = tmp.path().join("out");
    run_with(
        tiny_series::run,
        &data,
        &out,
        &[("dataset.val_split", "val")],
        None,
    );
    let acc = test_metric(&out, "best", "accuracy/tone");
    assert!(acc >= 0.9, "held-out tone accuracy {acc} (chance 0.5)");
}

/// Nothing at run time depends on where the build ran: the embedded config's relative paths
/// resolve against the project root the binary finds (the build's checkout when it exists, else
/// the current directory), so a trainer copied to another machine still resolves its config.
#[test]
fn a_trainer_resolves_its_config_against_the_root_it_finds() {
    // tests/train/tiny.toml -> ../../config/default.toml -> data.output_root = "../data/processed",
    // so the output root is the parent of the project root, then data/processed.
    let elsewhere = tempfile::tempdir().unwrap();
    let root = elsewhere.path().join("checkout");
    std::fs::create_dir(&root).unwrap();
    let mut compiled = tiny::compiled();
    compiled.project_root = Box::leak(root.display().to_string().into_boxed_str());
    let resolved = compiled.resolve(&[]).expect("the compiled config");
    assert_eq!(
        resolved.settings.output_root,
        elsewhere.path().join("data/processed")
    );
    // With an override the embedded TOML is resolved again, against the same root.
    let set = [("training.epochs".to_string(), "1".to_string())];
    let reresolved = compiled
        .resolve(&set)
        .expect("the embedded config resolves");
    assert_eq!(
        reresolved.settings.output_root,
        resolved.settings.output_root
    );

    compiled.project_root = "/nonexistent/signal-diffusion-build";
    let resolved = compiled.resolve(&[]).expect("the compiled config");
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(
        resolved.settings.output_root,
        cwd.parent().unwrap().join("data/processed")
    );
}

/// A dataset directory that is not there is an error that says where it looked and how to fix it.
#[test]
fn a_missing_dataset_names_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(["--set", "dataset.name=no/such/dataset"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let looked = dir.path().join("no/such/dataset");
    assert!(
        err.contains(&format!("no dataset directory at {}", looked.display()))
            && err.contains("--set dataset.name="),
        "{err}"
    );
}

/// A dataset whose `layout.json` says its pixels are another kind than the config trains on is
/// refused at start, naming the record and the keys (three-channel images all load alike).
#[test]
fn a_dataset_of_another_image_kind_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("polar");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("layout.json"),
        r#"{"output_type": "db-polar", "polar_layout": "magnitude-phase"}"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(["--set", &format!("dataset.name={}", data.display())])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("layout.json: this dataset holds db-polar images in the `magnitude-phase` layout, but the config (`data.output_type`, `data.polar_layout`) says db-only images"),
        "{err}"
    );
}

mod mit_seizure {
    signal_diffusion_macros::trainer!("train/mit_seizure.toml");
}

/// CHB-MIT end to end: a synthetic tree of 20 cases in PhysioNet's layout, `sigdiff preprocess
/// mit` (256 Hz resampled, montage by name, seizure labels from the summaries), and a cnn_light
/// with balanced class weights that tells seizure windows from background on held-out subjects
/// well above the majority class's rate.
#[test]
fn a_cnn_light_learns_chb_mit_seizures_on_held_out_subjects() {
    use signal_diffusion_runtime::data::signal::preprocess::{
        run as preprocess, PreprocessOptions,
    };
    let tmp = tempfile::tempdir().unwrap();
    signal_diffusion_runtime::data::signal::synth::chbmit::write_tree(
        &tmp.path().join("raw/chbmit"),
        20,
        120,
    )
    .unwrap();
    let settings_path = tmp.path().join("settings.toml");
    std::fs::write(
        &settings_path,
        "[data]\nroot = \"raw\"\noutput_root = \"out\"\n\n[datasets.mit]\nroot = \"chbmit\"\noutput = \"mit\"\nmin_db = -127.028\nmax_db = -44.068\n",
    )
    .unwrap();
    let settings = signal_diffusion_runtime::config::load_settings(
        Some(&settings_path),
        &signal_diffusion_runtime::config::settings::Env::isolated(tmp.path().to_path_buf()),
    )
    .unwrap();
    let summary = preprocess(
        &PreprocessOptions {
            datasets: vec!["mit".into()],
            output_type: None,
            polar_layout: None,
            timeseries: false,
            include_math_trials: false,
            jobs: 2,
            overwrite: false,
            seed: 1,
        },
        &settings,
    )
    .unwrap();
    assert_eq!(summary.windows, 20 * 13);
    assert!(
        summary.seizure > 40 && summary.background > 150,
        "{summary:?}"
    );

    let data = tmp.path().join("out/mit");
    let test_rows = std::fs::read_to_string(data.join("test-metadata.csv")).unwrap();
    let labels: Vec<&str> = test_rows
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(6).unwrap())
        .collect();
    let seizures = labels.iter().filter(|l| **l == "1").count();
    let majority = seizures.max(labels.len() - seizures) as f64 / labels.len() as f64;
    let out = tmp.path().join("run");
    run_with(mit_seizure::run, &data, &out, &[], None);
    let accuracy = test_metric(&out, "best", "accuracy/seizure");
    assert!(
        accuracy >= 0.9 && accuracy > majority,
        "held-out seizure accuracy {accuracy} (majority class {majority:.2} of {} windows)",
        labels.len()
    );
}

/// `training.mlflow` (run-time): an MLflow file store beside the run directories that MLflow
/// itself reads (`MlflowClient`, mlflow-skinny): one experiment named after the config, the run
/// finished, the resolved config as params, every logged point of a metric, the plan and
/// resolved config as artifacts; resumed in the same run directory, the same run continues.
#[test]
fn mlflow_reads_the_run_store_we_write() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    let out = tmp.path().join("out");
    let on = [("training.mlflow", "true"), ("training.epochs", "2")];
    run(&data, &out, &on, None);
    let run_dir = only_run_dir(&out);
    let steps = series(&run_dir, "train/loss_step").len();
    assert_eq!(steps, 16);
    // Resumed in the same run directory: the same MLflow run, its steps after 8 logged again.
    let ck = run_dir.join("checkpoints/step-00000008");
    run(&data, &out, &on, Some(ck));
    let script = "import os, sys\nos.environ['MLFLOW_ALLOW_FILE_STORE'] = 'true'\n\
        from mlflow.tracking import MlflowClient\n\
        c = MlflowClient('file:' + sys.argv[1])\n\
        exps = c.search_experiments()\n\
        runs = c.search_runs([e.experiment_id for e in exps])\n\
        r = runs[0]\n\
        h = c.get_metric_history(r.info.run_id, 'train/loss_step')\n\
        arts = sorted(a.path for a in c.list_artifacts(r.info.run_id))\n\
        print([e.name for e in exps], len(runs), r.info.status, r.data.tags['mlflow.runName'] == os.path.basename(sys.argv[2]))\n\
        print(r.data.params['run.optimizer.learning_rate'], r.data.params['run.dataset.tasks'], len(h), sorted({m.step for m in h}) == list(range(1, 17)))\n\
        print(arts, 'val/accuracy.gender' in r.data.metrics)";
    let got = python(script, &[&out.join("mlruns"), &run_dir]);
    assert_eq!(
        got.trim(),
        "['tiny'] 1 FINISHED True\n0.01 [\"gender\",\"health\",\"age\"] 24 True\n['config_resolved.json', 'plan.txt'] True",
        "MLflow saw: {got}"
    );
    // `mlflow migrate-filestore` converts the store to MLflow's database losslessly: the same
    // run, params and metric points read back from SQLite.
    let db = tmp.path().join("mlflow.db");
    let script = "import os, sys, subprocess\nos.environ['MLFLOW_ALLOW_FILE_STORE'] = 'true'\n\
        subprocess.run([sys.executable, '-m', 'mlflow', 'migrate-filestore', '--source', sys.argv[1], '--target', 'sqlite:///' + sys.argv[2], '--no-progress'], check=True, capture_output=True)\n\
        from mlflow.tracking import MlflowClient\n\
        c = MlflowClient('sqlite:///' + sys.argv[2])\n\
        r = c.search_runs([e.experiment_id for e in c.search_experiments() if e.name == 'tiny'])[0]\n\
        print(r.info.status, r.data.params['run.optimizer.learning_rate'], len(c.get_metric_history(r.info.run_id, 'train/loss_step')), len(r.data.params) > 50)";
    let migrated = python(script, &[&out.join("mlruns"), &db]);
    assert_eq!(
        migrated.trim(),
        "FINISHED 0.01 24 True",
        "migrated: {migrated}"
    );
}

/// `training.wandb_*` (run-time): a W&B offline run that wandb's own reader (`wandb leet
/// inspect`, wandb 0.31, the reader `wandb sync` uses) reads back: finished, with the project,
/// entity, tags, name and resolved config, one history row per step, the summary with the best
/// selection score; histograms there and in TensorBoard; over 32 KiB of records; a flipped
/// byte is reported; a resume in the same run directory keeps the run id.
#[test]
fn wandb_reads_the_offline_run_we_write() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    let out = tmp.path().join("out");
    let on = [
        ("training.wandb_project", "eeg"),
        ("training.wandb_entity", "lab"),
        ("training.wandb_tags", "[\"pilot\", \"cnn\"]"),
        ("training.histogram_every_batches", "4"),
        ("training.tensorboard", "true"),
        ("training.epochs", "2"),
    ];
    run(&data, &out, &on, None);
    let run_dir = only_run_dir(&out);
    let runs = wandb_runs(&run_dir);
    assert_eq!(runs.len(), 1, "{runs:?}");
    let (summary, _) = wandb_inspect(&runs[0], true);
    let s = &summary[0];
    let run_name = run_dir.file_name().unwrap().to_str().unwrap();
    assert_eq!(
        (&s["state"], &s["exit_code"], &s["project"], &s["entity"]),
        (&"finished".into(), &0.into(), &"eeg".into(), &"lab".into()),
        "{s}"
    );
    assert_eq!(s["tags"], serde_json::json!(["pilot", "cnn"]));
    assert_eq!(s["name"], run_name);
    assert_eq!(s["config"]["run"]["optimizer"]["learning_rate"], 0.01);
    // The summary: each key's latest value, and the best validation selection score.
    let scores = series(&run_dir, "val/selection_score");
    let best = scores.iter().map(|(_, v)| *v).fold(f64::MIN, f64::max);
    assert_eq!(s["summary"]["best/selection_score"], best);
    assert_eq!(
        s["summary"]["val/selection_score"],
        scores.last().unwrap().1
    );
    assert_eq!(s["summary"]["_step"], 16);

    // Every record, numbered 1, 2, ... with none skipped; one history row per step, each
    // with every value logged at that step.
    let wandb_file = runs[0].join(format!("run-{}.wandb", s["run_id"].as_str().unwrap()));
    let size = std::fs::metadata(&wandb_file).unwrap().len();
    assert!(
        size > 32 * 1024,
        "{size} bytes: the test should span blocks"
    );
    let (records, stderr) = wandb_inspect(&wandb_file, false);
    assert!(!stderr.contains("corrupt"), "{stderr}");
    let nums: Vec<u64> = records.iter().map(|r| r["num"].as_u64().unwrap()).collect();
    assert_eq!(nums, (1..=records.len() as u64).collect::<Vec<_>>());
    let rows: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["type"] == "history")
        .map(|r| &r["history"]["item"])
        .collect();
    let steps: Vec<u64> = rows.iter().map(|r| r["_step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=16).collect::<Vec<_>>());
    let losses: Vec<f64> = rows
        .iter()
        .map(|r| r["train/loss_step"].as_f64().unwrap())
        .collect();
    let want: Vec<f64> = series(&run_dir, "train/loss_step")
        .iter()
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(losses, want);
    assert_eq!(rows[7]["val/selection_score"], scores[0].1);
    // Histograms every 4 steps: one of every parameter, and one of the gradients' per-tensor
    // norms that counts one norm per parameter with a gradient.
    for (i, row) in rows.iter().enumerate() {
        let map = row.as_object().unwrap();
        let params = map.keys().filter(|k| k.starts_with("parameters/")).count();
        if (i + 1) % 4 != 0 {
            assert_eq!(params, 0, "step {}", i + 1);
            continue;
        }
        let norm = &row["gradients/norm"];
        assert_eq!(norm["_type"], "histogram");
        let counted: f64 = norm["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert_eq!(norm["bins"].as_array().unwrap().len(), 65);
        assert!(
            params > 20 && counted == params as f64,
            "{params} parameters, {counted} norms"
        );
    }

    // TensorBoard draws the same histograms.
    let tb = python(
        "import sys\nfrom tensorboard.backend.event_processing.event_accumulator import EventAccumulator as E\n\
         e=E(sys.argv[1], size_guidance={'histograms': 0}); e.Reload(); h=e.Histograms('gradients/norm')\n\
         print([x.step for x in h], len(e.Tags()['histograms']) > 40, h[0].histogram_value.num)",
        &[&run_dir.join("tensorboard")],
    );
    let params = rows[3]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("parameters/"))
        .count();
    assert_eq!(
        tb.trim(),
        format!("[4, 8, 12, 16] True {params}.0"),
        "tensorboard saw: {tb}"
    );

    // One flipped byte: wandb's reader reports the checksum mismatch.
    let mut bytes = std::fs::read(&wandb_file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    let corrupt = tmp.path().join("corrupt.wandb");
    std::fs::write(&corrupt, bytes).unwrap();
    let (_, stderr) = wandb_inspect(&corrupt, false);
    assert!(stderr.contains("checksum mismatch"), "{stderr}");

    // Resumed from step 8 in the same run directory: a second offline directory of the same
    // run id, marked resumed, with steps 9..16 after step 8's evaluation (the checkpoint was
    // written before the end-of-epoch evaluation, which the resumed run repeats).
    run(
        &data,
        &out,
        &on,
        Some(run_dir.join("checkpoints/step-00000008")),
    );
    let runs = wandb_runs(&run_dir);
    assert_eq!(runs.len(), 2, "{runs:?}");
    let id = s["run_id"].as_str().unwrap();
    assert!(
        runs.iter()
            .all(|r| r.to_str().unwrap().ends_with(&format!("-{id}"))),
        "{runs:?}"
    );
    let (records, _) = wandb_inspect(&runs[1], false);
    let run_record = records.iter().find(|r| r["type"] == "run").unwrap();
    assert_eq!(run_record["run"]["resume"], true);
    let rows: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["type"] == "history")
        .map(|r| &r["history"]["item"])
        .collect();
    let steps: Vec<u64> = rows.iter().map(|r| r["_step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (8..=16).collect::<Vec<_>>());
    assert!(rows[0]["train/loss_step"].is_null() && rows[0]["val/selection_score"].is_number());
    let (summary, _) = wandb_inspect(&runs[1], true);
    assert_eq!(
        (&summary[0]["state"], &summary[0]["run_id"]),
        (&"finished".into(), &id.into())
    );
}

/// A tracker that cannot write (here the metrics log on a full disk, `/dev/full`) returns an
/// error naming the file and the reason, which stops the run; no record is dropped silently.
#[test]
fn a_tracker_that_cannot_write_names_the_file() {
    use signal_diffusion_runtime::track::{Logger, Tracking};
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::os::unix::fs::symlink("/dev/full", run_dir.join("metrics.jsonl")).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut log = Logger::open(&run_dir, &Tracking::default(), &tiny::config(&root), "").unwrap();
    // The first writes fill the buffer; the error comes when it reaches the disk.
    let mut failed = None;
    for step in 0..10_000 {
        if let Err(e) = log.scalar("train/loss", 1.0, step) {
            failed = Some(e);
            break;
        }
    }
    let err = failed
        .or_else(|| log.flush().err())
        .expect("a write to a full disk fails");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("run/metrics.jsonl") && msg.contains("No space left on device"),
        "{msg}"
    );
}
