//! Checkpoints: a directory with `model.safetensors` (parameters and buffers, PyTorch names),
//! `optimizer.safetensors` (moments, by parameter name) and `state.json` (step, epoch, position
//! in the epoch, selection and early-stopping state, the resolved config). Written into a hidden
//! temporary directory and renamed into place, so a crash never leaves half a checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use signal_diffusion_config::Config;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub step: u64,
    pub epoch: usize,
    /// Batches of `epoch` already trained on (resume skips them).
    pub batch_in_epoch: usize,
    /// (score, step, checkpoint dir name) of the kept best checkpoints, best first.
    pub best: Vec<(f64, u64, String)>,
    pub evals_without_improvement: usize,
    pub best_score: Option<f64>,
    pub config_hash: String,
    /// Per task: the (mean, std) regression targets are standardised with (train split
    /// statistics); `None` for classification tasks. Predictions × std + mean are in the
    /// column's units.
    pub target_norm: Vec<Option<(f32, f32)>>,
    /// Weight snapshots in the SWA average (its tensors are in `swa.safetensors`).
    pub swa_n: u64,
    /// fp16's loss scale and skipped updates (`mixed_precision = "fp16"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<crate::ops::precision::LossScaler>,
    /// The resolved config the run was written with (`Config::to_value`), which a resume
    /// compares key by key (checkpoints written before it have only `config_hash`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
}

/// Whether a run with `config` may continue from a checkpoint whose state is `saved`: an error
/// naming every structural key that differs (the model, the tasks, the input, the batch, the
/// optimizer, the objective), else each other difference printed as it takes effect.
pub fn check_config(config: &Config, saved: &State, dir: &Path) -> Result<()> {
    let Some(old) = &saved.config else {
        println!(
            "{} predates per-key config records: resuming without comparing configs",
            dir.display()
        );
        return Ok(());
    };
    let differences = config.differences(old);
    let structural: Vec<String> = differences
        .iter()
        .filter(|d| d.structural)
        .map(|d| format!("`{}` = {} (the checkpoint's: {})", d.key, d.new, d.old))
        .collect();
    if !structural.is_empty() {
        bail!(
            "{} was written with another model, input, batch, optimizer or objective; this trainer has {}. Resume it with a trainer built from the config it was written with (its run directory's config_resolved.json), or start a new run",
            dir.display(),
            structural.join(", ")
        );
    }
    const SHOWN: usize = 10;
    for d in differences.iter().take(SHOWN) {
        println!(
            "resuming with `{}` = {} (the checkpoint's: {})",
            d.key, d.new, d.old
        );
    }
    if differences.len() > SHOWN {
        println!("... and {} more differences", differences.len() - SHOWN);
    }
    Ok(())
}

/// Write a checkpoint; `extras` are further named tensor files (`swa.safetensors`,
/// `ema.safetensors`).
pub fn save(
    dir: &Path,
    vars: &[(String, Var)],
    optimizer: &HashMap<String, Tensor>,
    state: &State,
    extras: &[(&str, &HashMap<String, Tensor>)],
) -> Result<()> {
    let parent = dir.parent().context("checkpoint dir has a parent")?;
    std::fs::create_dir_all(parent)?;
    let name = dir
        .file_name()
        .context("checkpoint dir has a name")?
        .to_string_lossy();
    let tmp = parent.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let model: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&model, tmp.join("model.safetensors"))?;
    candle_core::safetensors::save(optimizer, tmp.join("optimizer.safetensors"))?;
    for (file, tensors) in extras {
        candle_core::safetensors::save(*tensors, tmp.join(file))?;
    }
    std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(state)?)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("cannot move checkpoint into {}", dir.display()))?;
    Ok(())
}

pub struct Loaded {
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    /// The extra tensor files there are, by file name.
    pub extras: HashMap<String, HashMap<String, Tensor>>,
    pub state: State,
}

/// Read a checkpoint directory, its tensors onto `device`.
pub fn load(dir: &Path, device: &Device) -> Result<Loaded> {
    let read = |f: &str| -> Result<HashMap<String, Tensor>> {
        let p = dir.join(f);
        candle_core::safetensors::load(&p, device)
            .with_context(|| format!("cannot read {}", p.display()))
    };
    let state_path = dir.join("state.json");
    let state: State =
        serde_json::from_str(&std::fs::read_to_string(&state_path).with_context(|| {
            format!(
                "cannot read {} (is {} a checkpoint directory?)",
                state_path.display(),
                dir.display()
            )
        })?)
        .with_context(|| format!("{}: not a checkpoint state", state_path.display()))?;
    let mut extras = HashMap::new();
    for file in ["swa.safetensors", "ema.safetensors"] {
        if dir.join(file).exists() {
            extras.insert(file.to_string(), read(file)?);
        }
    }
    Ok(Loaded {
        model: read("model.safetensors")?,
        optimizer: read("optimizer.safetensors")?,
        extras,
        state,
    })
}

/// Copy saved tensors into the model's variables, checking names and shapes.
pub fn restore(vars: &[(String, Var)], saved: &HashMap<String, Tensor>) -> Result<()> {
    for (name, var) in vars {
        let t = saved
            .get(name)
            .with_context(|| format!("checkpoint has no tensor `{name}`"))?;
        if t.dims() != var.dims() {
            bail!(
                "checkpoint tensor `{name}` has shape {:?}, the model expects {:?}",
                t.dims(),
                var.dims()
            );
        }
        var.set(t)?;
    }
    Ok(())
}

/// Remove all but the newest `keep` directories among `dirs` (sorted oldest first).
pub fn prune(dirs: &mut Vec<PathBuf>, keep: usize) -> Result<()> {
    while dirs.len() > keep {
        let old = dirs.remove(0);
        if old.exists() {
            std::fs::remove_dir_all(&old)
                .with_context(|| format!("cannot remove {}", old.display()))?;
        }
    }
    Ok(())
}
