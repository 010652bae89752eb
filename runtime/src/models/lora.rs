//! LoRA (Hu et al. 2021) as PEFT builds it, on the linear layers `model.lora.target_modules`
//! names: the pretrained `W` and `b` stay frozen and a low-rank update is learned,
//!
//!   y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ,   A (r, din), B (dout, r), s = α / r (or `scaling`),
//!
//! A drawn as PEFT draws it (kaiming-uniform with a = √5, i.e. U(±1/√din)) and B zero, so
//! training starts from the pretrained model exactly. Dropout is on the branch's input, as
//! PEFT's `lora_dropout`. Parameters are named as PEFT names them (`<module>.lora_A.weight`,
//! `<module>.lora_B.weight`), so the adapters save under PEFT's keys with no renaming.
//!
//! What trains: A and B of every targeted layer, plus the biases `bias` names (PEFT's `none`,
//! `all`, `lora_only`); every other parameter is frozen (`nn::Params` keeps it apart and hands
//! its layer a tensor that is not a variable, so the backward computes no gradient for it).

use std::cell::Cell;

use candle_core::{Result, Tensor, Var};
use signal_diffusion_config::choice::LoraBias;
use signal_diffusion_config::schema::DiffModel;

use crate::ops::cpu::splitmix64;

/// What `[model.lora]` asks for.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    /// PEFT's `lora_alpha`.
    pub alpha: f64,
    /// The branch's factor: α / r, or `scaling` where the config sets it.
    pub scale: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
    pub bias: LoraBias,
}

impl LoraSpec {
    /// The config's `[model.lora]`, when enabled.
    pub fn of(m: &DiffModel) -> Option<LoraSpec> {
        m.lora_enabled.then(|| LoraSpec {
            rank: m.lora_rank,
            alpha: m.lora_alpha,
            scale: m.lora_scaling.unwrap_or(m.lora_alpha / m.lora_rank as f64),
            dropout: m.lora_dropout,
            target_modules: m.lora_target_modules.clone(),
            bias: m.lora_bias,
        })
    }

    /// PEFT's match for a list of targets: the module's name is a target or ends with
    /// `.<target>` (`to_out.0` matches `transformer_blocks.3.attn1.to_out.0`).
    pub fn targets(&self, module: &str) -> bool {
        self.target_modules
            .iter()
            .any(|t| module == t || module.ends_with(&format!(".{t}")))
    }

    /// Whether the model parameter `name` trains alongside the adapters: a bias, under
    /// `bias = "all"`, or a targeted layer's bias under `"lora_only"`.
    pub fn trains(&self, name: &str) -> bool {
        let Some(module) = name.strip_suffix(".bias") else {
            return false;
        };
        match self.bias {
            LoraBias::None => false,
            LoraBias::All => true,
            LoraBias::LoraOnly => self.targets(module),
        }
    }

    /// PEFT's `adapter_config.json` for these adapters on `base_model`. PEFT has no `scaling`
    /// key: a custom scaling is written as the α that gives it (α = s·r).
    pub fn peft_config(&self, base_model: &str) -> serde_json::Value {
        let bias = match self.bias {
            LoraBias::None => "none",
            LoraBias::All => "all",
            LoraBias::LoraOnly => "lora_only",
        };
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": null,
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.scale * self.rank as f64,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "bias": bias,
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "inference_mode": true,
            "modules_to_save": null,
        })
    }
}

/// A targeted layer's adapter: `s·(drop(x)·Aᵀ)·Bᵀ`.
pub struct LoraBranch {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
    /// The layer's own stream of dropout masks, from its name.
    site: u64,
}

impl LoraBranch {
    pub fn new(a: Tensor, b: Tensor, spec: &LoraSpec, module: &str) -> Self {
        let site = module.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, c| {
            (h ^ c as u64).wrapping_mul(0x100_0000_01b3)
        });
        LoraBranch {
            a,
            b,
            scale: spec.scale,
            dropout: spec.dropout,
            site,
        }
    }

    /// x (rows, din) through the adapted layer of `weight` and `bias`: one op with the base
    /// product (ops::linear::lora_linear), the rank-r factor `s·drop(x)·Aᵀ` computed before it.
    pub fn forward(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let dropped = match DROPOUT_SEED.with(Cell::get) {
            Some(seed) if self.dropout > 0.0 => {
                crate::ops::dropout::dropout(x, self.dropout, splitmix64(seed ^ self.site))?
            }
            _ => x.clone(),
        };
        let low = (crate::ops::precision::matmul(&dropped, &self.a.t()?)? * self.scale)?;
        crate::ops::linear::lora_linear(x, weight, bias, &low, &self.b)
    }
}

/// The model's parameters under its own names with every adapter merged into its layer's weight
/// (W + s·B·A): what a model without adapters loads. `trained` holds the trainable parameters'
/// values (live, or their EMA), `frozen` the rest as loaded.
pub fn merge(
    spec: &LoraSpec,
    trained: &[(String, Tensor)],
    frozen: &[(String, Var)],
) -> Result<Vec<(String, Tensor)>> {
    let find = |name: &str| trained.iter().find(|(n, _)| n == name).map(|(_, t)| t);
    let mut merged = Vec::with_capacity(trained.len() + frozen.len());
    for (name, value) in frozen
        .iter()
        .map(|(n, v)| (n, v.as_tensor()))
        .chain(trained.iter().map(|(n, t)| (n, t)))
    {
        if name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight") {
            continue;
        }
        let adapter = name.strip_suffix(".weight").and_then(|module| {
            Some((
                find(&format!("{module}.lora_A.weight"))?,
                find(&format!("{module}.lora_B.weight"))?,
            ))
        });
        let value = match adapter {
            Some((a, b)) => (value + (b.matmul(a)? * spec.scale)?)?,
            None => value.clone(),
        };
        merged.push((name.clone(), value));
    }
    Ok(merged)
}

/// The trainable parameters under the keys PEFT's `get_peft_model_state_dict` writes for a
/// model wrapped by `get_peft_model` (`base_model.model.` + the module path; a targeted layer's
/// bias lives in its `base_layer`), which `PeftModel.from_pretrained` loads.
pub fn peft_state(spec: &LoraSpec, trained: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    trained
        .iter()
        .map(|(name, t)| {
            let key = match name.strip_suffix(".bias") {
                Some(module) if spec.targets(module) => format!("{module}.base_layer.bias"),
                _ => name.clone(),
            };
            (format!("base_model.model.{key}"), t.clone())
        })
        .collect()
}

/// diffusers' LoRA file of a Stable Diffusion denoiser's adapters
/// (`pytorch_lora_weights.safetensors`, what `pipe.load_lora_weights(dir)` reads), as
/// `save_lora_weights(<component>_lora_layers=..., <component>_lora_adapter_metadata=...)` writes
/// it: the adapters under `<component>.<module>.lora_A.weight` and `.lora_B.weight`, and the LoRA
/// config, its keys prefixed `<component>.`, as the JSON of the file's `lora_adapter_metadata`.
/// `component`: `unet` (SD 1.5) or `transformer` (SD 3). The format holds no bias: `None` when
/// biases train.
pub fn diffusers_lora_state(
    component: &str,
    spec: &LoraSpec,
    trained: &[(String, Tensor)],
) -> Option<(Vec<(String, Tensor)>, String)> {
    if spec.bias != LoraBias::None {
        return None;
    }
    let adapters = trained
        .iter()
        .filter(|(name, _)| name.contains(".lora_"))
        .map(|(name, t)| (format!("{component}.{name}"), t.clone()))
        .collect();
    let config = serde_json::json!({
        "r": spec.rank,
        "lora_alpha": spec.scale * spec.rank as f64,
        "lora_dropout": spec.dropout,
        "target_modules": spec.target_modules,
        "bias": "none",
        "init_lora_weights": true,
        "use_dora": false,
        "use_rslora": false,
    });
    let prefixed: serde_json::Map<String, serde_json::Value> = config
        .as_object()?
        .iter()
        .map(|(k, v)| (format!("{component}.{k}"), v.clone()))
        .collect();
    Some((adapters, serde_json::to_string_pretty(&prefixed).ok()?))
}

/// What sampling from a LoRA run's checkpoint needs besides it: the adapters' spec and the
/// pretrained weights they adapt (a checkpoint holds only what trains; the final weights are
/// merged and need neither).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraBase {
    pub spec: LoraSpec,
    pub pretrained: std::path::PathBuf,
}

thread_local! {
    static DROPOUT_SEED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// While alive, the adapters on this thread drop their inputs with masks drawn from `seed`
/// (each layer its own stream); none in evaluation (`None`, the default). A model enters it for
/// the forward of a training step, and again for a checkpointed recompute, which draws the same
/// masks.
pub struct LoraDropout {
    previous: Option<u64>,
}

impl LoraDropout {
    pub fn enter(seed: Option<u64>) -> Self {
        LoraDropout {
            previous: DROPOUT_SEED.with(|s| s.replace(seed)),
        }
    }
}

impl Drop for LoraDropout {
    fn drop(&mut self) {
        DROPOUT_SEED.with(|s| s.set(self.previous));
    }
}
