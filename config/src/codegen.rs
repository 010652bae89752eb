//! Code generation: a resolved config becomes the Rust source of a trainer specialised to it.
//!
//! The output is flat and readable (it is written to `$OUT_DIR/pipeline.rs`), top to bottom: every
//! resolved value as one typed literal (`config()`, each value commented with its TOML key), the
//! concrete model type and its shape, `run()` that calls the runtime trainer, then the constants
//! the runtime needs besides (sizes, the plan, the embedded config texts so that `--set` is
//! re-validated by this same crate at run time, the CUDA kernels). build.rs and the `trainer!`
//! macro both go through [`items`], so they cannot drift apart.

use proc_macro2::TokenStream;
use quote::{format_ident, quote};

use crate::choice::{Activation, Backbone, Conditioning, DiffusionModel, Pooling};
use crate::cuda::{CudaBuild, KernelText};
use crate::literal::{At, Literal};
use crate::plan::{
    cnn_1d_channels, cnn_light_channels, dit_num_embeds, skeleton_class_rows, transformer_tokens,
    Plan,
};
use crate::schema::TaskKind;
use crate::schema::{Classification, Diffusion};
use crate::settings::relative_to;
use crate::{Kind, Resolved};

/// The generated items: the imports, `config()` as commented source, and the rest as tokens.
struct Items {
    imports: TokenStream,
    config: String,
    rest: TokenStream,
}

/// The generated items, as tokens (for the macro). `cuda`: the kernels of a CUDA build.
pub fn tokens(r: &Resolved, cuda: Option<&CudaBuild>) -> TokenStream {
    let Items {
        imports,
        config,
        rest,
    } = match items(r, cuda) {
        Ok(items) => items,
        Err(e) => return e,
    };
    let config: TokenStream = config.parse().expect("the config literal is Rust");
    quote! { #imports #config #rest }
}

fn items(r: &Resolved, cuda: Option<&CudaBuild>) -> Result<Items, TokenStream> {
    let Some(plan) = r.plan.as_ref() else {
        // resolve() rejects every model without a plan before code generation.
        let msg = "signal-diffusion: this model cannot be generated";
        return Err(quote! { compile_error!(#msg); });
    };
    let common = common_items(r, plan, cuda);
    let specific = match &r.config.kind {
        Kind::Classification(c) => classification_items(c),
        Kind::Diffusion(d) => diffusion_items(d),
    };
    let rt = quote! { rt };
    Ok(Items {
        imports: quote! {
            use ::signal_diffusion_runtime as rt;
            #[allow(unused_imports)]
            use #rt::config::{choice::*, pretrained::{ClipText, Mmdit, Unet, Vae}, schema::*, settings::*, Config, Kind};
            #[allow(unused_imports)]
            use ::std::{collections::BTreeMap, path::{Path, PathBuf}};
        },
        config: config_fn(r),
        rest: unsuffixed(quote! { #specific #common }),
    })
}

/// `16` and `0.1` instead of quote's `16usize` and `0.1f64`: every number generated here sits
/// where its type is stated, and reads better bare.
fn unsuffixed(tokens: TokenStream) -> TokenStream {
    use proc_macro2::{Group, Literal, TokenTree};
    tokens
        .into_iter()
        .map(|t| match t {
            TokenTree::Group(g) => {
                let mut bare = Group::new(g.delimiter(), unsuffixed(g.stream()));
                bare.set_span(g.span());
                TokenTree::Group(bare)
            }
            TokenTree::Literal(l) => {
                let text = l.to_string();
                let bare = if let Some(v) = text.strip_suffix("f64") {
                    v.parse().ok().map(Literal::f64_unsuffixed)
                } else {
                    ["usize", "u64", "u32"]
                        .iter()
                        .find_map(|s| text.strip_suffix(s))
                        .and_then(|v| v.parse().ok())
                        .map(Literal::u64_unsuffixed)
                };
                TokenTree::Literal(bare.unwrap_or(l))
            }
            other => other,
        })
        .collect()
}

/// `config()`: the resolved config as one literal, each value commented with its TOML key.
fn config_fn(r: &Resolved) -> String {
    let value = r.config.literal(&At::top(&r.project_root, 1));
    format!(
        "/// Every value this trainer runs with, as the build resolved `{}` and its\n\
         /// settings files. Paths under the project root follow `root`, the root the trainer runs\n\
         /// with (docs/config.md, \"Paths\"). `--set` re-resolves the embedded TOML instead.\n\
         pub fn config(root: &Path) -> Config {{\n    {value}\n}}\n",
        relative_to(&r.project_root, &r.config.path).display(),
    )
}

/// jemalloc's options for the trainer of `r` (read at start-up; `_RJEM_MALLOC_CONF` still
/// overrides them). A training step frees and reallocates the same activation-sized buffers
/// every op: one arena, so a buffer freed by any thread serves the next allocation of any other;
/// 2 MiB pages, so what is mapped is mapped in few faults; and by default no decay, so freed
/// pages stay mapped for the next op instead of going back to the kernel and being faulted in
/// again, zeroed (on the DiT step page faults fell from 3 M to 4 k and the step ran 2-3x faster;
/// docs/benchmarks.md). A Stable Diffusion 1.5 UNet's activations change size from level to
/// level, and with nothing returned its freed extents fragment: the resident set grew ~17 MB per
/// update (the tiny preset's run peaked at 3.47 GB); with a 10 s decay it stays at 281 MB over
/// 100 updates and the step is no slower (22.7 against 20.7 images/s), so a UNet's trainer
/// decays.
pub fn allocator_conf(r: &Resolved) -> String {
    let unet = matches!(&r.config.kind, Kind::Diffusion(d) if d.model.unet_config.is_some());
    let decay = if unet { 10_000 } else { -1 };
    format!("narenas:1,thp:always,dirty_decay_ms:{decay},muzzy_decay_ms:{decay}\0")
}

/// What every trainer has: its config, plan, sizes and CUDA kernels, and `compiled()`.
fn common_items(r: &Resolved, plan: &Plan, cuda: Option<&CudaBuild>) -> TokenStream {
    let rt = quote! { rt };

    let name = &r.stem;
    // Paths relative to the project root, so the binary resolves them against whichever root it
    // runs with (runtime train::Compiled::root): nothing depends on where the build ran.
    let relative = |p: &std::path::Path| relative_to(&r.project_root, p).display().to_string();
    let config_path = relative(&r.config.path);
    let project_root = r.project_root.display().to_string();
    let hub_cache = match &r.hub_cache {
        Some(p) => {
            let p = p.display().to_string();
            quote! { Some(#p) }
        }
        None => quote! { None },
    };
    let embedded = r.sources.files.iter().filter_map(|f| {
        let path = relative(f.path.as_ref()?);
        let (n, t) = (&f.name, &f.text);
        Some(quote! { (#n, #path, #t) })
    });
    let plan_text = plan.render();
    let crate::cuda::KernelSizes {
        norm,
        widths,
        tokens,
        scan_states,
        neighborhoods,
    } = crate::cuda::KernelSizes::of(plan);
    let (na_heads, na_kernels): (Vec<usize>, Vec<usize>) = neighborhoods.into_iter().unzip();
    let no_ptx = vec![];
    let ptx = cuda.map_or(&no_ptx, |c| &c.ptx).iter().map(|(arch, path)| {
        let path = path.display().to_string();
        quote! { (#arch, include_str!(#path)) }
    });
    let cuda_source = match cuda.map(|c| &c.source) {
        None => quote! { "" },
        Some(KernelText::Inline(text)) => quote! { #text },
        Some(KernelText::File(path)) => {
            let path = path.display().to_string();
            quote! { include_str!(#path) }
        }
    };
    let params = plan.params;
    let flops = plan.flops_per_step;
    let batch = plan.batch;
    let input = &plan.input;
    let input_rank = input.len();
    let allocator = proc_macro2::Literal::byte_string(allocator_conf(r).as_bytes());
    quote! {
        /// The config this trainer was compiled from.
        pub const CONFIG_NAME: &str = #name;
        /// The config file, relative to the project root.
        pub const CONFIG_PATH: &str = #config_path;
        /// The project root of the build: settings-relative paths resolve here when it exists on
        /// the machine the trainer runs on, else in the current directory.
        pub const PROJECT_ROOT: &str = #project_root;
        /// (display name, path, text) of every file in the config chain, as read at build time.
        pub const EMBEDDED: &[(&str, &str, &str)] = &[#(#embedded),*];
        /// The Hugging Face cache of the build (pretrained models found there are embedded).
        pub const HUB_CACHE: Option<&str> = #hub_cache;
        /// The shape plan, rendered (`--plan`).
        pub const PLAN: &str = #plan_text;
        pub const PARAMETERS: u64 = #params;
        pub const FLOPS_PER_STEP: u64 = #flops;
        pub const BATCH_SIZE: usize = #batch;
        /// Per-sample input shape; a sample of another shape is an error naming its file.
        pub const INPUT_SHAPE: [usize; #input_rank] = [#(#input),*];
        /// What the CUDA kernels are specialised to, and their PTX when nvcc built it.
        pub const CUDA_SIZES: #rt::KernelSizes = #rt::KernelSizes {
            norm: &[#(#norm),*],
            widths: &[#(#widths),*],
            tokens: &[#(#tokens),*],
            scan_states: &[#(#scan_states),*],
            neighborhoods: &[#((#na_heads, #na_kernels)),*],
        };
        pub const CUDA_PTX: &[(u32, &str)] = &[#(#ptx),*];
        /// The kernels' translation unit (empty in a CPU build), for NVRTC when CUDA_PTX is empty.
        pub const CUDA_SOURCE: &str = #cuda_source;
        /// jemalloc's options for this model (`allocator_conf` in config/src/codegen.rs; the
        /// `train` binary exports them), NUL-terminated.
        #[allow(dead_code)]
        pub const ALLOCATOR_CONF: &[u8] = #allocator;

        /// Everything above, for the runtime.
        pub fn compiled() -> #rt::Compiled {
            #rt::Compiled {
                config,
                name: CONFIG_NAME,
                config_path: CONFIG_PATH,
                project_root: PROJECT_ROOT,
                embedded: EMBEDDED,
                hub_cache: HUB_CACHE,
                plan: PLAN,
                parameters: PARAMETERS,
                flops_per_step: FLOPS_PER_STEP,
                batch_size: BATCH_SIZE,
                input_shape: &INPUT_SHAPE,
                tasks: &TASKS,
                cuda_sizes: CUDA_SIZES,
                cuda_ptx: CUDA_PTX,
                cuda_source: CUDA_SOURCE,
            }
        }
    }
}

/// A classifier: its backbone type and shape, and its tasks.
fn classification_items(c: &Classification) -> TokenStream {
    let rt = quote! { rt };
    let m = &c.model;
    let activation = format_ident!(
        "{}",
        match m.activation {
            Activation::Gelu => "Gelu",
            Activation::Relu => "Relu",
            Activation::LeakyRelu => "LeakyRelu",
            Activation::Silu => "Silu",
            Activation::Sigmoid => "Sigmoid",
            Activation::Tanh => "Tanh",
            Activation::PRelu => "PRelu",
        }
    );
    let (in_ch, emb, reps, dropout) = (
        m.input_channels,
        m.embedding_dim,
        m.layer_repeats,
        m.dropout,
    );

    let (model_ty, shape) = match m.backbone {
        Backbone::CnnLight => {
            let (stem, channels) = cnn_light_channels(m.embedding_dim, m.depth);
            let res = c.dataset.resolution;
            (
                quote! { #rt::CnnLight },
                quote! {
                    #rt::CnnLightShape {
                        in_channels: #in_ch, resolution: #res, stem: #stem, channels: &[#(#channels),*],
                        layer_repeats: #reps, embedding_dim: #emb,
                        activation: #rt::Activation::#activation, dropout: #dropout,
                    }
                },
            )
        }
        Backbone::Cnn => {
            let (stem, channels) = cnn_light_channels(m.embedding_dim, m.depth);
            let res = c.dataset.resolution;
            (
                quote! { #rt::Cnn },
                quote! {
                    #rt::CnnShape {
                        in_channels: #in_ch, resolution: #res, stem: #stem, channels: &[#(#channels),*],
                        layer_repeats: #reps, embedding_dim: #emb,
                        activation: #rt::Activation::#activation, dropout: #dropout,
                    }
                },
            )
        }
        Backbone::Transformer => {
            let t = transformer_tokens(c);
            let (patch, tokens, token_dim) = (t.patch, t.tokens, t.token_dim);
            let (hidden, layers, heads, ff) = (m.hidden_dim, m.num_layers, m.num_heads, m.ff_dim);
            let cls = m.pooling == Pooling::Cls;
            (
                quote! { #rt::Transformer },
                quote! {
                    #rt::TransformerShape {
                        patch: #patch, tokens: #tokens, token_dim: #token_dim, hidden: #hidden,
                        layers: #layers, heads: #heads, ff: #ff, cls: #cls, embedding_dim: #emb,
                        activation: #rt::Activation::#activation, dropout: #dropout,
                    }
                },
            )
        }
        Backbone::Cnn1d | Backbone::Cnn1dLight => {
            let (stem, channels, kernels) =
                cnn_1d_channels(m.input_channels, m.embedding_dim, m.depth);
            let len = c.dataset.sequence_length;
            (
                quote! { #rt::Cnn1d },
                quote! {
                    #rt::Cnn1dShape {
                        in_channels: #in_ch, length: #len, stem: #stem, channels: &[#(#channels),*],
                        kernels: &[#(#kernels),*], layer_repeats: #reps, embedding_dim: #emb,
                        activation: #rt::Activation::#activation, dropout: #dropout,
                    }
                },
            )
        }
    };
    let tasks = c.tasks.iter().map(|t| {
        let (n, col, enc, out) = (&t.name, &t.column, &t.encoder, t.outputs);
        let kind = match t.kind {
            TaskKind::Classification => quote! { #rt::TaskKind::Classification },
            TaskKind::Regression => quote! { #rt::TaskKind::Regression },
        };
        quote! { #rt::TaskSpec { name: #n, kind: #kind, outputs: #out, column: #col, encoder: #enc } }
    });
    let n_tasks = c.tasks.len();

    quote! {
        /// The backbone, with a head per task.
        pub type Model = #model_ty;
        /// Its shape, from `[model]` and the input the dataset gives it.
        pub const MODEL: <Model as #rt::Backbone>::Shape = #shape;
        /// The heads: each task's label column, how its text is encoded, its output width.
        pub const TASKS: [#rt::TaskSpec; #n_tasks] = [#(#tasks),*];

        /// Builds the model and trains it with `config()` (runtime `train::classification`).
        pub fn run(options: #rt::RunOptions) -> ::std::process::ExitCode {
            #rt::train_classifier::<Model>(&compiled(), &MODEL, options)
        }
    }
}

/// A denoiser (DiT, hourglass or LocalMamba): its shape and the metadata columns its
/// conditioning reads.
fn diffusion_items(d: &Diffusion) -> TokenStream {
    let rt = quote! { rt };
    let m = &d.model;
    let [height, width] = d.input_hw();
    let (cin, cout, heads, hd, layers) = (
        m.in_channels,
        m.out_channels,
        m.num_attention_heads,
        m.attention_head_dim,
        m.num_layers,
    );
    let [ph, pw] = m.patch_size;
    let num_embeds = dit_num_embeds(d);
    let norm_eps = m.norm_eps;
    let (dropout, attention_bias, norm_affine, upcast_attention) = (
        m.dropout,
        m.attention_bias,
        m.norm_elementwise_affine,
        m.upcast_attention,
    );
    let feed_forward: TokenStream = m
        .activation_fn
        .literal(&At::top(std::path::Path::new(""), 0))
        .parse()
        .expect("a choice literal is a path");
    let conditioning = match m.conditioning {
        Conditioning::Classes => {
            let n = m.num_classes;
            quote! { #rt::Conditioning::Classes { num_classes: #n } }
        }
        Conditioning::GenderHealthAge => quote! { #rt::Conditioning::GenderHealthAge },
        Conditioning::None => quote! { #rt::Conditioning::None },
        // resolve() refuses captions without a text encoder, and on the hourglass and LocalMamba.
        Conditioning::Caption => match &m.text_encoder_config {
            Some(t) => {
                // A UNet attends to the text states, an MMDiT to CLIP-L's and CLIP-G's side by
                // side; the other models take the pooled embedding.
                let dim = match (&m.unet_config, &m.text_encoder_2_config) {
                    (Some(_), _) => t.hidden_size,
                    (None, Some(g)) if m.mmdit_config.is_some() => t.hidden_size + g.hidden_size,
                    (None, _) => t.pooled_dim(),
                };
                quote! { #rt::Conditioning::Caption { dim: #dim } }
            }
            None => {
                let msg = "signal-diffusion: caption conditioning without a text encoder";
                return quote! { compile_error!(#msg); };
            }
        },
    };
    // The columns the conditioning reads, as tasks whose empty values mean "unknown" (null).
    let task = |name: &str, column: &str, encoder: &str, outputs: usize| {
        quote! { #rt::TaskSpec { name: #name, kind: #rt::TaskKind::Classification, outputs: #outputs, column: #column, encoder: #encoder } }
    };
    let ds = &d.dataset;
    let tasks: Vec<TokenStream> = match m.conditioning {
        Conditioning::Classes => vec![task(
            "class",
            ds.class_column.as_deref().unwrap_or("class"),
            "int",
            m.num_classes,
        )],
        Conditioning::GenderHealthAge => vec![
            task("gender", &ds.gender_column, "gender?", 2),
            task("health", &ds.health_column, "health?", 2),
            task("age", &ds.age_column, "float?", 1),
        ],
        // Each caption's index among the split's distinct captions (data/loader.rs).
        Conditioning::Caption => vec![task(
            "caption",
            ds.caption_column.as_deref().unwrap_or("caption"),
            "caption",
            1,
        )],
        Conditioning::None => vec![],
    };
    let n_tasks = tasks.len();
    let frame =
        quote! { #rt::Frame { conditioning: #conditioning, height: #height, width: #width } };
    let class_rows = skeleton_class_rows(d);
    let (mw, md, mf, mcond, mdrop) = (
        m.mapping_width,
        m.mapping_depth,
        m.mapping_d_ff,
        m.mapping_cond_dim,
        m.mapping_dropout_rate,
    );
    let shape = match m.name {
        DiffusionModel::Hourglass => {
            let levels = (0..m.widths.len()).map(|i| {
                let (depth, width, d_ff, d_head, drop) =
                    (m.depths[i], m.widths[i], m.d_ffs[i], m.d_heads[i], m.dropout_rates[i]);
                let k = m.kernel_sizes[i];
                // resolve() accepts only these four kinds.
                let attention = match m.attention[i].as_str() {
                    "neighborhood" => quote! { #rt::SelfAttention::Neighborhood { d_head: #d_head, kernel: #k } },
                    "shifted-window" => quote! { #rt::SelfAttention::ShiftedWindow { d_head: #d_head, window: #k } },
                    "none" => quote! { #rt::SelfAttention::None },
                    _ => quote! { #rt::SelfAttention::Global { d_head: #d_head } },
                };
                quote! { #rt::LevelShape { depth: #depth, width: #width, d_ff: #d_ff, attention: #attention, dropout: #drop } }
            });
            quote! {
                #rt::DenoiserShape::Hourglass {
                    hourglass: #rt::HourglassShape {
                        in_channels: #cin, out_channels: #cout, patch: [#ph, #pw],
                        levels: vec![#(#levels),*],
                        mapping_width: #mw, mapping_depth: #md, mapping_d_ff: #mf,
                        class_rows: #class_rows, mapping_cond_dim: #mcond, mapping_dropout: #mdrop,
                    },
                    frame: #frame,
                }
            }
        }
        DiffusionModel::LocalMamba => {
            let (dims, depths) = (&m.dims, &m.depths);
            let (d_state, ssm_ratio, drop_path) = (m.d_state, m.ssm_ratio, m.drop_path_rate);
            let d_conv = m.d_conv;
            let level_dropout = &m.dropout_rates;
            let dt_rank = match m.ssm_dt_rank {
                Some(r) => quote! { Some(#r) },
                None => quote! { None },
            };
            let scans = m.scan_directions.iter().map(|name| {
                let (base, flip) = match name.strip_suffix("_flip") {
                    Some(b) => (b, true),
                    None => (name.as_str(), false),
                };
                match base {
                    "h" => quote! { #rt::Scan::Rows { flip: #flip } },
                    "v" => quote! { #rt::Scan::Columns { flip: #flip } },
                    // resolve() accepts only h, v and wK.
                    _ => {
                        let size: usize = base[1..].parse().expect("a validated wK scan");
                        quote! { #rt::Scan::Windows { size: #size, flip: #flip } }
                    }
                }
            });
            quote! {
                #rt::DenoiserShape::LocalMamba {
                    localmamba: #rt::LocalMambaShape {
                        in_channels: #cin, out_channels: #cout, patch: [#ph, #pw],
                        dims: vec![#(#dims),*], depths: vec![#(#depths),*],
                        d_state: #d_state, ssm_ratio: #ssm_ratio, d_conv: #d_conv, dt_rank: #dt_rank,
                        scans: vec![#(#scans),*],
                        mapping_width: #mw, mapping_depth: #md, mapping_d_ff: #mf,
                        class_rows: #class_rows, mapping_cond_dim: #mcond, dropout: #mdrop,
                        level_dropout: vec![#(#level_dropout),*], drop_path: #drop_path,
                    },
                    frame: #frame,
                }
            }
        }
        DiffusionModel::StableDiffusion15 => {
            // resolve() reads the UNet's config.json for every SD 1.5 config.
            let unet: TokenStream = match &m.unet_config {
                Some(u) => u
                    .literal(&At::top(std::path::Path::new(""), 0))
                    .parse()
                    .expect("a struct literal parses"),
                None => {
                    let msg = "signal-diffusion: Stable Diffusion 1.5 without its UNet's config";
                    return quote! { compile_error!(#msg); };
                }
            };
            let text_tokens = m
                .text_encoder_config
                .as_ref()
                .map_or(77, |t| t.max_position_embeddings);
            quote! { #rt::DenoiserShape::Unet { unet: #unet, text_tokens: #text_tokens, frame: #frame } }
        }
        DiffusionModel::StableDiffusion35 => {
            // resolve() reads the transformer's config.json for every SD 3.5 config.
            let mmdit: TokenStream = match &m.mmdit_config {
                Some(t) => t
                    .literal(&At::top(std::path::Path::new(""), 0))
                    .parse()
                    .expect("a struct literal parses"),
                None => {
                    let msg =
                        "signal-diffusion: Stable Diffusion 3.5 without its transformer's config";
                    return quote! { compile_error!(#msg); };
                }
            };
            let text_tokens = m
                .text_encoder_config
                .as_ref()
                .map_or(77, |t| t.max_position_embeddings);
            quote! { #rt::DenoiserShape::Mmdit { mmdit: #mmdit, text_tokens: #text_tokens, frame: #frame } }
        }
        _ => quote! {
            #rt::DenoiserShape::Dit(#rt::DitShape {
                in_channels: #cin, out_channels: #cout, height: #height, width: #width,
                patch: [#ph, #pw], heads: #heads, head_dim: #hd, layers: #layers,
                num_embeds: #num_embeds, conditioning: #conditioning, norm_eps: #norm_eps,
                dropout: #dropout, attention_bias: #attention_bias, feed_forward: #feed_forward,
                norm_affine: #norm_affine, upcast_attention: #upcast_attention,
            })
        },
    };
    quote! {
        /// The denoiser (the trainer builds it from `MODEL`).
        #[allow(dead_code)]
        pub type Model = #rt::Denoiser;
        /// Its shape, from `[model]` and the image or series the dataset gives it.
        pub static MODEL: ::std::sync::LazyLock<#rt::DenoiserShape> =
            ::std::sync::LazyLock::new(|| #shape);
        /// The metadata columns its conditioning reads (empty values mean "unknown").
        pub const TASKS: [#rt::TaskSpec; #n_tasks] = [#(#tasks),*];

        /// Builds the model and trains it with `config()` (runtime `train::diffusion`).
        pub fn run(options: #rt::RunOptions) -> ::std::process::ExitCode {
            #rt::train_diffusion(&compiled(), &MODEL, options)
        }
    }
}

/// The generated file: a header naming the config, then the items, formatted.
pub fn generate(r: &Resolved, cuda: Option<&CudaBuild>) -> String {
    let pretty = |tokens: TokenStream| {
        spaced(&prettyplease::unparse(
            &syn::parse2(tokens).expect("generated code parses"),
        ))
    };
    let header = format!(
        "// @generated by signal-diffusion-config from {}. Do not edit: change the TOML and rebuild.\n",
        relative_to(&r.project_root, &r.config.path).display(),
    );
    match items(r, cuda) {
        Ok(items) => format!(
            "{header}\n{}\n{}\n{}",
            pretty(items.imports),
            items.config,
            pretty(items.rest)
        ),
        Err(e) => format!("{header}\n{}", pretty(e)),
    }
}

/// A blank line before each top-level item that follows another (prettyplease packs them).
fn spaced(text: &str) -> String {
    let mut out = String::new();
    let mut previous = "";
    for line in text.lines() {
        let item_start = ["pub ", "///", "#[", "use "]
            .iter()
            .any(|p| line.starts_with(p));
        let attached =
            previous.is_empty() || previous.starts_with("///") || previous.starts_with("#[");
        if item_start && !attached {
            out.push('\n');
        }
        out += line;
        out.push('\n');
        previous = line;
    }
    out
}
