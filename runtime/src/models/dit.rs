//! DiT: the diffusion transformer as diffusers' `DiTTransformer2DModel` builds it (adaLN-Zero
//! blocks, each with its own timestep and label embedder), so `model.safetensors` uses diffusers'
//! parameter names and shapes and weights move between the two.
//!
//! Top to bottom: patchify (a conv with kernel = stride = patch, written as one GEMM over the
//! patches) plus fixed 2-D sin-cos positions; `layers` × block; an output head modulated by the
//! first block's embedding; unpatchify. Every norm is a composite of differentiable ops (Candle's
//! fused layer_norm has no backward); attention is one op with its own backward (attention.rs).
//!
//! Extensions over diffusers, on purpose (docs/config.md):
//! - non-square patches and grids (time series enter as (1, 20, 2048) with patch [1, 8]); the
//!   positions are computed for the real grid, never for a square `sample_size` grid;
//! - `gend_hlth_age` conditioning: class = gender·2 + health (4 = null) through the label table,
//!   plus age/100 through fixed Fourier features (a saved buffer, `age_fourier.weight`) and a
//!   per-block `age_embedder` linear; a null age is the zero feature vector, in training and in
//!   sampling alike;
//! - no hidden label dropout: diffusers drops labels to an extra row inside the model (10%, per
//!   block, independently); here the trainer's `cfg_dropout` is the only label dropout and it uses
//!   the same null label the sampler uses. The extra row is kept so the table shape matches
//!   diffusers. `dropout` (diffusers' activation dropout) is as diffusers places it.
//!
//! diffusers' block options are all here: `attention_bias` (q/k/v biases), `activation_fn` (the
//! feed-forward's six first halves), `norm_elementwise_affine` (an affine `norm3` before the
//! feed-forward; the adaLN norms never have one, in diffusers either), `dropout` (after the
//! attention's output projection and between the feed-forward's halves, in training only; its
//! masks come from a seed per forward, per block and site, so gradient checkpointing's recompute
//! drops the same elements) and `upcast_attention` (under autocast, the attention op runs in f32:
//! diffusers computes q·kᵀ and the softmax in f32 and rounds the probabilities back for the
//! product with v; ours keeps that product in f32 too).

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor, Var, D};
use signal_diffusion_config::choice::FeedForward;

use crate::models::lora::LoraDropout;
use crate::models::nn::{Linear, Params};
use crate::ops::adaln::{gated_residual, modulate};
use crate::ops::cpu::splitmix64;
use crate::ops::dropout::dropout;
use crate::ops::precision::Autocast;

/// What the label and age inputs mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Conditioning {
    /// Unconditional: a constant label 0 (diffusers needs one).
    None,
    /// `num_classes` classes; label `num_classes` is the null (CFG) label.
    Classes { num_classes: usize },
    /// gender × health classes (0..4, null 4) and age.
    GenderHealthAge,
    /// A caption's pooled text embedding of width `dim` (label k ≥ 1: row k − 1 of the batch's
    /// `Condition::texts`; 0: the null caption, the model's `caption_null` buffer).
    Caption { dim: usize },
}

impl Conditioning {
    /// The label of "no condition" (what CFG dropout and unconditional sampling feed).
    pub fn null_label(&self) -> u32 {
        match self {
            Conditioning::None => 0,
            Conditioning::Classes { num_classes } => *num_classes as u32,
            Conditioning::GenderHealthAge => 4,
            Conditioning::Caption { .. } => 0,
        }
    }

    pub fn is_conditional(&self) -> bool {
        *self != Conditioning::None
    }

    /// A caption's width (`Caption { dim }`), 0 for the other conditionings.
    pub fn caption_dim(&self) -> usize {
        match self {
            Conditioning::Caption { dim } => *dim,
            _ => 0,
        }
    }
}

/// Shapes fixed at build time (generated from the config's plan).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DitShape {
    pub in_channels: usize,
    pub out_channels: usize,
    pub height: usize,
    pub width: usize,
    pub patch: [usize; 2],
    pub heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    /// diffusers' `num_embeds_ada_norm`; the label table has one row more.
    pub num_embeds: usize,
    pub conditioning: Conditioning,
    /// LayerNorm epsilon before the MLP (`norm_eps`); the adaLN norms use 1e-6 as diffusers.
    pub norm_eps: f64,
    /// diffusers' `dropout` (training only).
    #[serde(default)]
    pub dropout: f64,
    /// Biases on q, k and v (`attention_bias`; the output projection always has one).
    #[serde(default = "yes")]
    pub attention_bias: bool,
    /// The feed-forward's first half (`activation_fn`).
    #[serde(default = "gelu_tanh")]
    pub feed_forward: FeedForward,
    /// An affine LayerNorm before the feed-forward (`norm_elementwise_affine`).
    #[serde(default)]
    pub norm_affine: bool,
    /// Attention in f32 under mixed precision (`upcast_attention`).
    #[serde(default)]
    pub upcast_attention: bool,
}

// Defaults of `sampling.json` files written before these options existed.
fn yes() -> bool {
    true
}

fn gelu_tanh() -> FeedForward {
    FeedForward::GeluApproximate
}

impl DitShape {
    pub fn dim(&self) -> usize {
        self.heads * self.head_dim
    }

    fn grid(&self) -> (usize, usize) {
        (self.height / self.patch[0], self.width / self.patch[1])
    }
}

/// The conditioning of a batch: one label per sample, ages (years / 100; NaN = null) for
/// `gend_hlth_age`, and for `caption` the pooled embeddings of the captions the labels index
/// (row-major, one row per distinct caption).
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub labels: Vec<u32>,
    pub ages: Vec<f32>,
    pub texts: Option<std::sync::Arc<Vec<f32>>>,
}

impl Condition {
    /// Every sample unconditioned.
    pub fn null(c: Conditioning, n: usize) -> Self {
        Condition {
            labels: vec![c.null_label(); n],
            ages: vec![f32::NAN; n],
            texts: None,
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Sinusoidal timestep features as diffusers' `Timesteps(256, flip_sin_to_cos=True,
/// downscale_freq_shift=1)`: [cos(t·f_k), sin(t·f_k)], f_k = 10000^(−k/127), in f32 like PyTorch.
pub fn timestep_features(t: &[f32], device: &Device) -> Result<Tensor> {
    sinusoid(t, 256, 1.0, device)
}

/// diffusers' `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=shift)`: per timestep
/// [cos(t·f_k), sin(t·f_k)], f_k = 10000^(−k/(dim/2 − shift)), in f32 like PyTorch.
pub fn sinusoid(t: &[f32], dim: usize, shift: f64, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|k| (-(10000f32.ln()) * k as f32 / (half as f32 - shift as f32)).exp())
        .collect();
    let mut out = Vec::with_capacity(t.len() * 2 * half);
    for &ti in t {
        out.extend(freqs.iter().map(|f| (ti * f).cos()));
        out.extend(freqs.iter().map(|f| (ti * f).sin()));
    }
    Tensor::from_vec(out, (t.len(), 2 * half), device)
}

/// diffusers' `get_2d_sincos_pos_embed` for a `gh × gw` grid of integer positions (the grid the
/// model sees, so no interpolation): per token, [sin, cos](w·ω) ‖ [sin, cos](h·ω), ω_k =
/// 10000^(−k/(D/4)). Tokens are row-major over (h, w).
pub fn sincos_positions(dim: usize, gh: usize, gw: usize) -> Vec<f32> {
    sincos_positions_spread(dim, gh, gw, 1.0)
}

/// [`sincos_positions`] at positions i / `spread` (diffusers' `arange(grid) / (grid /
/// base_size)`, divided in f32 as PyTorch does; the sines in f64).
pub fn sincos_positions_spread(dim: usize, gh: usize, gw: usize, spread: f32) -> Vec<f32> {
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let mut out = Vec::with_capacity(gh * gw * dim);
    for h in 0..gh {
        for w in 0..gw {
            for i in [w, h] {
                let pos = (i as f32 / spread) as f64;
                out.extend(omega.iter().map(|o| (pos * o).sin() as f32));
                out.extend(omega.iter().map(|o| (pos * o).cos() as f32));
            }
        }
    }
    out
}

/// Fourier features of age/100: [cos(2π·a·w_k), sin(2π·a·w_k)] with a fixed N(0, 1) w (128
/// frequencies for a DiT, half the mapping condition's width for the hourglass-shaped models);
/// zeros for a null (NaN) age.
pub(crate) fn age_features(ages: &[f32], freqs: &Tensor) -> Result<Tensor> {
    let w = freqs.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(ages.len() * 2 * w.len());
    for &a in ages {
        if a.is_nan() {
            out.extend(std::iter::repeat_n(0f32, 2 * w.len()));
        } else {
            let tau = std::f32::consts::TAU;
            out.extend(w.iter().map(|wk| (tau * a * wk).cos()));
            out.extend(w.iter().map(|wk| (tau * a * wk).sin()));
        }
    }
    Tensor::from_vec(out, (ages.len(), 2 * w.len()), freqs.device())
}

/// Timestep features (B, 256), labels (B), age features (B, 256) if the model reads ages,
/// caption embeddings (B, dim) if it reads captions.
struct BlockInputs {
    t_feat: Tensor,
    labels: Tensor,
    age_feat: Option<Tensor>,
    caption: Option<Tensor>,
}

/// `CombinedTimestepLabelEmbeddings` (+ our age and caption embedders): (t, labels, ages,
/// captions) -> (B, D).
struct Embedder {
    time_1: Linear,
    time_2: Linear,
    table: Tensor,
    age: Option<Linear>,
    caption: Option<Linear>,
}

impl Embedder {
    fn new(p: &mut Params, name: &str, s: &DitShape) -> Result<Self> {
        let d = s.dim();
        Ok(Embedder {
            time_1: Linear::new(p, &format!("{name}.timestep_embedder.linear_1"), 256, d)?,
            time_2: Linear::new(p, &format!("{name}.timestep_embedder.linear_2"), d, d)?,
            table: p.normal(
                format!("{name}.class_embedder.embedding_table.weight"),
                &[s.num_embeds + 1, d],
                1.0,
            )?,
            age: match s.conditioning {
                Conditioning::GenderHealthAge => Some(Linear::new(
                    p,
                    &format!("{name}.age_embedder.linear_1"),
                    256,
                    d,
                )?),
                _ => None,
            },
            caption: match s.conditioning {
                Conditioning::Caption { dim } => Some(Linear::new(
                    p,
                    &format!("{name}.caption_embedder.linear_1"),
                    dim,
                    d,
                )?),
                _ => None,
            },
        })
    }

    fn forward(&self, inputs: &BlockInputs) -> Result<Tensor> {
        let t = self
            .time_2
            .forward(&self.time_1.forward(&inputs.t_feat)?.silu()?)?;
        let mut e = (t + self.table.embedding(&inputs.labels)?)?;
        if let (Some(lin), Some(a)) = (&self.age, &inputs.age_feat) {
            e = (e + lin.forward(a)?)?;
        }
        if let (Some(lin), Some(c)) = (&self.caption, &inputs.caption) {
            e = (e + lin.forward(c)?)?;
        }
        Ok(e)
    }
}

/// Multi-head self-attention with diffusers' `to_q`, `to_k`, `to_v` (biases unless
/// `attention_bias = false`) and `to_out.0` (with bias).
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    /// Run the attention op (forward and backward) in f32 whatever the autocast.
    upcast: bool,
}

impl Attention {
    fn new(p: &mut Params, name: &str, s: &DitShape) -> Result<Self> {
        let (dim, bias) = (s.dim(), s.attention_bias);
        Ok(Attention {
            q: Linear::with_bias(p, &format!("{name}.to_q"), dim, dim, bias)?,
            k: Linear::with_bias(p, &format!("{name}.to_k"), dim, dim, bias)?,
            v: Linear::with_bias(p, &format!("{name}.to_v"), dim, dim, bias)?,
            out: Linear::new(p, &format!("{name}.to_out.0"), dim, dim)?,
            heads: s.heads,
            upcast: s.upcast_attention,
        })
    }

    /// (B, N, D) -> (B, N, D): softmax(q·kᵀ/√d_head)·v per head.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (q, k, v) = (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?);
        let attended = {
            // The op reads the autocast when it is applied and keeps it for its backward.
            let _f32 = self.upcast.then(|| Autocast::enter(None));
            crate::ops::attention::attention(&q, &k, &v, self.heads)?
        };
        self.out.forward(&attended)
    }
}

/// diffusers' `FeedForward(dim, mult=4, activation_fn)`: `net.0.proj` (to 4·D, or 8·D split into
/// value and gate halves for the gated kinds), dropout, `net.2` back to D.
struct Mlp {
    kind: FeedForward,
    proj: Linear,
    out: Linear,
}

impl Mlp {
    fn new(p: &mut Params, name: &str, dim: usize, kind: FeedForward) -> Result<Self> {
        let gated = matches!(kind, FeedForward::Geglu | FeedForward::Swiglu);
        let inner = 4 * dim;
        Ok(Mlp {
            kind,
            proj: Linear::new(
                p,
                &format!("{name}.net.0.proj"),
                dim,
                inner * (1 + usize::from(gated)),
            )?,
            out: Linear::new(p, &format!("{name}.net.2"), inner, dim)?,
        })
    }

    /// The first half: diffusers' GELU (erf or tanh), GEGLU (value·GELU(gate)), ApproximateGELU
    /// (x·σ(1.702·x)), SwiGLU (value·SiLU(gate)) or LinearActivation(SiLU).
    fn activate(&self, x: &Tensor) -> Result<Tensor> {
        let gate = |x: &Tensor, f: fn(&Tensor) -> Result<Tensor>| -> Result<Tensor> {
            let halves = x.chunk(2, D::Minus1)?;
            &halves[0] * f(&halves[1].contiguous()?)?
        };
        match self.kind {
            FeedForward::GeluApproximate => self.proj.forward_gelu_tanh(x),
            FeedForward::Gelu => crate::ops::gelu::gelu(&self.proj.forward(x)?),
            FeedForward::Geglu => crate::ops::gelu::geglu(&self.proj.forward(x)?),
            FeedForward::Swiglu => gate(&self.proj.forward(x)?, |g| g.silu()),
            FeedForward::GegluApproximate => {
                let h = self.proj.forward(x)?;
                &h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?
            }
            FeedForward::LinearSilu => self.proj.forward(x)?.silu(),
        }
    }

    fn forward(&self, x: &Tensor, drop: Option<(f64, u64)>) -> Result<Tensor> {
        self.out.forward(&dropped(self.activate(x)?, drop)?)
    }
}

/// Inverted dropout with (probability, seed), or nothing.
fn dropped(x: Tensor, drop: Option<(f64, u64)>) -> Result<Tensor> {
    match drop {
        Some((p, seed)) => dropout(&x, p, seed),
        None => Ok(x),
    }
}

/// `BasicTransformerBlock` with `norm_type = "ada_norm_zero"`, no cross-attention.
struct Block {
    emb: Embedder,
    ada: Linear,
    attn: Attention,
    /// `norm3`'s weight and bias with `norm_elementwise_affine`.
    norm3: Option<(Tensor, Tensor)>,
    mlp: Mlp,
}

impl Block {
    /// `seed`: dropout's masks in training (the block's own seed), `None` in evaluation.
    fn forward(&self, x: &Tensor, emb: &Tensor, s: &DitShape, seed: Option<u64>) -> Result<Tensor> {
        let m = self.ada.forward(&emb.silu()?)?.chunk(6, 1)?;
        let (shift_msa, scale_msa, gate_msa) = (&m[0], &m[1], &m[2]);
        let (shift_mlp, scale_mlp, gate_mlp) = (&m[3], &m[4], &m[5]);
        let drop = |site: u64| {
            seed.filter(|_| s.dropout > 0.0)
                .map(|k| (s.dropout, splitmix64(k ^ site)))
        };
        let h = modulate(x, 1e-6, shift_msa, scale_msa)?;
        let x = gated_residual(x, &dropped(self.attn.forward(&h)?, drop(1))?, gate_msa)?;
        // An affine norm3 folds into the modulation: (x̂·γ + β)·(1 + scale) + shift
        // = x̂·(γ·(1 + scale)) + (β·(1 + scale) + shift).
        let (shift_mlp, scale_mlp) = match &self.norm3 {
            Some((gamma, beta)) => {
                let one_plus = (scale_mlp + 1.0)?;
                (
                    (one_plus.broadcast_mul(beta)? + shift_mlp)?,
                    (one_plus.broadcast_mul(gamma)? - 1.0)?,
                )
            }
            None => (shift_mlp.clone(), scale_mlp.clone()),
        };
        let h = modulate(&x, s.norm_eps, &shift_mlp, &scale_mlp)?;
        gated_residual(&x, &self.mlp.forward(&h, drop(2))?, gate_mlp)
    }
}

pub struct Dit {
    shape: DitShape,
    patch: Tensor,
    patch_bias: Tensor,
    positions: Tensor,
    age_fourier: Option<Tensor>,
    /// `caption`: the null caption's embedding (the empty caption's, set by the trainer from
    /// its text encoder and saved with the weights, so sampling needs no text encoder for it).
    caption_null: Option<Tensor>,
    blocks: Vec<Block>,
    out_1: Linear,
    out_2: Linear,
}

impl Dit {
    pub fn new(s: &DitShape, p: &mut Params, device: &Device) -> Result<Self> {
        let d = s.dim();
        let [ph, pw] = s.patch;
        let fan_in = s.in_channels * ph * pw;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let patch = p.uniform(
            "pos_embed.proj.weight".into(),
            &[d, s.in_channels, ph, pw],
            bound,
        )?;
        let patch_bias = p.uniform("pos_embed.proj.bias".into(), &[d], bound)?;
        let (gh, gw) = s.grid();
        let positions = Tensor::from_vec(sincos_positions(d, gh, gw), (1, gh * gw, d), device)?;
        let age_fourier = match s.conditioning {
            Conditioning::GenderHealthAge => {
                Some(p.normal_buffer("age_fourier.weight".into(), &[128, 1], 1.0)?)
            }
            _ => None,
        };
        let caption_null = match s.conditioning {
            Conditioning::Caption { dim } => Some(
                p.buffer("caption_null.weight".into(), &[dim], 0.0)?
                    .as_tensor()
                    .detach(),
            ),
            _ => None,
        };
        let mut blocks = Vec::with_capacity(s.layers);
        for i in 0..s.layers {
            let n = format!("transformer_blocks.{i}");
            blocks.push(Block {
                emb: Embedder::new(p, &format!("{n}.norm1.emb"), s)?,
                ada: Linear::new(p, &format!("{n}.norm1.linear"), d, 6 * d)?,
                attn: Attention::new(p, &format!("{n}.attn1"), s)?,
                norm3: if s.norm_affine {
                    Some((
                        p.constant(format!("{n}.norm3.weight"), &[d], 1.0)?,
                        p.constant(format!("{n}.norm3.bias"), &[d], 0.0)?,
                    ))
                } else {
                    None
                },
                mlp: Mlp::new(p, &format!("{n}.ff"), d, s.feed_forward)?,
            });
        }
        Ok(Dit {
            shape: *s,
            patch,
            patch_bias,
            positions,
            age_fourier,
            caption_null,
            blocks,
            out_1: Linear::new(p, "proj_out_1", d, 2 * d)?,
            out_2: Linear::new(p, "proj_out_2", d, ph * pw * s.out_channels)?,
        })
    }

    pub fn shape(&self) -> &DitShape {
        &self.shape
    }

    /// x (B, C, H, W), timesteps t (B, in the scheduler's 0..T scale), condition -> the model
    /// output, shaped like x (evaluation: no dropout).
    pub fn forward(&self, x: &Tensor, t: &[f32], cond: &Condition) -> Result<Tensor> {
        self.forward_with_dropout(x, t, cond, None)
    }

    /// `forward` in training: `dropout_seed` draws the dropout masks (`None`: no dropout).
    pub fn forward_with_dropout(
        &self,
        x: &Tensor,
        t: &[f32],
        cond: &Condition,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let _lora = LoraDropout::enter(dropout_seed);
        let inputs = self.block_inputs(t, cond, x.device())?;
        let mut h = self.tokens(x)?;
        let mut first_emb = None;
        for (i, block) in self.blocks.iter().enumerate() {
            let emb = block.emb.forward(&inputs)?;
            h = block.forward(&h, &emb, &self.shape, block_seed(dropout_seed, i))?;
            first_emb.get_or_insert(emb);
        }
        let first_emb = first_emb.expect("a DiT has at least one block");
        self.head(&h, &first_emb, x.dims4()?)
    }

    /// Gradient checkpointing: `loss_of(self.forward(x, t, cond))` and the gradients of every
    /// parameter, keeping only each block's input during the forward and recomputing one block
    /// at a time in the backward, which starts from the gradient of the next block's input.
    /// Costs one more forward of the blocks; the activations held are one block's instead of all.
    pub fn checkpointed_backward(
        &self,
        x: &Tensor,
        t: &[f32],
        cond: &Condition,
        dropout_seed: Option<u64>,
        loss_of: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, GradStore)> {
        // LoRA's masks depend on the seed and the layer only: the recompute draws the same.
        let _lora = LoraDropout::enter(dropout_seed);
        let inputs = self.block_inputs(t, cond, x.device())?;
        let tokens = self.tokens(x)?;
        // Forward without graphs: detaching drops each block's activations at once.
        let mut block_in = vec![tokens.detach()];
        for (i, block) in self.blocks.iter().enumerate() {
            let emb = block.emb.forward(&inputs)?;
            let input = block_in.last().expect("the tokens");
            let h = block.forward(input, &emb, &self.shape, block_seed(dropout_seed, i))?;
            block_in.push(h.detach());
        }
        let last = Var::from_tensor(&block_in.pop().expect("the tokens"))?;
        let first_emb = self.blocks[0].emb.forward(&inputs)?;
        let loss = loss_of(&self.head(last.as_tensor(), &first_emb, x.dims4()?)?)?;
        let mut grads = loss.backward()?;
        let mut grad = take_grad(&mut grads, last.as_tensor())?;
        let mut total = grads;
        // Each segment's backward is that of <segment output, incoming gradient>.
        for (i, (block, h)) in self.blocks.iter().zip(&block_in).enumerate().rev() {
            let h = Var::from_tensor(h)?;
            let emb = block.emb.forward(&inputs)?;
            let seed = block_seed(dropout_seed, i);
            let out = block.forward(h.as_tensor(), &emb, &self.shape, seed)?;
            let mut grads = (out * &grad)?.sum_all()?.backward()?;
            grads.remove(&grad);
            grad = take_grad(&mut grads, h.as_tensor())?;
            total.extend(grads)?;
        }
        let mut grads = (tokens * &grad)?.sum_all()?.backward()?;
        grads.remove(&grad);
        total.extend(grads)?;
        Ok((loss, total))
    }

    /// Patchify + positions: (B, C, H, W) -> (B, N, D).
    fn tokens(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let [ph, pw] = self.shape.patch;
        let d = self.shape.dim();
        let kernel = self.patch.reshape((d, c * ph * pw))?;
        crate::ops::linear::linear(&patches(x, [ph, pw])?, &kernel, &self.patch_bias)?
            .reshape((b, (h / ph) * (w / pw), d))?
            .broadcast_add(&self.positions)
    }

    /// The features every block's embedder reads (none of them trainable).
    fn block_inputs(&self, t: &[f32], cond: &Condition, device: &Device) -> Result<BlockInputs> {
        let labels = Tensor::from_slice(&cond.labels, cond.len(), device)?;
        let caption = match &self.caption_null {
            // Rows of [null; the batch's captions], picked by label.
            Some(null) => {
                let dim = null.dim(0)?;
                let rows = match &cond.texts {
                    Some(texts) => {
                        let table = Tensor::from_slice(texts, (texts.len() / dim, dim), device)?;
                        Tensor::cat(&[&null.unsqueeze(0)?, &table], 0)?
                    }
                    None => null.unsqueeze(0)?,
                };
                Some(rows.index_select(&labels, 0)?)
            }
            None => None,
        };
        Ok(BlockInputs {
            t_feat: timestep_features(t, device)?,
            // A caption model's label table reads the constant label 0, as an unconditional one.
            labels: match caption {
                Some(_) => labels.zeros_like()?,
                None => labels,
            },
            age_feat: match &self.age_fourier {
                Some(f) => Some(age_features(&cond.ages, f)?),
                None => None,
            },
            caption,
        })
    }

    /// Output head, modulated by the first block's embedding (diffusers recomputes the same
    /// value; reusing it gives the same gradients), then unpatchify to `dims` (B, C, H, W).
    fn head(
        &self,
        h: &Tensor,
        first_emb: &Tensor,
        dims: (usize, usize, usize, usize),
    ) -> Result<Tensor> {
        let m = self.out_1.forward(&first_emb.silu()?)?.chunk(2, 1)?;
        let y = self.out_2.forward(&modulate(h, 1e-6, &m[0], &m[1])?)?;
        let (b, _, height, width) = dims;
        unpatchify(
            &y,
            (b, self.shape.out_channels, height, width),
            self.shape.patch,
        )
    }
}

/// A patch embedding's input: (B, C, H, W) -> (B·N, C·ph·pw) rows, one per patch (row-major over
/// the patch grid), each the patch's values in the conv kernel's (C, ph, pw) order, so the
/// embedding is one GEMM with the kernel.
pub(crate) fn patches(x: &Tensor, [ph, pw]: [usize; 2]) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (gh, gw) = (h / ph, w / pw);
    x.reshape((b, c, gh, ph, gw, pw))?
        .permute([0, 2, 4, 1, 3, 5])?
        .reshape((b * gh * gw, c * ph * pw))
}

/// The output head's tokens (B, N, ph·pw·C) back to an image `dims` (B, C, H, W):
/// diffusers' "nhwpqc->nchpwq".
pub(crate) fn unpatchify(
    y: &Tensor,
    (b, co, height, width): (usize, usize, usize, usize),
    [ph, pw]: [usize; 2],
) -> Result<Tensor> {
    let (gh, gw) = (height / ph, width / pw);
    y.reshape((b, gh, gw, ph, pw, co))?
        .permute([0, 5, 1, 3, 2, 4])?
        .reshape((b, co, height, width))
}

/// Block `i`'s dropout seed from the forward's (the same in a checkpointed recompute).
fn block_seed(seed: Option<u64>, i: usize) -> Option<u64> {
    seed.map(|s| splitmix64(s ^ ((i as u64) << 8)))
}

/// Removes and returns the gradient of `x`, which every segment's input has.
pub(crate) fn take_grad(grads: &mut GradStore, x: &Tensor) -> Result<Tensor> {
    grads.remove(x).ok_or_else(|| {
        candle_core::Error::Msg("a checkpointed segment's input got no gradient".into())
    })
}

/// The number of trainable parameters of a DiT of this shape (built with zero weights).
pub fn count_parameters(s: &DitShape) -> Result<usize> {
    let mut p = Params::counting();
    Dit::new(s, &mut p, &Device::Cpu)?;
    Ok(p.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_match_diffusers_for_a_2x3_grid() {
        // diffusers get_2d_sincos_pos_embed(8, (2, 3), base_size=...) with integer positions:
        // token (h=1, w=2): [sin(2ω), cos(2ω)] ‖ [sin(1ω), cos(1ω)], ω = [1, 1e-2].
        let p = sincos_positions(8, 2, 3);
        let tok = &p[(3 + 2) * 8..(3 + 2) * 8 + 8];
        let want = [
            2f64.sin(),
            0.02f64.sin(),
            2f64.cos(),
            0.02f64.cos(),
            1f64.sin(),
            0.01f64.sin(),
            1f64.cos(),
            0.01f64.cos(),
        ];
        for (g, w) in tok.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{tok:?}");
        }
    }

    #[test]
    fn timestep_features_match_diffusers() -> Result<()> {
        // diffusers get_timestep_embedding(t=[500], 256, flip_sin_to_cos=True, shift=1):
        // first cos(500), last sin(500·1e-4).
        let f = timestep_features(&[500.0], &Device::Cpu)?.to_vec2::<f32>()?;
        assert!((f[0][0] - 500f32.cos()).abs() < 1e-5);
        assert!((f[0][127] - (500f32 * 1e-4).cos()).abs() < 1e-5);
        assert!((f[0][128] - 500f32.sin()).abs() < 1e-5);
        assert!((f[0][255] - (500f32 * 1e-4).sin()).abs() < 1e-5);
        Ok(())
    }
}
