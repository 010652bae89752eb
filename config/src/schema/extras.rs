//! Who reads each `[model.extras]` key of a diffusion config. The reference moves every unknown
//! `[model]` key into `extras` and lets each model adapter pick the ones it knows, so a key of
//! another model family is silently ignored there. Here each key has a type and a list of the
//! models that read it: a value of the wrong type is an error, and so is a key the chosen model
//! does not read, naming the models that do.

use crate::choice::{Choice, DiffusionModel};
use crate::tree::{Ctx, Section, Value};

use DiffusionModel::{
    Dit, Hourglass, LocalMamba, StableDiffusion15 as Sd15, StableDiffusion35 as Sd35,
};

/// What a key's value must be.
#[derive(Clone, Copy)]
enum Type {
    /// Read with its type and range by `read_model` (the keys the DiT and the plans use).
    Read,
    /// An integer ≥ 0.
    Count,
    Float,
    Bool,
    Ints,
    /// A float, or one per level.
    FloatOrFloats,
    /// An integer, or `"auto"`.
    CountOrAuto,
    /// A list of tables (hourglass `self_attns`).
    Tables,
}

const CUSTOM: &[DiffusionModel] = &[Dit, Hourglass, LocalMamba];
const EVERY: &[DiffusionModel] = &[Dit, Hourglass, LocalMamba, Sd15, Sd35];
const HDIT_LM: &[DiffusionModel] = &[Hourglass, LocalMamba];

/// Every `[model.extras]` key: its type and the models that read it (the reference's adapters,
/// and the configuration contract's lists for the hourglass, LocalMamba and SD 3.5 models).
const KEYS: &[(&str, Type, &[DiffusionModel])] = &[
    // Stable Diffusion is latent by construction; its VAE and channels can be named to check
    // them against the pretrained model's.
    ("latent_space", Type::Read, CUSTOM),
    ("vae", Type::Read, EVERY),
    // The caption encoder (SD 1.5's pipeline brings its own, which this replaces).
    (
        "text_encoder",
        Type::Read,
        &[Dit, Hourglass, LocalMamba, Sd15],
    ),
    ("in_channels", Type::Read, EVERY),
    ("out_channels", Type::Read, EVERY),
    ("cfg_dropout", Type::Read, EVERY),
    ("num_classes", Type::Read, &[Dit]),
    (
        "num_attention_heads",
        Type::Read,
        &[Dit, Hourglass, LocalMamba, Sd35],
    ),
    ("attention_head_dim", Type::Read, &[Dit, Sd35]),
    ("num_layers", Type::Read, &[Dit, Sd35]),
    ("patch_size", Type::Read, CUSTOM),
    ("dropout", Type::Read, &[Dit]),
    ("attention_bias", Type::Read, &[Dit]),
    ("activation_fn", Type::Read, &[Dit]),
    ("norm_elementwise_affine", Type::Read, &[Dit]),
    ("norm_eps", Type::Read, &[Dit]),
    ("norm_num_groups", Type::Read, &[Dit]),
    ("upcast_attention", Type::Read, &[Dit]),
    ("widths", Type::Read, &[Hourglass]),
    ("d_ffs", Type::Ints, &[Hourglass]),
    ("self_attns", Type::Tables, &[Hourglass]),
    ("attention", Type::Read, &[Hourglass]),
    ("depths", Type::Read, HDIT_LM),
    ("dropout_rate", Type::FloatOrFloats, HDIT_LM),
    ("mapping_width", Type::Read, HDIT_LM),
    ("mapping_depth", Type::Read, HDIT_LM),
    ("mapping_d_ff", Type::Count, HDIT_LM),
    ("mapping_cond_dim", Type::Count, HDIT_LM),
    ("mapping_dropout_rate", Type::Float, HDIT_LM),
    ("mapping_cond", Type::Count, HDIT_LM),
    ("num_genders", Type::Count, HDIT_LM),
    ("num_health", Type::Count, HDIT_LM),
    ("age_embedding_dim", Type::Count, HDIT_LM),
    ("augment_wrapper", Type::Bool, HDIT_LM),
    ("augment_prob", Type::Float, HDIT_LM),
    (
        "block_out_channels",
        Type::Ints,
        &[Hourglass, LocalMamba, Sd15],
    ),
    (
        "num_res_blocks",
        Type::Count,
        &[Hourglass, LocalMamba, Sd15],
    ),
    ("dims", Type::Read, &[LocalMamba]),
    ("d_state", Type::Read, &[LocalMamba]),
    ("d_conv", Type::Count, &[LocalMamba]),
    ("expand", Type::Count, &[LocalMamba]),
    ("ssm_ratio", Type::Float, &[LocalMamba]),
    ("ssm_dt_rank", Type::CountOrAuto, &[LocalMamba]),
    ("scan_directions", Type::Read, &[LocalMamba]),
    ("scans", Type::Read, &[LocalMamba]),
    ("mlp_ratio", Type::Float, &[LocalMamba]),
    ("drop_path_rate", Type::Float, &[LocalMamba]),
    ("skip_t5", Type::Bool, &[Sd35]),
    ("train_text_encoder", Type::Bool, &[Sd15, Sd35]),
    ("text_encoder_lr_scale", Type::Float, &[Sd15]),
    ("joint_attention_dim", Type::Count, &[Sd35]),
    ("caption_projection_dim", Type::Count, &[Sd35]),
    ("pooled_projection_dim", Type::Count, &[Sd35]),
];

/// Check every key written in `[model.extras]` (`x`) for its type and whether `model` reads it.
/// Marks them all as read: the unknown ones are left for `finish` to report.
pub(super) fn check(x: &Section, ctx: &mut Ctx, model: DiffusionModel) {
    for key in x.keys() {
        let Some(&(_, ty, readers)) = KEYS.iter().find(|(k, _, _)| *k == key) else {
            continue;
        };
        let Some(node) = x.node(ctx, &key) else {
            continue;
        };
        let path = format!("model.extras.{key}");
        if let Some(expected) = mismatch(ty, &node.value) {
            ctx.error(
                &path,
                format!(
                    "`{path}` must be {expected}, found {}",
                    node.value.type_name()
                ),
            );
        }
        if !readers.contains(&model) {
            let names: Vec<String> = readers
                .iter()
                .map(|m| format!("\"{}\"", m.toml()))
                .collect();
            ctx.error(
                &path,
                format!(
                    "`{path}` is not read by `model.name` = \"{model}\": it is a key of {}",
                    names.join(", ")
                ),
            )
            .help = Some("remove it, or choose a model that reads it".into());
        }
    }
}

/// What `value` should have been, if it is not of type `ty`.
fn mismatch(ty: Type, value: &Value) -> Option<&'static str> {
    let count = |v: &Value| matches!(v, Value::Int(i) if *i >= 0);
    let float = |v: &Value| matches!(v, Value::Float(_) | Value::Int(_));
    let list = |v: &Value, each: &dyn Fn(&Value) -> bool| match v {
        Value::Array(items) => items.iter().all(|n| each(&n.value)),
        _ => false,
    };
    let (ok, expected) = match ty {
        Type::Read => (true, ""),
        Type::Count => (count(value), "an integer ≥ 0"),
        Type::Float => (float(value), "a number"),
        Type::Bool => (matches!(value, Value::Bool(_)), "true or false"),
        Type::Ints => (
            count(value) || list(value, &count),
            "an integer or a list of integers ≥ 0",
        ),
        Type::FloatOrFloats => (
            float(value) || list(value, &float),
            "a number or a list of numbers",
        ),
        Type::CountOrAuto => (
            count(value) || matches!(value, Value::Str(s) if s == "auto"),
            "an integer ≥ 0 or \"auto\"",
        ),
        Type::Tables => (
            list(value, &|v| matches!(v, Value::Table(_))),
            "a list of tables",
        ),
    };
    (!ok).then_some(expected)
}
