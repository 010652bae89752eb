//! Pretrained models from local files, never the network: a VAE named by `model.extras.vae` (or
//! the settings' `hf_models.stable_diffusion_model_id`) is a directory, or a model in the local
//! Hugging Face cache, found at build time; its `config.json` gives the latent shape the plan
//! is computed with, and becomes one of the config's sources (rebuilt when it changes, embedded
//! in the trainer). Nothing is downloaded: a model that is not on this machine is a build error
//! that lists every place searched and how to fetch it on a connected one.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::choice::DiffusionModel;
use crate::diag::Sources;
use crate::literal::literal;
use crate::settings::{normalize, resolve_config_ref, Env};
use crate::tree::Ctx;

literal! {
    /// A diffusers `AutoencoderKL`, as its `config.json` describes it.
    #[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
    pub struct Vae {
        /// The directory holding `config.json` and the weights.
        pub dir: PathBuf,
        pub in_channels: usize,
        pub out_channels: usize,
        pub latent_channels: usize,
        pub block_out_channels: Vec<usize>,
        pub layers_per_block: usize,
        pub norm_num_groups: usize,
        /// diffusers' tile size: with `enable_tiling`, images larger than this are encoded in
        /// tiles (smaller ones whole).
        pub sample_size: usize,
        /// latent = (mean + σ·ε − shift) · scale, as diffusers' pipelines apply them.
        pub scaling_factor: f64,
        pub shift_factor: f64,
        pub use_quant_conv: bool,
        pub use_post_quant_conv: bool,
        pub mid_block_add_attention: bool,
    }
}

literal! {
    /// A transformers CLIP text encoder (`CLIPTextModel`, or `CLIPTextModelWithProjection` when
    /// it has a projection), as its `config.json` describes it, and its tokenizer's directory.
    #[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
    pub struct ClipText {
        /// The directory holding `config.json` and `model.safetensors`.
        pub dir: PathBuf,
        /// The directory holding `vocab.json` and `merges.txt`.
        pub tokenizer_dir: PathBuf,
        pub vocab_size: usize,
        pub hidden_size: usize,
        pub intermediate_size: usize,
        pub num_hidden_layers: usize,
        pub num_attention_heads: usize,
        pub max_position_embeddings: usize,
        /// "quick_gelu" (CLIP-L) or "gelu" (CLIP-G).
        pub hidden_act: String,
        pub layer_norm_eps: f64,
        /// The pooled embedding's projection (`text_projection`), when the model has one.
        pub projection_dim: Option<usize>,
        /// The pooled token: the first `eos_token_id`, or with the legacy id 2, the highest id.
        pub eos_token_id: usize,
    }
}

literal! {
    /// A Stable Diffusion 1.5-style UNet (diffusers' `UNet2DConditionModel`), as its
    /// `unet/config.json` describes it: the numbers that shape the model.
    #[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
    pub struct Unet {
        /// The directory holding `config.json` and the weights.
        pub dir: PathBuf,
        pub in_channels: usize,
        pub out_channels: usize,
        pub block_out_channels: Vec<usize>,
        /// Per down block: `CrossAttnDownBlock2D` (true) or `DownBlock2D`.
        pub down_attention: Vec<bool>,
        /// Per up block, from the bottom: `CrossAttnUpBlock2D` (true) or `UpBlock2D`.
        pub up_attention: Vec<bool>,
        pub layers_per_block: usize,
        pub cross_attention_dim: usize,
        /// Attention heads per down block (SD 1.5's config names them `attention_head_dim`).
        pub heads: Vec<usize>,
        pub norm_num_groups: usize,
        pub norm_eps: f64,
        /// The timestep sinusoid's `freq_shift` (`flip_sin_to_cos` must be true).
        pub freq_shift: f64,
        /// Linear `proj_in` / `proj_out` (SD 2's) rather than 1×1 convolutions (SD 1.5's).
        pub use_linear_projection: bool,
        /// The latent side the model was trained at.
        pub sample_size: usize,
    }
}

/// A diffusers `UNet2DConditionModel` config.json (`text`, in `dir`), checked to be one the
/// runtime builds: SD 1.5's blocks, one transformer layer per block, default attention.
pub fn parse_unet(text: &str, dir: &Path) -> Result<Unet, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let count = |x: &serde_json::Value, k: &str| -> Result<usize, String> {
        x.as_u64()
            .filter(|&n| n >= 1)
            .map(|n| n as usize)
            .ok_or(format!("`{k}` must be a positive integer, not {x}"))
    };
    let counts = |k: &str| -> Result<Vec<usize>, String> {
        v[k].as_array()
            .ok_or(format!("`{k}` must be a list"))?
            .iter()
            .map(|x| count(x, k))
            .collect()
    };
    let types = |k: &str, plain: &str, attn: &str| -> Result<Vec<bool>, String> {
        v[k].as_array()
            .ok_or(format!("`{k}` must be a list"))?
            .iter()
            .map(|t| match t.as_str() {
                Some(t) if t == plain => Ok(false),
                Some(t) if t == attn => Ok(true),
                _ => Err(format!(
                    "`{k}` holds {t}; the blocks built are {plain} and {attn}"
                )),
            })
            .collect()
    };
    let channels = counts("block_out_channels")?;
    let down = types("down_block_types", "DownBlock2D", "CrossAttnDownBlock2D")?;
    let up = types("up_block_types", "UpBlock2D", "CrossAttnUpBlock2D")?;
    if down.len() != channels.len() || up.len() != channels.len() {
        return Err("`down_block_types`, `up_block_types` and `block_out_channels` must have one entry per level".into());
    }
    // diffusers reads `num_attention_heads`, else (SD 1.5's naming) `attention_head_dim`, as the
    // head count: one for every block or one per block.
    let heads_value = match &v["num_attention_heads"] {
        serde_json::Value::Null => &v["attention_head_dim"],
        h => h,
    };
    let heads = match heads_value {
        serde_json::Value::Array(_) => counts(if v["num_attention_heads"].is_null() {
            "attention_head_dim"
        } else {
            "num_attention_heads"
        })?,
        h => vec![count(h, "attention_head_dim")?; channels.len()],
    };
    let groups = count(&v["norm_num_groups"], "norm_num_groups")?;
    for (&c, &h) in channels.iter().zip(&heads) {
        if c % groups != 0 || c % h != 0 {
            return Err(format!("a level of {c} channels needs them divisible by `norm_num_groups` ({groups}) and its {h} heads"));
        }
    }
    let is = |k: &str, want: serde_json::Value| v.get(k).is_none_or(|x| x.is_null() || *x == want);
    let unsupported = [
        (
            "mid_block_type",
            is("mid_block_type", "UNetMidBlock2DCrossAttn".into()),
        ),
        (
            "transformer_layers_per_block",
            is("transformer_layers_per_block", 1.into()),
        ),
        ("flip_sin_to_cos", is("flip_sin_to_cos", true.into())),
        ("act_fn", is("act_fn", "silu".into())),
        ("attention_type", is("attention_type", "default".into())),
        (
            "class_embed_type",
            is("class_embed_type", serde_json::Value::Null),
        ),
        (
            "addition_embed_type",
            is("addition_embed_type", serde_json::Value::Null),
        ),
        (
            "encoder_hid_dim",
            is("encoder_hid_dim", serde_json::Value::Null),
        ),
        (
            "only_cross_attention",
            is("only_cross_attention", false.into()),
        ),
        (
            "dual_cross_attention",
            is("dual_cross_attention", false.into()),
        ),
        (
            "resnet_time_scale_shift",
            is("resnet_time_scale_shift", "default".into()),
        ),
        (
            "time_embedding_type",
            is("time_embedding_type", "positional".into()),
        ),
        ("conv_in_kernel", is("conv_in_kernel", 3.into())),
        ("conv_out_kernel", is("conv_out_kernel", 3.into())),
        (
            "center_input_sample",
            is("center_input_sample", false.into()),
        ),
    ];
    if let Some((key, _)) = unsupported.iter().find(|(_, ok)| !ok) {
        return Err(format!(
            "`{key}` is {}; the UNet built is Stable Diffusion 1.5's (see docs/config.md)",
            v[key]
        ));
    }
    Ok(Unet {
        dir: dir.to_path_buf(),
        in_channels: count(&v["in_channels"], "in_channels")?,
        out_channels: count(&v["out_channels"], "out_channels")?,
        block_out_channels: channels,
        down_attention: down,
        up_attention: up,
        layers_per_block: count(&v["layers_per_block"], "layers_per_block")?,
        cross_attention_dim: count(&v["cross_attention_dim"], "cross_attention_dim")?,
        heads,
        norm_num_groups: groups,
        norm_eps: v["norm_eps"].as_f64().unwrap_or(1e-5),
        freq_shift: v["freq_shift"].as_f64().unwrap_or(0.0),
        use_linear_projection: v["use_linear_projection"].as_bool().unwrap_or(false),
        sample_size: count(&v["sample_size"], "sample_size")?,
    })
}

literal! {
    /// A Stable Diffusion 3 / 3.5 MMDiT (diffusers' `SD3Transformer2DModel`), as its
    /// `transformer/config.json` describes it.
    #[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
    pub struct Mmdit {
        /// The directory holding `config.json` and the weights.
        pub dir: PathBuf,
        pub sample_size: usize,
        pub patch_size: usize,
        pub in_channels: usize,
        pub out_channels: usize,
        pub num_layers: usize,
        pub attention_head_dim: usize,
        pub num_attention_heads: usize,
        /// The text tokens' width (CLIP-L ‖ CLIP-G padded to T5's 4096).
        pub joint_attention_dim: usize,
        /// The pooled text vector's width (CLIP-L's 768 ‖ CLIP-G's 1280).
        pub pooled_projection_dim: usize,
        /// The side of the position table the image's grid is cropped from (its centre).
        pub pos_embed_max_size: usize,
        /// The blocks with SD 3.5's second, image-only attention.
        pub dual_attention_layers: Vec<usize>,
        /// RMSNorm on each head's queries and keys (SD 3.5's `qk_norm = "rms_norm"`).
        pub qk_norm: bool,
    }
}

/// The T5 token count of SD 3's text sequence: diffusers' `StableDiffusion3Pipeline` default
/// `max_sequence_length`, zeros when T5 is not loaded.
pub const SD3_T5_TOKENS: usize = 256;

impl Mmdit {
    pub fn dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
}

/// A diffusers `SD3Transformer2DModel` config.json (`text`, in `dir`), checked to be one the
/// runtime builds.
pub fn parse_mmdit(text: &str, dir: &Path) -> Result<Mmdit, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let count = |k: &str| -> Result<usize, String> {
        v[k].as_u64()
            .filter(|&n| n >= 1)
            .map(|n| n as usize)
            .ok_or(format!("`{k}` must be a positive integer, not {}", v[k]))
    };
    let (heads, head_dim) = (count("num_attention_heads")?, count("attention_head_dim")?);
    let caption = count("caption_projection_dim")?;
    if caption != heads * head_dim {
        return Err(format!(
            "`caption_projection_dim` is {caption}; the model's width, heads × head size, is {}",
            heads * head_dim
        ));
    }
    let layers = count("num_layers")?;
    let dual: Vec<usize> = match &v["dual_attention_layers"] {
        serde_json::Value::Null => vec![],
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| x.as_u64().map(|n| n as usize).filter(|&n| n < layers))
            .collect::<Option<_>>()
            .ok_or(format!(
                "`dual_attention_layers` must list blocks below `num_layers` ({layers})"
            ))?,
        other => {
            return Err(format!(
                "`dual_attention_layers` must be a list, not {other}"
            ))
        }
    };
    let qk_norm = match v["qk_norm"].as_str() {
        None if v["qk_norm"].is_null() => false,
        Some("rms_norm") => true,
        _ => {
            return Err(format!(
                "`qk_norm` is {}; none and \"rms_norm\" are built",
                v["qk_norm"]
            ))
        }
    };
    let pos = count("pos_embed_max_size")?;
    let (sample, patch) = (count("sample_size")?, count("patch_size")?);
    Ok(Mmdit {
        dir: dir.to_path_buf(),
        sample_size: sample,
        patch_size: patch,
        in_channels: count("in_channels")?,
        out_channels: v["out_channels"]
            .as_u64()
            .map_or(count("in_channels")?, |n| n as usize),
        num_layers: layers,
        attention_head_dim: head_dim,
        num_attention_heads: heads,
        joint_attention_dim: count("joint_attention_dim")?,
        pooled_projection_dim: count("pooled_projection_dim")?,
        pos_embed_max_size: pos,
        dual_attention_layers: dual,
        qk_norm,
    })
}

impl ClipText {
    /// The width of the pooled embedding: the projection's, else the hidden size.
    pub fn pooled_dim(&self) -> usize {
        self.projection_dim.unwrap_or(self.hidden_size)
    }
}

/// A transformers CLIP text encoder's config.json (`text`, in `dir`), with the tokenizer of
/// `tokenizer_dir`; checked to be one the runtime builds.
pub fn parse_clip_text(text: &str, dir: &Path, tokenizer_dir: &Path) -> Result<ClipText, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let count = |k: &str| -> Result<usize, String> {
        v.get(k)
            .and_then(|x| x.as_u64())
            .filter(|&n| n >= 1)
            .map(|n| n as usize)
            .ok_or(format!("`{k}` must be a positive integer"))
    };
    let with_projection = v["architectures"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x == "CLIPTextModelWithProjection"));
    let hidden_act = v["hidden_act"].as_str().unwrap_or("quick_gelu").to_string();
    if !["quick_gelu", "gelu"].contains(&hidden_act.as_str()) {
        return Err(format!(
            "`hidden_act` is \"{hidden_act}\"; quick_gelu and gelu are built"
        ));
    }
    let (hidden, heads) = (count("hidden_size")?, count("num_attention_heads")?);
    if hidden % heads != 0 {
        return Err(format!(
            "{heads} heads do not divide `hidden_size` = {hidden}"
        ));
    }
    Ok(ClipText {
        dir: dir.to_path_buf(),
        tokenizer_dir: tokenizer_dir.to_path_buf(),
        vocab_size: count("vocab_size")?,
        hidden_size: hidden,
        intermediate_size: count("intermediate_size")?,
        num_hidden_layers: count("num_hidden_layers")?,
        num_attention_heads: heads,
        max_position_embeddings: count("max_position_embeddings")?,
        hidden_act,
        layer_norm_eps: v["layer_norm_eps"].as_f64().unwrap_or(1e-5),
        projection_dim: match with_projection {
            true => Some(count("projection_dim")?),
            false => None,
        },
        eos_token_id: v["eos_token_id"].as_u64().unwrap_or(2) as usize,
    })
}

impl Vae {
    /// Pixels per latent along each side: the encoder halves the image at every block but the
    /// last.
    pub fn downscale(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// The Hugging Face hub cache of this process, by huggingface_hub's precedence: `HF_HUB_CACHE`,
/// `HUGGINGFACE_HUB_CACHE`, `$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub`,
/// `~/.cache/huggingface/hub`.
pub fn hub_cache_from(
    var: impl Fn(&str) -> Option<String>,
    home: Option<&Path>,
) -> Option<PathBuf> {
    let var = |k: &str| var(k).filter(|v| !v.is_empty());
    var("HF_HUB_CACHE")
        .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
        .map(PathBuf::from)
        .or_else(|| var("HF_HOME").map(|h| Path::new(&h).join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|x| Path::new(&x).join("huggingface/hub")))
        .or_else(|| home.map(|h| h.join(".cache/huggingface/hub")))
}

/// Where a model was looked for, in order, when it was not found.
#[derive(Debug, Default)]
pub struct Searched(pub Vec<String>);

/// What a model directory must hold: one of `files` (the first found counts), looked for in
/// `subfolder` (a diffusers pipeline's `vae/` or `transformer/`), then in the directory itself.
pub struct Wanted<'a> {
    pub subfolder: &'a str,
    pub files: &'a [&'a str],
    /// Whether a file is there: the config's embedded copies for `config.json` when `--set`
    /// re-resolves it, the disk for weights (never embedded).
    pub exists: &'a dyn Fn(&Path) -> bool,
}

impl Wanted<'_> {
    /// `dir/subfolder` or `dir` when one holds a wanted file; else notes what was looked for.
    fn find_in(&self, dir: &Path, searched: &mut Searched) -> Option<PathBuf> {
        for d in [dir.join(self.subfolder), dir.to_path_buf()] {
            if self.files.iter().any(|f| (self.exists)(&d.join(f))) {
                return Some(d);
            }
            searched.0.push(match self.files {
                [one] => d.join(one).display().to_string(),
                many => format!("{}/{{{}}}", d.display(), many.join(", ")),
            });
        }
        None
    }
}

/// The directory of a model `spec` names that holds a `wanted` file: `spec` as the directory
/// `local` (the path it names); else, for an `owner/name` id, its snapshot in the hub cache at
/// `revision` (a commit hash, or a ref such as `main`). Files read on the way (a ref) are added
/// to `sources`.
pub fn locate(
    env: &Env,
    sources: &mut Sources,
    (spec, local): (&str, &Path),
    revision: Option<&str>,
    wanted: &Wanted,
) -> Result<PathBuf, Searched> {
    let mut searched = Searched::default();
    if let Some(dir) = wanted.find_in(local, &mut searched) {
        return Ok(dir);
    }
    if !is_hub_id(spec) {
        return Err(searched);
    }
    let Some(cache) = &env.hub_cache else {
        searched.0.push(
            "the Hugging Face cache (none: HF_HUB_CACHE, HF_HOME and HOME are all unset)".into(),
        );
        return Err(searched);
    };
    let repo = cache.join(format!("models--{}", spec.replace('/', "--")));
    let rev = revision.unwrap_or("main");
    let snapshot = if rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()) {
        repo.join("snapshots").join(rev)
    } else {
        let ref_file = repo.join("refs").join(rev);
        match env.read(&ref_file) {
            Ok(text) => {
                let sha = text.trim().to_string();
                sources.add(ref_file.display().to_string(), Some(ref_file), text);
                repo.join("snapshots").join(sha)
            }
            Err(_) => {
                searched
                    .0
                    .push(format!("{} (the revision `{rev}`)", ref_file.display()));
                return Err(searched);
            }
        }
    };
    wanted.find_in(&snapshot, &mut searched).ok_or(searched)
}

/// `owner/name`, as the Hub names models.
fn is_hub_id(spec: &str) -> bool {
    spec.split('/').count() == 2
        && !spec.starts_with(['.', '/', '~'])
        && spec.split('/').all(|s| !s.is_empty())
}

/// The weights of a diffusers model directory: the single safetensors file, its fp16 variant,
/// or the shard index (`None` when there is none).
pub fn weights_in(dir: &Path, is_file: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    ["", ".fp16"]
        .iter()
        .flat_map(|variant| {
            [
                format!("diffusion_pytorch_model{variant}.safetensors"),
                format!("diffusion_pytorch_model{variant}.safetensors.index.json"),
            ]
        })
        .map(|name| dir.join(name))
        .find(|p| is_file(p))
}

/// The weight files a model's directory may hold, in the order they are read: ours (a
/// diffusers DiT's for DiT), a generic `model.safetensors`, and the file the reference's training
/// writes (diffusers' PyTorch pickle for a DiT).
pub fn weight_files(model: DiffusionModel) -> [&'static str; 3] {
    match model {
        DiffusionModel::Hourglass => [
            "hourglass_model.safetensors",
            "model.safetensors",
            "hourglass_model.pt",
        ],
        DiffusionModel::LocalMamba => [
            "localmamba_model.safetensors",
            "model.safetensors",
            "localmamba_model.pt",
        ],
        _ => [
            "diffusion_pytorch_model.safetensors",
            "model.safetensors",
            "diffusion_pytorch_model.bin",
        ],
    }
}

/// `spec` as a path: absolute, `~/`, `./` or `../` from the file that wrote `key`, else from the
/// project root (as `[settings].config`).
fn as_path(ctx: &Ctx, env: &Env, sources: &Sources, spec: &str, key: &str) -> PathBuf {
    match ctx.loc(key) {
        Some(loc) => resolve_config_ref(env, sources, spec, &loc),
        None => normalize(&env.project_root.join(env.expand_home(spec))),
    }
}

/// The weights `model.pretrained` names, found at build time: a file; a directory (or its
/// `transformer/` subfolder, as diffusers pipelines lay DiTs out) holding one of `files`; or
/// the snapshot of a Hugging Face id in the local cache. Else an error at the key listing every
/// place searched.
pub fn read_pretrained(
    ctx: &mut Ctx,
    env: &Env,
    sources: &mut Sources,
    spec: &str,
    revision: Option<&str>,
    files: &[&str],
) -> Option<PathBuf> {
    let key = "model.pretrained";
    let local = as_path(ctx, env, sources, spec, key);
    if local.is_file() {
        return Some(local);
    }
    let exists = |p: &Path| p.is_file();
    let wanted = Wanted {
        subfolder: "transformer",
        files,
        exists: &exists,
    };
    match locate(env, sources, (spec, &local), revision, &wanted) {
        Ok(dir) => Some(dir),
        Err(Searched(paths)) => {
            ctx.error(
                key,
                format!(
                    "no pretrained weights `{spec}` on this machine (models are read from local files only); searched:\n  {}",
                    paths.join("\n  ")
                ),
            )
            .help = Some(match is_hub_id(spec) {
                true => format!("download them on a connected machine with `huggingface-cli download {spec}` and copy the cache (HF_HOME), or set `model.pretrained` to the weights file or their directory"),
                false => "set `model.pretrained` to the weights file or their directory (absolute, `./` from this file, or from the project root)".into(),
            });
            None
        }
    }
}

/// A model's `config.json`, found as `locate` finds it (in `subfolder` of a pipeline) and read:
/// (its directory, its text), added to the config's sources. Not found, an error at `key` naming
/// the `what` and every path searched, with `help`.
pub(crate) fn read_config(
    ctx: &mut Ctx,
    env: &Env,
    sources: &mut Sources,
    (spec, key, revision): (&str, &str, Option<&str>),
    (what, subfolder): (&str, &str),
    help: String,
) -> Option<(PathBuf, String)> {
    let local = as_path(ctx, env, sources, spec, key);
    let exists = |p: &Path| env.is_file(p);
    let wanted = Wanted {
        subfolder,
        files: &["config.json"],
        exists: &exists,
    };
    let dir = match locate(env, sources, (spec, &local), revision, &wanted) {
        Ok(dir) => dir,
        Err(Searched(paths)) => {
            ctx.error(
                key,
                format!(
                    "no {what} `{spec}` on this machine (models are read from local files only); searched:\n  {}",
                    paths.join("\n  ")
                ),
            )
            .help = Some(help);
            return None;
        }
    };
    let path = dir.join("config.json");
    match env.read(&path) {
        Ok(text) => {
            sources.add(path.display().to_string(), Some(path), text.clone());
            Some((dir, text))
        }
        Err(e) => {
            ctx.error(key, format!("cannot read {}: {e}", path.display()));
            None
        }
    }
}

/// The CLIP text encoder `spec` names (a directory holding its config.json, or a diffusers
/// pipeline's `subfolder`, locally or in the hub cache: `text_encoder/`, or SD 3's second,
/// `text_encoder_2/`) with its tokenizer (`tokenizer/` or `tokenizer_2/` beside a pipeline's
/// encoder, else the same directory), or errors at `key`.
pub fn read_clip_text(
    ctx: &mut Ctx,
    env: &Env,
    sources: &mut Sources,
    (spec, key): (&str, &str),
    revision: Option<&str>,
    subfolder: &str,
) -> Option<ClipText> {
    let id = if is_hub_id(spec) {
        spec
    } else {
        "openai/clip-vit-large-patch14"
    };
    // A pipeline's `text_encoder_2/` is read with its `tokenizer_2/`.
    let tokenizer_folder = subfolder.replace("text_encoder", "tokenizer");
    let help = format!(
        "download it on a connected machine (`huggingface-cli download {id} --include \"{subfolder}/*\" \"{tokenizer_folder}/*\"`) and copy the cache (HF_HOME), or set `model.extras.text_encoder` to a directory holding a CLIP text encoder's config.json, model.safetensors and its tokenizer"
    );
    let (dir, text) = read_config(
        ctx,
        env,
        sources,
        (spec, key, revision),
        ("text encoder", subfolder),
        help,
    )?;
    let tokenizer = match dir.file_name().is_some_and(|n| n == subfolder) {
        true => dir.with_file_name(&tokenizer_folder),
        false => dir.clone(),
    };
    // The tokenizer is read at run time (its vocabulary is not embedded): on the disk.
    let missing: Vec<String> = ["vocab.json", "merges.txt"]
        .iter()
        .map(|f| tokenizer.join(f))
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() && env.embedded.is_none() {
        let missing = missing.join(", ");
        ctx.error(
            key,
            format!("the text encoder's tokenizer is missing: {missing}"),
        );
        return None;
    }
    parse_clip_text(&text, &dir, &tokenizer)
        .map_err(|why| {
            ctx.error(key, format!("{}: {why}", dir.join("config.json").display()))
                .help = Some(
                "the text encoder must be a transformers CLIPTextModel(WithProjection)".into(),
            );
        })
        .ok()
}

/// The VAE a latent-space config trains in, found and read, or errors at the key that named it.
/// `spec` is `model.extras.vae`, else the settings' `stable_diffusion_model_id`
/// (`settings_key`), whose VAE is in its `vae/` subfolder as in every diffusers pipeline.
pub fn read_vae(
    ctx: &mut Ctx,
    env: &Env,
    sources: &mut Sources,
    (spec, key): (&str, &str),
    revision: Option<&str>,
) -> Option<Vae> {
    let id = if is_hub_id(spec) {
        spec
    } else {
        "stabilityai/stable-diffusion-3.5-medium"
    };
    let help = format!(
        "download it on a connected machine with `huggingface-cli download {id} --include \"vae/*\"` and copy the cache (HF_HOME), or set `model.extras.vae` to a directory holding the VAE's config.json and diffusion_pytorch_model.safetensors"
    );
    let (dir, text) = read_config(
        ctx,
        env,
        sources,
        (spec, key, revision),
        ("VAE", "vae"),
        help,
    )?;
    parse_vae(&text, &dir)
        .map_err(|why| {
            ctx.error(key, format!("{}: {why}", dir.join("config.json").display()))
                .help =
                Some("the VAE must be a diffusers AutoencoderKL (its `vae/config.json`)".into());
        })
        .ok()
}

/// A diffusers `AutoencoderKL` config.json (`text`, in `dir`), checked to be one the runtime builds.
pub fn parse_vae(text: &str, dir: &Path) -> Result<Vae, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let class = v["_class_name"].as_str().unwrap_or("AutoencoderKL");
    if class != "AutoencoderKL" {
        return Err(format!(
            "`_class_name` is \"{class}\", not \"AutoencoderKL\""
        ));
    }
    let count = |k: &str, default: Option<usize>| -> Result<usize, String> {
        match v.get(k) {
            Some(x) => x
                .as_u64()
                .filter(|&n| n >= 1)
                .map(|n| n as usize)
                .ok_or(format!("`{k}` must be a positive integer, not {x}")),
            None => default.ok_or(format!("`{k}` is missing")),
        }
    };
    let number = |k: &str, default: f64| -> Result<f64, String> {
        match v.get(k) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(x) => x.as_f64().ok_or(format!("`{k}` must be a number, not {x}")),
        }
    };
    let flag = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(true);
    let block_out_channels: Vec<usize> = v["block_out_channels"]
        .as_array()
        .ok_or("`block_out_channels` is missing")?
        .iter()
        .map(|x| x.as_u64().map(|n| n as usize).filter(|&n| n >= 1))
        .collect::<Option<_>>()
        .ok_or("`block_out_channels` must list positive integers")?;
    if block_out_channels.is_empty() {
        return Err("`block_out_channels` is empty".into());
    }
    for (k, block) in [
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ] {
        if let Some(list) = v.get(k).and_then(|x| x.as_array()) {
            if list.len() != block_out_channels.len() || list.iter().any(|b| b != block) {
                return Err(format!(
                    "`{k}` must be {} × \"{block}\" (one per block_out_channels)",
                    block_out_channels.len()
                ));
            }
        }
    }
    if let Some(act) = v.get("act_fn").and_then(|x| x.as_str()) {
        if act != "silu" {
            return Err(format!("`act_fn` is \"{act}\"; only \"silu\" is built"));
        }
    }
    let norm_num_groups = count("norm_num_groups", Some(32))?;
    if let Some(c) = block_out_channels
        .iter()
        .find(|&&c| c % norm_num_groups != 0)
    {
        return Err(format!(
            "`norm_num_groups` = {norm_num_groups} does not divide the block width {c}"
        ));
    }
    Ok(Vae {
        dir: dir.to_path_buf(),
        in_channels: count("in_channels", Some(3))?,
        out_channels: count("out_channels", Some(3))?,
        latent_channels: count("latent_channels", Some(4))?,
        block_out_channels,
        layers_per_block: count("layers_per_block", Some(1))?,
        norm_num_groups,
        sample_size: count("sample_size", Some(32))?,
        scaling_factor: number("scaling_factor", 0.18215)?,
        shift_factor: number("shift_factor", 0.0)?,
        use_quant_conv: flag("use_quant_conv"),
        use_post_quant_conv: flag("use_post_quant_conv"),
        mid_block_add_attention: flag("mid_block_add_attention"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[&str]) -> (tempdir::Dir, Env) {
        let dir = tempdir::Dir::new();
        for f in files {
            let (path, text) = f.split_once('=').unwrap_or((f, "{}"));
            let p = dir.0.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let mut env = Env::isolated(dir.0.join("project"));
        env.hub_cache = Some(dir.0.join("hub"));
        (dir, env)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static N: AtomicUsize = AtomicUsize::new(0);
                let p = std::env::temp_dir().join(format!(
                    "sd-pretrained-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    /// `locate` a VAE named by `spec`, a path relative to the project root or a hub id.
    fn find(
        env: &Env,
        sources: &mut Sources,
        spec: &str,
        revision: Option<&str>,
    ) -> Result<PathBuf, Searched> {
        let local = env.project_root.join(spec);
        let exists = |p: &Path| env.is_file(p);
        let wanted = Wanted {
            subfolder: "vae",
            files: &["config.json"],
            exists: &exists,
        };
        locate(env, sources, (spec, &local), revision, &wanted)
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn a_hub_id_resolves_through_its_ref_to_the_snapshot_subfolder() {
        let (d, env) = tree(&[
            &format!("hub/models--org--model/refs/main={SHA}\n"),
            &format!("hub/models--org--model/snapshots/{SHA}/vae/config.json"),
            "hub/models--org--model/refs/v2=ffffffffffffffffffffffffffffffffffffffff",
            "hub/models--org--model/snapshots/ffffffffffffffffffffffffffffffffffffffff/config.json",
        ]);
        let mut sources = Sources::default();
        let found = find(&env, &mut sources, "org/model", None);
        let snap = d.0.join("hub/models--org--model/snapshots");
        assert_eq!(found.unwrap(), snap.join(SHA).join("vae"));
        assert_eq!(sources.files.len(), 1, "the ref is a source");
        // A ref other than main, whose snapshot is the VAE itself (no subfolder).
        let found = find(&env, &mut sources, "org/model", Some("v2"));
        assert_eq!(found.unwrap(), snap.join("f".repeat(40)));
        // A commit hash needs no ref.
        let found = find(&env, &mut sources, "org/model", Some(SHA));
        assert_eq!(found.unwrap(), snap.join(SHA).join("vae"));
    }

    #[test]
    fn a_local_directory_wins_and_a_missing_model_lists_every_path_searched() {
        let (d, env) = tree(&["project/models/vae/config.json"]);
        let mut sources = Sources::default();
        let found = find(&env, &mut sources, "models/vae", None);
        assert_eq!(found.unwrap(), d.0.join("project/models/vae"));
        let Err(Searched(paths)) = find(&env, &mut sources, "org/absent", Some("dev")) else {
            panic!("found a model that is not there")
        };
        assert_eq!(paths.len(), 3, "{paths:?}");
        assert!(paths[0].ends_with("project/org/absent/vae/config.json"));
        assert!(
            paths[2].contains("models--org--absent/refs/dev"),
            "{paths:?}"
        );
    }

    /// Pretrained weights: a file as it is; a directory or its `transformer/` holding one of the
    /// family's files; a hub id's snapshot; else the places searched, with the family's names.
    #[test]
    fn pretrained_weights_are_a_file_a_directory_or_a_snapshot() {
        let (d, env) = tree(&[
            "project/runs/final/hourglass_model.safetensors",
            "project/ref/hourglass_model.pt",
            "project/pipe/transformer/diffusion_pytorch_model.safetensors",
            &format!("hub/models--org--dit/refs/main={SHA}"),
            &format!(
                "hub/models--org--dit/snapshots/{SHA}/transformer/diffusion_pytorch_model.bin"
            ),
        ]);
        let hourglass = weight_files(DiffusionModel::Hourglass);
        let dit = weight_files(DiffusionModel::Dit);
        let find = |spec: &str, files: &[&str]| {
            let local = env.project_root.join(spec);
            let wanted = Wanted {
                subfolder: "transformer",
                files,
                exists: &|p: &Path| p.is_file(),
            };
            locate(&env, &mut Sources::default(), (spec, &local), None, &wanted)
        };
        let project = d.0.join("project");
        assert_eq!(
            find("runs/final", &hourglass).unwrap(),
            project.join("runs/final")
        );
        assert_eq!(find("ref", &hourglass).unwrap(), project.join("ref"));
        assert_eq!(
            find("pipe", &dit).unwrap(),
            project.join("pipe/transformer")
        );
        let snap =
            d.0.join(format!("hub/models--org--dit/snapshots/{SHA}/transformer"));
        assert_eq!(find("org/dit", &dit).unwrap(), snap);
        let Err(Searched(paths)) = find("pipe", &hourglass) else {
            panic!("a DiT directory holds no hourglass weights")
        };
        assert!(
            paths[0].ends_with("pipe/transformer/{hourglass_model.safetensors, model.safetensors, hourglass_model.pt}"),
            "{paths:?}"
        );
    }

    #[test]
    fn the_hub_cache_follows_huggingface_hubs_precedence() {
        let vars = |set: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                set.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let home = Some(Path::new("/home/u"));
        let all = [
            ("HF_HUB_CACHE", "/a"),
            ("HUGGINGFACE_HUB_CACHE", "/b"),
            ("HF_HOME", "/c"),
            ("XDG_CACHE_HOME", "/d"),
        ];
        for (i, expected) in ["/a", "/b", "/c/hub", "/d/huggingface/hub"]
            .iter()
            .enumerate()
        {
            let set: &'static [_] = Box::leak(all[i..].to_vec().into_boxed_slice());
            assert_eq!(
                hub_cache_from(vars(set), home),
                Some(PathBuf::from(expected))
            );
        }
        assert_eq!(
            hub_cache_from(vars(&[("HF_HOME", "")]), home),
            Some(PathBuf::from("/home/u/.cache/huggingface/hub"))
        );
        assert_eq!(hub_cache_from(vars(&[]), None), None);
    }

    #[test]
    fn the_sd35_vae_config_gives_16_channels_at_an_eighth() {
        let text = r#"{"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512],
            "latent_channels": 16, "layers_per_block": 2, "norm_num_groups": 32,
            "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": false,
            "use_post_quant_conv": false, "latents_mean": null}"#;
        let vae = parse_vae(text, Path::new("/v")).unwrap();
        assert_eq!((vae.latent_channels, vae.downscale()), (16, 8));
        assert_eq!((vae.scaling_factor, vae.shift_factor), (1.5305, 0.0609));
        assert!(!vae.use_quant_conv && vae.mid_block_add_attention);
        let bad = parse_vae(r#"{"_class_name": "AutoencoderTiny"}"#, Path::new("/v"));
        assert!(bad.unwrap_err().contains("AutoencoderTiny"));
        let bad = parse_vae(
            r#"{"block_out_channels": [48], "norm_num_groups": 32}"#,
            Path::new("/v"),
        );
        assert!(bad.unwrap_err().contains("does not divide"));
    }

    /// SD 1.5's published unet/config.json reads as its shape (heads from `attention_head_dim`,
    /// SD 1.5's naming); a block or option the runtime does not build is refused by name.
    #[test]
    fn the_sd15_unet_config_reads_and_others_are_refused() {
        let sd15 = r#"{"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
            "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"], "downsample_padding": 1,
            "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
            "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
            "out_channels": 4, "sample_size": 64, "up_block_types": ["UpBlock2D",
            "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#;
        let u = parse_unet(sd15, Path::new("/u")).unwrap();
        assert_eq!(u.heads, vec![8; 4]);
        assert_eq!(
            (u.down_attention, u.up_attention),
            (vec![true, true, true, false], vec![false, true, true, true])
        );
        assert_eq!(
            (u.cross_attention_dim, u.sample_size, u.freq_shift),
            (768, 64, 0.0)
        );
        let sdxl = sd15.replace(
            r#""act_fn": "silu""#,
            r#""addition_embed_type": "text_time", "act_fn": "silu""#,
        );
        let err = parse_unet(&sdxl, Path::new("/u")).unwrap_err();
        assert!(err.contains("`addition_embed_type`"), "{err}");
        let other = sd15.replace(r#""DownBlock2D"]"#, r#""SimpleCrossAttnDownBlock2D"]"#);
        assert!(parse_unet(&other, Path::new("/u"))
            .unwrap_err()
            .contains("SimpleCrossAttnDownBlock2D"));
    }
}
