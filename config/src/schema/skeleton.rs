//! The `[model.extras]` keys of the two hourglass-shaped models (the hourglass transformer and
//! LocalMamba), resolved per level as the reference's adapters resolve them
//! (spec/reference/diffusion.md §1–2, hourglass-localmamba.md), with the configuration
//! contract's spellings (`block_out_channels`, `num_res_blocks`, `expand`, `d_conv`) as aliases
//! that must agree with the reference's keys when both are written.

use crate::choice::{Conditioning, DiffusionModel};
use crate::diag::Diagnostic;
use crate::tree::{Ctx, Section, Value};

/// What the two models read, one entry per level (outermost first) where per level.
#[derive(Default)]
pub(super) struct SkeletonKeys {
    /// Hourglass `widths` / LocalMamba `dims`.
    pub widths: Vec<usize>,
    pub depths: Vec<usize>,
    /// Hourglass: the feed-forward width of each level (`d_ffs`, default `mapping_d_ff`).
    pub d_ffs: Vec<usize>,
    /// Hourglass: `"neighborhood"` or `"global"` per level (`self_attns` / `attention`).
    pub attention: Vec<String>,
    pub d_heads: Vec<usize>,
    /// The neighbourhood kernel or the shifted window's size per level (0 for global attention
    /// and none).
    pub kernel_sizes: Vec<usize>,
    /// `dropout_rate`, per level.
    pub dropout_rates: Vec<f64>,
    pub mapping_d_ff: usize,
    pub mapping_dropout_rate: f64,
    /// The mapping condition's width: the age features of `gend_hlth_age`, else 0.
    pub mapping_cond_dim: usize,
    /// LocalMamba: E / width (`ssm_ratio`, the contract's `expand`).
    pub ssm_ratio: f64,
    /// LocalMamba: SS2D's depthwise kernel (`d_conv`).
    pub d_conv: usize,
    /// LocalMamba: Δ's projection rank; `None` = "auto" (⌈width / 16⌉).
    pub ssm_dt_rank: Option<usize>,
    pub drop_path_rate: f64,
}

const D_HEAD: usize = 64;
const KERNEL: usize = 7;
/// Shifted windows' size in the `attention` shorthand.
const WINDOW: usize = 8;

/// Read the keys of `model` (hourglass or LocalMamba) from `x`; `widths`, `dims` and `depths`
/// are what `read_model` read with the reference's defaults.
pub(super) fn read(
    x: &Section,
    ctx: &mut Ctx,
    model: DiffusionModel,
    conditioning: Conditioning,
    mapping_width: usize,
    (widths, dims, depths): (Vec<usize>, Vec<usize>, Vec<usize>),
) -> SkeletonKeys {
    let hourglass = model == DiffusionModel::Hourglass;
    let (level_key, mut widths) = match hourglass {
        true => ("widths", widths),
        false => ("dims", dims),
    };
    let mut depths = depths;
    // The contract's spellings.
    let us = |v: Vec<i64>| v.into_iter().map(|x| x.max(0) as usize).collect::<Vec<_>>();
    if let Some(channels) = x.int_list(ctx, "block_out_channels").map(us) {
        if x.has(level_key) && channels != widths {
            ctx.error(
                "model.extras.block_out_channels",
                format!("`block_out_channels` = {channels:?} disagrees with `{level_key}` = {widths:?}: they are the same setting"),
            )
            .help = Some(format!("keep one of them (`{level_key}` is the reference's)"));
        }
        widths = channels;
    }
    if let Some(n) = x.count_opt(ctx, "num_res_blocks", 1) {
        let same = vec![n; widths.len()];
        if x.has("depths") && depths != same {
            ctx.error(
                "model.extras.num_res_blocks",
                format!("`num_res_blocks` = {n} (that depth at every level) disagrees with `depths` = {depths:?}"),
            )
            .help = Some("keep one of them (`depths` is the reference's)".into());
        }
        depths = same;
    }
    let levels = widths.len();
    if levels == 0 {
        ctx.error(
            &format!("model.extras.{level_key}"),
            format!("`{level_key}` needs at least one level"),
        );
    }
    let mapping_d_ff = x.count(ctx, "mapping_d_ff", 3 * mapping_width, 1);
    let mapping_dropout_rate = x.float_in(ctx, "mapping_dropout_rate", 0.0, 0.0, 0.999);
    let dropout_rates = match x.node(ctx, "dropout_rate").map(|n| n.value.clone()) {
        None => vec![0.0; levels],
        Some(Value::Float(p)) => vec![p; levels],
        Some(Value::Int(p)) => vec![p as f64; levels],
        Some(_) => x.float_list(ctx, "dropout_rate").unwrap_or_default(),
    };
    if dropout_rates.len() != levels {
        ctx.error(
            "model.extras.dropout_rate",
            format!(
                "`dropout_rate` has {} entries for {levels} levels: give one number, or one per level",
                dropout_rates.len()
            ),
        );
    }
    if let Some(p) = dropout_rates.iter().find(|p| !(0.0..1.0).contains(*p)) {
        ctx.error(
            "model.extras.dropout_rate",
            format!("`dropout_rate` {p} is not a probability in [0, 1)"),
        );
    }
    // gend_hlth_age: class = gender·2 + health (5 rows with the null) and the age's features.
    for key in ["num_genders", "num_health"] {
        if let Some(n) = x.count_opt(ctx, key, 0) {
            if n != 3 {
                ctx.error(&format!("model.extras.{key}"), format!("`{key}` = {n}: the class of `gend_hlth_age` is gender·2 + health over two values each plus unknown, so {key} is 3"))
                    .help = Some(format!("remove `{key}`"));
            }
        }
    }
    let age_dim = x.count(ctx, "age_embedding_dim", mapping_width, 2);
    if !age_dim.is_multiple_of(2) {
        ctx.error(
            "model.extras.age_embedding_dim",
            format!("`age_embedding_dim` = {age_dim} must be even (cos ‖ sin features)"),
        );
    }
    let gha = conditioning == Conditioning::GenderHealthAge;
    if x.has("age_embedding_dim") && !gha {
        ctx.warn(
            "model.extras.age_embedding_dim",
            "`age_embedding_dim` has no effect: only `gend_hlth_age` conditioning embeds ages",
        );
    }
    let caption = conditioning == Conditioning::Caption;
    // Captions: the width written here (the reference's `mapping_cond`), checked against the
    // text encoder's pooled width once it is read (diffusion.rs), else 0.
    let mapping_cond_dim = match (gha, caption) {
        (true, _) => age_dim,
        (false, true) => {
            let (width, dim) = (
                x.count_opt(ctx, "mapping_cond", 0),
                x.count_opt(ctx, "mapping_cond_dim", 0),
            );
            if let Some((w, d)) = width.zip(dim).filter(|(w, d)| w != d) {
                ctx.error(
                    "model.extras.mapping_cond_dim",
                    format!("`mapping_cond_dim` = {d}, but `mapping_cond` = {w}: both are the caption embedding's width"),
                )
                .help = Some("remove one (or both: the text encoder decides it)".into());
            }
            width.or(dim).unwrap_or(0)
        }
        (false, false) => 0,
    };
    if let Some(n) = x.count_opt(ctx, "mapping_cond_dim", 0).filter(|_| !caption) {
        if n != mapping_cond_dim {
            ctx.error("model.extras.mapping_cond_dim", format!("`mapping_cond_dim` = {n}, but the conditioning sets it to {mapping_cond_dim} (`gend_hlth_age`: `age_embedding_dim`; `classes` and `none`: 0)"))
                .help = Some("remove it: the conditioning decides it".into());
        }
    }
    if x.count_opt(ctx, "mapping_cond", 0).is_some() && !caption {
        ctx.warn(
            "model.extras.mapping_cond",
            "`mapping_cond` has no effect: it is the caption embedding's width, and the conditioning is not `caption`",
        )
        .help = Some("remove it".into());
    }
    if x.bool_or(ctx, "augment_wrapper", false) {
        ctx.error(
            "model.extras.augment_wrapper",
            "`augment_wrapper = true` is not supported (the reference raises too)",
        )
        .help = Some("remove it".into());
    }
    if x.float(ctx, "augment_prob").is_some() {
        ctx.warn(
            "model.extras.augment_prob",
            "`augment_prob` has no effect: it is the probability of the unsupported augment wrapper",
        );
    }

    let (mut attention, mut d_heads, mut kernel_sizes, mut d_ffs) =
        (vec![], vec![], vec![], vec![]);
    let (mut ssm_ratio, mut drop_path_rate, mut d_conv, mut ssm_dt_rank) = (2.0, 0.0, 3, None);
    if hourglass {
        d_ffs = x
            .int_list(ctx, "d_ffs")
            .map(us)
            .unwrap_or_else(|| vec![mapping_d_ff; levels]);
        if d_ffs.len() != levels {
            ctx.error(
                "model.extras.d_ffs",
                format!("`d_ffs` has {} entries for {levels} levels", d_ffs.len()),
            );
        }
        (attention, d_heads, kernel_sizes) = self_attention(x, ctx, levels);
        for (i, (w, d)) in widths.iter().zip(&d_heads).enumerate() {
            if attention.get(i).is_some_and(|k| k == "none") {
                continue;
            }
            if *d == 0 || !d.is_multiple_of(8) {
                ctx.error("model.extras.self_attns", format!("level {i}'s head size {d} is not a multiple of 8 (axial RoPE turns a quarter of each head per axis, in pairs)"));
            } else if !w.is_multiple_of(*d) {
                ctx.error(
                    "model.extras.widths",
                    format!("width {w} in `model.extras.widths` is not divisible by the attention head size {d}"),
                )
                .help = Some(format!("use multiples of {d}, e.g. [64, 128, 256]"));
            }
        }
        if x.node(ctx, "num_attention_heads").is_some() {
            ctx.error("model.extras.num_attention_heads", "the hourglass's heads are width / d_head at each level: `num_attention_heads` cannot say them")
                .help = Some("set the head size per level: `self_attns = [{ type = \"neighborhood\", d_head = 64, kernel_size = 7 }, ...]`".into());
        }
    } else {
        ssm_ratio = x.float_in(ctx, "ssm_ratio", 2.0, 0.0, 64.0);
        if let Some(expand) = x.count_opt(ctx, "expand", 1) {
            if x.has("ssm_ratio") && (expand as f64) != ssm_ratio {
                ctx.error("model.extras.expand", format!("`expand` = {expand} disagrees with `ssm_ratio` = {ssm_ratio}: they are the same setting"));
            }
            ssm_ratio = expand as f64;
        }
        d_conv = x.count(ctx, "d_conv", 3, 1);
        if d_conv.is_multiple_of(2) {
            ctx.error(
                "model.extras.d_conv",
                format!("`d_conv` = {d_conv}: SS2D's depthwise kernel must be odd (padded by half of it, the grid keeps its size)"),
            );
        }
        // "auto" (the type check admits only it among strings), or a rank for every level.
        if let Some(Value::Int(r)) = x.node(ctx, "ssm_dt_rank").map(|n| &n.value) {
            ssm_dt_rank = Some((*r).max(1) as usize);
        }
        drop_path_rate = x.float_in(ctx, "drop_path_rate", 0.0, 0.0, 0.999);
        if x.float(ctx, "mlp_ratio").is_some() {
            ctx.warn("model.extras.mlp_ratio", "`mlp_ratio` has no effect: the LocalMamba block has no MLP (the reference reads and ignores it)")
                .help = Some("remove it".into());
        }
        if x.node(ctx, "num_attention_heads").is_some() {
            ctx.error(
                "model.extras.num_attention_heads",
                "LocalMamba has no attention heads: its layers are selective scans",
            )
            .help = Some("remove it".into());
        }
    }
    SkeletonKeys {
        widths,
        depths,
        d_ffs,
        attention,
        d_heads,
        kernel_sizes,
        dropout_rates,
        mapping_d_ff,
        mapping_dropout_rate,
        mapping_cond_dim,
        ssm_ratio,
        d_conv,
        ssm_dt_rank,
        drop_path_rate,
    }
}

/// Per level: the attention kind, head size and neighbourhood kernel or window size, from
/// `self_attns` (the reference's tables: a shifted window needs its `window_size`), or
/// `attention` (our list of kinds: heads of 64, kernel 7, windows of 8), or the reference's
/// default (neighbourhood attention with kernel 7 but global on the last level).
fn self_attention(
    x: &Section,
    ctx: &mut Ctx,
    levels: usize,
) -> (Vec<String>, Vec<usize>, Vec<usize>) {
    let default_kind = |i: usize| match i + 1 == levels {
        true => "global",
        false => "neighborhood",
    };
    let mut kinds: Vec<String> = (0..levels).map(|i| default_kind(i).to_string()).collect();
    let mut d_heads = vec![D_HEAD; levels];
    let mut kernels = vec![KERNEL; levels];
    let mut windows = vec![Some(WINDOW); levels];
    // Where each level's kind is written (a table's `type`), for the errors about it.
    let mut kind_locs = vec![None; levels];
    let tables = x.node(ctx, "self_attns");
    let listed = x.string_list(ctx, "attention");
    if tables.is_some() && listed.is_some() {
        ctx.error(
            "model.extras.attention",
            "`attention` and `self_attns` both set the levels' attention: keep one",
        );
    }
    if let Some(listed) = listed {
        if listed.len() != levels {
            ctx.error(
                "model.extras.attention",
                format!(
                    "`attention` has {} entries for {levels} levels",
                    listed.len()
                ),
            );
        }
        kinds = listed;
    }
    if let Some(node) = tables {
        let Value::Array(items) = &node.value else {
            return (kinds, d_heads, kernels);
        };
        if items.len() != levels {
            ctx.diags.push(Diagnostic::error(
                Some(node.loc.clone()),
                format!(
                    "`self_attns` has {} tables for {levels} levels",
                    items.len()
                ),
            ));
        }
        for (i, item) in items.iter().enumerate().take(levels) {
            let Value::Table(t) = &item.value else {
                continue;
            };
            windows[i] = None;
            for e in &t.entries {
                let bad = |ctx: &mut Ctx, what: &str| {
                    ctx.diags.push(Diagnostic::error(
                        Some(e.node.loc.clone()),
                        format!("`self_attns[{i}].{}` must be {what}", e.key),
                    ))
                };
                match (e.key.as_str(), &e.node.value) {
                    ("type", Value::Str(s)) => {
                        kinds[i] = s.clone();
                        kind_locs[i] = Some(e.node.loc.clone());
                    }
                    ("d_head", Value::Int(d)) if *d > 0 => d_heads[i] = *d as usize,
                    ("kernel_size", Value::Int(k)) if *k > 0 => kernels[i] = *k as usize,
                    ("window_size", Value::Int(w)) if *w > 0 => windows[i] = Some(*w as usize),
                    ("type", _) => bad(ctx, "a string"),
                    ("window_size", _) => bad(ctx, "a positive integer"),
                    ("d_head" | "kernel_size", _) => bad(ctx, "a positive integer"),
                    (other, _) => ctx.diags.push(Diagnostic::error(
                        Some(e.key_loc.clone()),
                        format!("unknown key `{other}` in `self_attns[{i}]`: expected type, d_head, kernel_size, window_size"),
                    )),
                }
            }
        }
    }
    let key = match tables.is_some() {
        true => "model.extras.self_attns",
        false => "model.extras.attention",
    };
    for (i, kind) in kinds.iter().enumerate() {
        let loc = kind_locs[i].clone().or_else(|| ctx.loc(key));
        let error = match kind.as_str() {
            "global" => {
                kernels[i] = 0;
                None
            }
            "neighborhood" if kernels[i].is_multiple_of(2) => Some(Diagnostic::error(
                loc,
                format!("level {i}'s neighbourhood kernel {} must be odd (the query sits at its centre)", kernels[i]),
            )),
            "neighborhood" => None,
            "shifted-window" => match windows[i] {
                Some(w) => {
                    kernels[i] = w;
                    None
                }
                None => Some(Diagnostic::error(
                    loc,
                    format!("level {i}'s shifted-window attention needs its `window_size`"),
                )),
            },
            "none" => {
                kernels[i] = 0;
                None
            }
            other => Some(Diagnostic::error(
                loc,
                format!("unknown attention `{other}` at level {i}: expected \"neighborhood\", \"global\", \"shifted-window\" or \"none\""),
            )),
        };
        if let Some(e) = error {
            ctx.diags.push(e);
        }
    }
    (kinds, d_heads, kernels)
}
