//! The hourglass diffusion transformer (HDiT, Crowson et al. 2024): k-diffusion's
//! `image_transformer_v2`, which the reference ports as `Hourglass2DModel`
//! (spec/reference/diffusion.md §2.2). Parameter names are the reference's state-dict names, so
//! its `hourglass_model.pt` maps onto ours one to one.
//!
//! ```text
//! x (B, C, H, W) ─ NHWC ─ patch_in (TokenMerge p_h×p_w) ─┬─ down level 0 ── merge 2×2 ─┬─ … mid level
//!                                                         └────────── skip ──────────────┘
//!   … split 2×2 (lerp with the skip by `fac`) ─ up level 0 ─ out_norm ─ patch_out ─ NCHW
//! cond = mapping(time_in_proj(FF(ln(σ + 1e-9) / 4)) + aug_in_proj(FF(0)) + class_emb[y] + mapping_cond_in_proj(c))
//! layer = x + out_proj(attention(AdaRMSNorm(x, cond))), then x + down_proj(GEGLU(AdaRMSNorm(x, cond)))
//! ```
//!
//! Attention is cosine-similarity attention (q and k L2-normalised and scaled by √scale, a
//! learnable per-head scale initialised to 10, softmax scale 1) with axial RoPE on the first
//! half of each head, over the whole grid (global) or each query's k×k neighbourhood
//! (ops/neighborhood.rs). Every layer's output projection, the AdaRMSNorm projections and
//! `patch_out` start at zero, so an untrained model outputs zeros. σ is the flow's noise level in
//! (0, 1]; the 1e-9 is the reference's guard for σ = 0 (k-diffusion's EDM σ never is).

use std::rc::Rc;

use candle_core::{DType, Device, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::models::nn::{dropout, Linear, Mode, Params};
use crate::models::tape::{Node, Tape};
use crate::ops::norm::rms_normalize_last;
use crate::ops::rope::rotate;

/// A level's self-attention.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum SelfAttention {
    /// Over every token of the level.
    Global { d_head: usize },
    /// Over each token's `kernel`×`kernel` neighbourhood (NATTEN's semantics).
    Neighborhood { d_head: usize, kernel: usize },
    /// Within `window`×`window` windows, shifted by half a window on every other layer (Swin:
    /// the grid rolled, the windows straddling the wrap masked, as k-diffusion does).
    ShiftedWindow { d_head: usize, window: usize },
    /// None: the layer is its feed-forward alone.
    None,
}

impl SelfAttention {
    fn d_head(&self) -> Option<usize> {
        match *self {
            SelfAttention::Global { d_head }
            | SelfAttention::Neighborhood { d_head, .. }
            | SelfAttention::ShiftedWindow { d_head, .. } => Some(d_head),
            SelfAttention::None => None,
        }
    }
}

/// One level of the hourglass: `depth` layers of `width` channels.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LevelShape {
    pub depth: usize,
    pub width: usize,
    pub d_ff: usize,
    pub attention: SelfAttention,
    /// Dropout inside the level's attention and feed-forward blocks (`dropout_rate`).
    pub dropout: f64,
}

/// The model's shape, as the config's `[model]` and `[model.extras]` give it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HourglassShape {
    pub in_channels: usize,
    pub out_channels: usize,
    /// The input patch (p_h, p_w); merges inside are always 2×2.
    pub patch: [usize; 2],
    /// Outermost first; the last is the middle level.
    pub levels: Vec<LevelShape>,
    pub mapping_width: usize,
    pub mapping_depth: usize,
    pub mapping_d_ff: usize,
    /// Rows of the class embedding (the classes and the CFG null row); 0: no class input.
    pub class_rows: usize,
    /// Width of the extra mapping input (`gend_hlth_age`'s age features, captions); 0: none.
    pub mapping_cond_dim: usize,
    /// The mapping network's dropout (`mapping_dropout_rate`).
    pub mapping_dropout: f64,
}

const EPS: f64 = 1e-6;

/// x · rsqrt(mean(x²) + ε) · scale over the last axis (`scale` broadcast against x): our fused
/// normalisation (ops/norm.rs; Candle's `rms_norm` has no backward) times the scale.
pub(crate) fn rms_norm(x: &Tensor, scale: &Tensor) -> Result<Tensor> {
    rms_normalize_last(x, EPS)?.broadcast_mul(scale)
}

/// `nn.Linear(din, dout, bias=False)` initialised to zeros (k-diffusion's `zero_init`).
pub(crate) fn zero_linear(p: &mut Params, name: &str, din: usize, dout: usize) -> Result<Linear> {
    Linear::from_parts(
        p.constant(format!("{name}.weight"), &[dout, din], 0.0)?,
        None,
    )
}

/// `x · GELU(gate)` of the two halves of a `Linear(d, 2·d_ff)` (k-diffusion's `LinearGEGLU`).
fn geglu(up: &Linear, x: &Tensor) -> Result<Tensor> {
    crate::ops::gelu::geglu(&up.forward(x)?)
}

/// Random Fourier features: a fixed (out/2, in) N(0, 1) buffer W, then cos ‖ sin of 2π·x·Wᵀ.
struct FourierFeatures {
    weight: Tensor,
}

impl FourierFeatures {
    fn new(p: &mut Params, name: &str, din: usize, dout: usize) -> Result<Self> {
        Ok(FourierFeatures {
            weight: p.normal_buffer(format!("{name}.weight"), &[dout / 2, din], 1.0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f = (x.matmul(&self.weight.t()?)? * std::f64::consts::TAU)?;
        Tensor::cat(&[f.cos()?, f.sin()?], D::Minus1)
    }
}

/// `rms_norm(x, 1 + Linear(cond))`: the linear zero-initialised, so it starts as a plain RMS
/// norm; tagged as a mapping parameter (a third of the learning rate).
pub(crate) struct AdaRmsNorm {
    linear: Linear,
}

impl AdaRmsNorm {
    pub(crate) fn new(p: &mut Params, name: &str, features: usize, cond: usize) -> Result<Self> {
        Ok(AdaRmsNorm {
            linear: zero_linear(p, &format!("{name}.linear"), cond, features)?,
        })
    }

    /// x (B, H, W, C), cond (B, M).
    pub(crate) fn forward(&self, x: &Tensor, cond: &Tensor) -> Result<Tensor> {
        let (b, c) = (x.dim(0)?, x.dim(D::Minus1)?);
        let scale = (self.linear.forward(cond)? + 1.0)?.reshape((b, 1, 1, c))?;
        rms_norm(x, &scale)
    }
}

/// Axial rotary angles per head: head h's frequencies are every n_heads-th of
/// exp(linspace(ln π, ln 10π, n_heads·d_head/8)) (the buffer `freqs`, (heads, d_head/8)), and a
/// token at (y, x) rotates by (y·f ‖ x·f): d_head/4 angles, applied to the first d_head/2
/// channels of q and k.
struct AxialRope {
    freqs: Tensor,
}

impl AxialRope {
    fn new(p: &mut Params, name: &str, d_head: usize, heads: usize) -> Result<Self> {
        let n = heads * d_head / 8;
        let (lo, hi) = (
            std::f64::consts::PI.ln(),
            (10.0 * std::f64::consts::PI).ln(),
        );
        // linspace(lo, hi, n + 1)[:-1].exp(), viewed (d_head/8, heads) and transposed.
        let values: Vec<f64> = (0..n)
            .map(|i| (lo + (hi - lo) * i as f64 / n as f64).exp())
            .collect();
        let per_head: Vec<f32> = (0..heads)
            .flat_map(|h| (0..d_head / 8).map(move |j| (j, h)))
            .map(|(j, h)| values[j * heads + h] as f32)
            .collect();
        let freqs = p.buffer(format!("{name}.freqs"), &[heads, d_head / 8], 0.0)?;
        freqs.set(&Tensor::from_vec(
            per_head,
            (heads, d_head / 8),
            freqs.device(),
        )?)?;
        Ok(AxialRope {
            freqs: freqs.as_tensor().detach(),
        })
    }

    /// The angles (H, W, heads, d_head/4) of a (H, W, 2) position grid.
    fn angles(&self, pos: &Tensor) -> Result<Tensor> {
        let f = self.freqs.unsqueeze(0)?.unsqueeze(0)?; // (1, 1, heads, n)
        let along = |axis: usize| pos.narrow(2, axis, 1)?.unsqueeze(3)?.broadcast_mul(&f);
        Tensor::cat(&[along(0)?, along(1)?], D::Minus1)
    }
}

/// Cosine-similarity self-attention with axial RoPE, global, in neighbourhoods or in shifted
/// windows.
struct Attention {
    kind: SelfAttention,
    heads: usize,
    /// The shifted windows' roll on this layer: half a window on odd layers of a level, else 0.
    shift: usize,
    norm: AdaRmsNorm,
    qkv_proj: Linear,
    /// Per head; q and k are scaled by its square root after L2 normalisation.
    scale: Tensor,
    pos_emb: AxialRope,
    out_proj: Linear,
}

impl Attention {
    fn new(
        p: &mut Params,
        name: &str,
        width: usize,
        cond: usize,
        (kind, index): (SelfAttention, usize),
    ) -> Result<Self> {
        let Some(d_head) = kind.d_head() else {
            candle_core::bail!("{name}: a layer without attention has no attention block");
        };
        let heads = width / d_head;
        let shift = match kind {
            SelfAttention::ShiftedWindow { window, .. } if index % 2 == 1 => window / 2,
            _ => 0,
        };
        Ok(Attention {
            kind,
            heads,
            shift,
            norm: AdaRmsNorm::new(p, &format!("{name}.norm"), width, cond)?,
            qkv_proj: Linear::with_bias(p, &format!("{name}.qkv_proj"), width, 3 * width, false)?,
            scale: p.constant(format!("{name}.scale"), &[heads], 10.0)?,
            pos_emb: AxialRope::new(p, &format!("{name}.pos_emb"), d_head, heads)?,
            out_proj: zero_linear(p, &format!("{name}.out_proj"), width, width)?,
        })
    }

    /// `wrap`: the level's shifted-window mask ([`wrap_mask`]), for a shifted layer.
    fn forward(
        &self,
        x: &Tensor,
        (pos, wrap): (&Tensor, Option<&Tensor>),
        cond: &Tensor,
        drop: f64,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let (b, h, w, width) = x.dims4()?;
        let d = width / self.heads;
        let qkv = self.qkv_proj.forward(&self.norm.forward(x, cond)?)?;
        // (B, H, W, heads, d) each: k-diffusion's "n h w (t nh e)".
        let part = |i: usize| {
            qkv.narrow(3, i * width, width)?
                .reshape((b, h, w, self.heads, d))
        };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        // q·√scale/‖q‖ and k·√scale/‖k‖ (ε = 1e-6 under the root, as k-diffusion):
        // x/√(Σx² + ε) = rms_normalize(x, ε/d)/√d.
        let sqrt_scale = (&self.scale / d as f64)?
            .sqrt()?
            .reshape((1, 1, 1, self.heads, 1))?;
        let cosine = |t: &Tensor| -> Result<Tensor> {
            rms_normalize_last(t, EPS / d as f64)?.broadcast_mul(&sqrt_scale)
        };
        let theta = self.pos_emb.angles(pos)?;
        let q = rotate(&cosine(&q)?, &theta)?.reshape((b, h, w, width))?;
        let k = rotate(&cosine(&k)?, &theta)?.reshape((b, h, w, width))?;
        let v = v.reshape((b, h, w, width))?.contiguous()?;
        let attended = match self.kind {
            SelfAttention::Neighborhood { kernel, .. } => {
                crate::ops::neighborhood::neighborhood_attention(
                    &q, &k, &v, self.heads, kernel, 1.0,
                )?
            }
            SelfAttention::Global { .. } => {
                let tokens = |t: &Tensor| t.reshape((b, h * w, width));
                crate::ops::attention::scaled_attention(
                    &tokens(&q)?,
                    &tokens(&k)?,
                    &tokens(&v)?,
                    self.heads,
                    1.0,
                )?
                .reshape((b, h, w, width))?
            }
            SelfAttention::ShiftedWindow { window, .. } => {
                let wrap = match self.shift {
                    0 => None,
                    _ => Some(wrap.expect("a shifted level has its mask")),
                };
                window_attention(&q, &k, &v, self.heads, window, (self.shift, wrap))?
            }
            SelfAttention::None => unreachable!("no attention block is built for it"),
        };
        x + self.out_proj.forward(&dropout(&attended, drop, mode)?)?
    }
}

/// Attention within `window`×`window` windows of q, k, v (B, H, W, heads·d) after rolling the
/// grid by `shift` along both axes (torch.roll's direction), rolled back after: k-diffusion's
/// `apply_window_attention`. With a shift, the windows of the first row and column hold tokens
/// from both sides of the wrap; a query attends only to keys from its own side there (`wrap`,
/// built once per forward for the level by [`wrap_mask`]).
fn window_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    window: usize,
    (shift, wrap): (usize, Option<&Tensor>),
) -> Result<Tensor> {
    let (b, h, w, width) = q.dims4()?;
    let (d, (nh, nw), n) = (width / heads, (h / window, w / window), window * window);
    let roll = |t: &Tensor, by: i32| -> Result<Tensor> { t.roll(by, 1)?.roll(by, 2) };
    // (B, H, W, heads·d) → (B·nh·nw·heads, window², d).
    let windows = |t: &Tensor| -> Result<Tensor> {
        roll(t, shift as i32)?
            .reshape(vec![b, nh, window, nw, window, heads, d])?
            .permute([0, 1, 3, 5, 2, 4, 6])?
            .contiguous()?
            .reshape((b * nh * nw * heads, n, d))
    };
    let (q, k, v) = (windows(q)?, windows(k)?, windows(v)?);
    let mut scores = q.matmul(&k.t()?)?;
    if let Some(blocked) = wrap {
        scores = scores
            .reshape((b, nh, nw, heads, n, n))?
            .broadcast_add(blocked)?
            .reshape((b * nh * nw * heads, n, n))?;
    }
    let out = crate::ops::attention::softmax_last(&scores)?.matmul(&v)?;
    let out = out
        .reshape(vec![b, nh, nw, heads, window, window, d])?
        .permute([0, 1, 4, 2, 5, 3, 6])?
        .contiguous()?
        .reshape((b, h, w, width))?;
    roll(&out, -(shift as i32))
}

/// (1, nh, nw, 1, n, n): 0 where a query may attend to a key, −1e9 where k-diffusion's
/// `make_shifted_window_masks` forbids it (across the wrap, in the first window row and column).
fn wrap_mask(nh: usize, nw: usize, window: usize, shift: usize, device: &Device) -> Result<Tensor> {
    let n = window * window;
    let mut bias = vec![0f32; nh * nw * n * n];
    for (wi, wj) in (0..nh).flat_map(|i| (0..nw).map(move |j| (i, j))) {
        for (qi, ki) in (0..n).flat_map(|q| (0..n).map(move |k| (q, k))) {
            let (qh, qw, kh, kw) = (qi / window, qi % window, ki / window, ki % window);
            let same_row_side = (qh < shift) == (kh < shift);
            let same_column_side = (qw < shift) == (kw < shift);
            let allowed = match (wi == 0, wj == 0) {
                (true, true) => same_row_side && same_column_side,
                (false, true) => same_column_side,
                (true, false) => same_row_side,
                (false, false) => true,
            };
            if !allowed {
                bias[((wi * nw + wj) * n + qi) * n + ki] = -1e9;
            }
        }
    }
    Tensor::from_vec(bias, (1, nh, nw, 1, n, n), device)
}

/// AdaRMSNorm → GEGLU `up_proj` → dropout → `down_proj` (zero-initialised), residual.
struct FeedForward {
    norm: AdaRmsNorm,
    up_proj: Linear,
    down_proj: Linear,
}

impl FeedForward {
    fn new(p: &mut Params, name: &str, width: usize, d_ff: usize, cond: usize) -> Result<Self> {
        Ok(FeedForward {
            norm: AdaRmsNorm::new(p, &format!("{name}.norm"), width, cond)?,
            up_proj: Linear::with_bias(p, &format!("{name}.up_proj"), width, 2 * d_ff, false)?,
            down_proj: zero_linear(p, &format!("{name}.down_proj"), d_ff, width)?,
        })
    }

    fn forward(&self, x: &Tensor, cond: &Tensor, drop: f64, mode: &mut Mode) -> Result<Tensor> {
        let h = geglu(&self.up_proj, &self.norm.forward(x, cond)?)?;
        x + self.down_proj.forward(&dropout(&h, drop, mode)?)?
    }
}

struct Layer {
    /// `None` for a level without attention.
    self_attn: Option<Attention>,
    ff: FeedForward,
}

/// TokenMerge: (B, H, W, C) → (B, H/p_h, W/p_w, p_h·p_w·C) (k-diffusion's "(nh nw e)" order),
/// then a bias-free linear.
pub(crate) struct TokenMerge {
    patch: [usize; 2],
    proj: Linear,
}

impl TokenMerge {
    pub(crate) fn new(
        p: &mut Params,
        name: &str,
        din: usize,
        dout: usize,
        patch: [usize; 2],
    ) -> Result<Self> {
        let proj = Linear::with_bias(
            p,
            &format!("{name}.proj"),
            din * patch[0] * patch[1],
            dout,
            false,
        )?;
        Ok(TokenMerge { patch, proj })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let [ph, pw] = self.patch;
        let x = x
            .reshape((b, h / ph, ph, w / pw, pw * c))?
            .transpose(2, 3)?
            .reshape((b, h / ph, w / pw, ph * pw * c))?;
        self.proj.forward(&x)
    }
}

/// A bias-free linear to p_h·p_w·C, unshuffled to (B, H·p_h, W·p_w, C): the inverse of
/// [`TokenMerge`]'s rearrangement.
pub(crate) fn token_split(proj: &Linear, x: &Tensor, [ph, pw]: [usize; 2]) -> Result<Tensor> {
    let (b, h, w, _) = x.dims4()?;
    let y = proj.forward(x)?;
    let c = y.dim(3)? / (ph * pw);
    y.reshape((b, h, w, ph, pw * c))?
        .transpose(2, 3)?
        .reshape((b, h * ph, w * pw, c))
}

/// The cell centres of an h×w grid in [-1, 1], the longer side spanning it and the shorter
/// scaled by the aspect ratio (k-diffusion's `make_axial_pos`): (h, w, 2) of (y, x).
fn axial_pos(h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let ratio = w as f64 / h as f64;
    let (ys, xs) = if ratio > 1.0 {
        (1.0 / ratio, 1.0)
    } else {
        (1.0, ratio)
    };
    let centres = |n: usize, half: f64| -> Vec<f64> {
        (0..n)
            .map(|i| -half + half * (2 * i + 1) as f64 / n as f64)
            .collect()
    };
    let (y, x) = (centres(h, ys), centres(w, xs));
    let grid: Vec<f32> = y
        .iter()
        .flat_map(|&yv| x.iter().flat_map(move |&xv| [yv as f32, xv as f32]))
        .collect();
    Tensor::from_vec(grid, (h, w, 2), device)
}

/// The mean of each 2×2 block of positions (k-diffusion's `downscale_pos`).
fn downscale_pos(pos: &Tensor) -> Result<Tensor> {
    let (h, w, _) = pos.dims3()?;
    pos.reshape((h / 2, 2, w / 2, 2, 2))?.mean(3)?.mean(1)
}

/// The conditioning both hourglass-shaped models share (LocalMamba's too): Fourier features of
/// the noise level and of the (always zero) augmentation vector, each projected, plus the class
/// row and the projected extra condition, through RMSNorm → `depth` × [RMSNorm → GEGLU →
/// dropout → zero-initialised down, residual] → RMSNorm. Its names are the reference's
/// top-level `time_emb`, `time_in_proj`, `aug_emb`, `aug_in_proj`, `class_emb`,
/// `mapping_cond_in_proj` and `mapping.*`.
pub(crate) struct MappingNetwork {
    time_emb: FourierFeatures,
    time_in_proj: Linear,
    aug_emb: FourierFeatures,
    aug_in_proj: Linear,
    class_emb: Option<Tensor>,
    cond_in_proj: Option<Linear>,
    in_norm: Tensor,
    /// Each block's RMSNorm scale, GEGLU up projection and down projection.
    blocks: Vec<(Tensor, Linear, Linear)>,
    out_norm: Tensor,
    /// Added to σ before its log: the hourglass's guard for σ = 0 (1e-9); LocalMamba has none.
    sigma_eps: f64,
    dropout: f64,
}

/// The mapping network's sizes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct MappingShape {
    pub width: usize,
    pub depth: usize,
    pub d_ff: usize,
    pub class_rows: usize,
    pub cond_dim: usize,
    pub dropout: f64,
    pub sigma_eps: f64,
}

impl MappingNetwork {
    pub(crate) fn new(p: &mut Params, s: &MappingShape) -> Result<Self> {
        let m = s.width;
        Ok(MappingNetwork {
            time_emb: FourierFeatures::new(p, "time_emb", 1, m)?,
            time_in_proj: Linear::with_bias(p, "time_in_proj", m, m, false)?,
            aug_emb: FourierFeatures::new(p, "aug_emb", 9, m)?,
            aug_in_proj: Linear::with_bias(p, "aug_in_proj", m, m, false)?,
            class_emb: (s.class_rows > 0)
                .then(|| p.normal("class_emb.weight".into(), &[s.class_rows, m], 1.0))
                .transpose()?,
            cond_in_proj: (s.cond_dim > 0)
                .then(|| Linear::with_bias(p, "mapping_cond_in_proj", s.cond_dim, m, false))
                .transpose()?,
            in_norm: p.constant("mapping.in_norm.scale".into(), &[m], 1.0)?,
            blocks: (0..s.depth)
                .map(|i| {
                    let name = format!("mapping.blocks.{i}");
                    Ok((
                        p.constant(format!("{name}.norm.scale"), &[m], 1.0)?,
                        Linear::with_bias(p, &format!("{name}.up_proj"), m, 2 * s.d_ff, false)?,
                        zero_linear(p, &format!("{name}.down_proj"), s.d_ff, m)?,
                    ))
                })
                .collect::<Result<_>>()?,
            out_norm: p.constant("mapping.out_norm.scale".into(), &[m], 1.0)?,
            sigma_eps: s.sigma_eps,
            dropout: s.dropout,
        })
    }

    /// `cond` (B, M) for noise levels `sigma` (B,) (the flow's σ ∈ (0, 1]), class rows `class`
    /// (B,) and extra inputs `mapping_cond` (B, cond_dim).
    pub(crate) fn forward(
        &self,
        sigma: &Tensor,
        class: Option<&Tensor>,
        mapping_cond: Option<&Tensor>,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let b = sigma.dim(0)?;
        let c_noise = ((sigma + self.sigma_eps)?.log()? / 4.0)?.reshape((b, 1))?;
        let mut sum = self
            .time_in_proj
            .forward(&self.time_emb.forward(&c_noise)?)?;
        let aug = Tensor::zeros((b, 9), DType::F32, sigma.device())?;
        sum = (sum + self.aug_in_proj.forward(&self.aug_emb.forward(&aug)?)?)?;
        match (&self.class_emb, class) {
            (Some(table), Some(y)) => sum = (sum + table.index_select(y, 0)?)?,
            (Some(_), None) => candle_core::bail!("this model takes a class per sample"),
            _ => {}
        }
        match (&self.cond_in_proj, mapping_cond) {
            (Some(proj), Some(c)) => sum = (sum + proj.forward(c)?)?,
            (Some(_), None) => {
                candle_core::bail!("this model takes a mapping condition per sample")
            }
            _ => {}
        }
        let mut x = rms_norm(&sum, &self.in_norm)?;
        for (norm, up, down) in &self.blocks {
            let h = geglu(up, &rms_norm(&x, norm)?)?;
            x = (&x + down.forward(&dropout(&h, self.dropout, mode)?)?)?;
        }
        rms_norm(&x, &self.out_norm)
    }
}

/// The hourglass of levels both models share: each outer level's `down_levels.i` stack, a 2×2
/// `merges.i`, the `mid_level`, then per level inward-out a 2×2 `splits.i` (a linear,
/// unshuffled, lerped with the level's skip by `splits.i.fac`, initialised to 0.5) and the
/// `up_levels.i` stack. `L` is the model's layer.
pub(crate) struct Levels<L> {
    down: Vec<Vec<L>>,
    mid: Vec<L>,
    up: Vec<Vec<L>>,
    merges: Vec<TokenMerge>,
    splits: Vec<(Linear, Tensor)>,
}

impl<L> Levels<L> {
    /// `widths` and `depths` outermost first; `layer(p, name, level, index)` builds one layer
    /// (its index in the level: the down stack's 0..depth, the up stack's depth..2·depth, as
    /// k-diffusion numbers them). Built in
    /// the reference's order (each outer level's down then up stack, then the middle, then the
    /// merges and splits), so a seeded model draws the same streams.
    pub(crate) fn new(
        p: &mut Params,
        widths: &[usize],
        depths: &[usize],
        mut layer: impl FnMut(&mut Params, String, usize, usize) -> Result<L>,
    ) -> Result<Self> {
        let last = widths.len() - 1;
        let mut stack =
            |p: &mut Params, name: &str, level: usize, first: usize| -> Result<Vec<L>> {
                (0..depths[level])
                    .map(|j| layer(p, format!("{name}.{j}"), level, first + j))
                    .collect()
            };
        let (mut down, mut up) = (vec![], vec![]);
        for (i, &depth) in depths.iter().enumerate().take(last) {
            down.push(stack(p, &format!("down_levels.{i}"), i, 0)?);
            up.push(stack(p, &format!("up_levels.{i}"), i, depth)?);
        }
        let mid = stack(p, "mid_level", last, 0)?;
        let merges = (0..last)
            .map(|i| TokenMerge::new(p, &format!("merges.{i}"), widths[i], widths[i + 1], [2, 2]))
            .collect::<Result<_>>()?;
        let splits = (0..last)
            .map(|i| {
                let name = format!("splits.{i}");
                let proj = Linear::with_bias(
                    p,
                    &format!("{name}.proj"),
                    widths[i + 1],
                    4 * widths[i],
                    false,
                )?;
                Ok((proj, p.constant(format!("{name}.fac"), &[1], 0.5)?))
            })
            .collect::<Result<_>>()?;
        Ok(Levels {
            down,
            mid,
            up,
            merges,
            splits,
        })
    }

    /// x (B, H, W, C₀) through the hourglass, one tape segment per layer, merge and split;
    /// `layer` runs one layer of a level with the mapping's `cond`.
    fn forward<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        mut x: Node,
        cond: Node,
        layer: &Rc<LayerFn<'a, L>>,
    ) -> Result<Node> {
        let run = |tape: &mut Tape<'a>, stack: &'a [L], mut x: Node, level: usize| {
            for l in stack {
                let layer = layer.clone();
                x = tape.apply(&[x, cond], move |v, mode| {
                    layer(l, &v[0], level, &v[1], mode)
                })?;
            }
            Ok::<_, candle_core::Error>(x)
        };
        let mut skips = vec![];
        for (i, (stack, merge)) in self.down.iter().zip(&self.merges).enumerate() {
            x = run(tape, stack, x, i)?;
            skips.push(x);
            x = tape.apply(&[x], move |v, _| merge.forward(&v[0]))?;
        }
        x = run(tape, &self.mid, x, self.down.len())?;
        for (i, ((stack, (proj, fac)), skip)) in self
            .up
            .iter()
            .zip(&self.splits)
            .zip(skips)
            .enumerate()
            .rev()
        {
            // lerp(skip, x, fac) = skip + fac·(x − skip).
            x = tape.apply(&[x, skip], move |v, _| {
                let up = token_split(proj, &v[0], [2, 2])?;
                &v[1] + (up - &v[1])?.broadcast_mul(fac)?
            })?;
            x = run(tape, stack, x, i)?;
        }
        Ok(x)
    }
}

/// One layer of a level: (layer, x, level, cond, mode) → x.
pub(crate) type LayerFn<'a, L> =
    dyn Fn(&L, &Tensor, usize, &Tensor, &mut Mode) -> Result<Tensor> + 'a;

/// Both models' frame around their levels: `patch_in` (TokenMerge of the input patch), the
/// mapping network, the [`Levels`], `out_norm` (RMSNorm) and `patch_out` (a zero-initialised
/// TokenSplit without skip).
pub(crate) struct Skeleton<L> {
    patch: [usize; 2],
    patch_in: TokenMerge,
    mapping: MappingNetwork,
    levels: Levels<L>,
    out_norm: Tensor,
    patch_out: Linear,
}

impl<L> Skeleton<L> {
    /// Built in the reference's order: patch_in, the mapping network, the levels (`layer`
    /// builds one layer of a level), out_norm, patch_out.
    pub(crate) fn new(
        p: &mut Params,
        (in_channels, out_channels, patch): (usize, usize, [usize; 2]),
        mapping: &MappingShape,
        (widths, depths): (&[usize], &[usize]),
        layer: impl FnMut(&mut Params, String, usize, usize) -> Result<L>,
    ) -> Result<Self> {
        let w0 = widths[0];
        let patch_in = TokenMerge::new(p, "patch_in", in_channels, w0, patch)?;
        let mapping = MappingNetwork::new(p, mapping)?;
        let levels = Levels::new(p, widths, depths, layer)?;
        let out_norm = p.constant("out_norm.scale".into(), &[w0], 1.0)?;
        let patch_out = zero_linear(p, "patch_out.proj", w0, out_channels * patch[0] * patch[1])?;
        Ok(Skeleton {
            patch,
            patch_in,
            mapping,
            levels,
            out_norm,
            patch_out,
        })
    }

    /// x (B, in, H, W) → (B, out, H, W) recorded on `tape`: patched to (B, H/p_h, W/p_w, C₀)
    /// channels-last, through the levels (`layer` runs one layer with the mapping's `cond`),
    /// then normalised and unpatched.
    pub(crate) fn record<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        x: &Tensor,
        (sigma, class, mapping_cond): (&Tensor, Option<&Tensor>, Option<&Tensor>),
        layer: Rc<LayerFn<'a, L>>,
    ) -> Result<Node> {
        let mut inputs = vec![tape.input(sigma)];
        inputs.extend(class.map(|c| tape.input(c)));
        inputs.extend(mapping_cond.map(|c| tape.input(c)));
        let (has_class, has_cond) = (class.is_some(), mapping_cond.is_some());
        let cond = tape.apply(&inputs, move |v, mode| {
            let class = has_class.then(|| &v[1]);
            let mapping_cond = has_cond.then(|| &v[v.len() - 1]);
            self.mapping.forward(&v[0], class, mapping_cond, mode)
        })?;
        let x = tape.input(&x.permute((0, 2, 3, 1))?);
        let x = tape.apply(&[x], |v, _| self.patch_in.forward(&v[0]))?;
        let x = self.levels.forward(tape, x, cond, &layer)?;
        tape.apply(&[x], |v, _| {
            let x = rms_norm(&v[0], &self.out_norm)?;
            token_split(&self.patch_out, &x, self.patch)?.permute((0, 3, 1, 2))
        })
    }
}

pub struct Hourglass {
    shape: HourglassShape,
    skeleton: Skeleton<Layer>,
}

/// Which of the reference's four optimizer groups a parameter is in (`param_groups`): weights
/// that k-diffusion tags for weight decay, and the mapping network with the AdaRMSNorm
/// projections at a third of the learning rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamGroup {
    pub weight_decay: bool,
    pub mapping: bool,
}

/// The group of the parameter called `name` (a name [`Hourglass::new`] gives).
pub fn param_group(name: &str) -> ParamGroup {
    let mapping = name.starts_with("mapping.") || name.ends_with(".norm.linear.weight");
    // The input projections of the mapping's sum and the class table are not tagged.
    let untagged = [
        "time_in_proj.",
        "aug_in_proj.",
        "class_emb.",
        "mapping_cond_in_proj.",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix));
    ParamGroup {
        weight_decay: name.ends_with(".weight") && !untagged,
        mapping,
    }
}

impl Hourglass {
    pub fn new(shape: &HourglassShape, p: &mut Params) -> Result<Self> {
        let m = shape.mapping_width;
        if shape.levels.is_empty() {
            candle_core::bail!("an hourglass needs at least one level");
        }
        let mapping = MappingShape {
            width: m,
            depth: shape.mapping_depth,
            d_ff: shape.mapping_d_ff,
            class_rows: shape.class_rows,
            cond_dim: shape.mapping_cond_dim,
            dropout: shape.mapping_dropout,
            sigma_eps: 1e-9,
        };
        let widths: Vec<usize> = shape.levels.iter().map(|l| l.width).collect();
        let depths: Vec<usize> = shape.levels.iter().map(|l| l.depth).collect();
        let io = (shape.in_channels, shape.out_channels, shape.patch);
        let skeleton = Skeleton::new(p, io, &mapping, (&widths, &depths), |p, name, i, j| {
            let spec = &shape.levels[i];
            let self_attn = match spec.attention {
                SelfAttention::None => None,
                kind => Some(Attention::new(
                    p,
                    &format!("{name}.self_attn"),
                    spec.width,
                    m,
                    (kind, j),
                )?),
            };
            Ok(Layer {
                self_attn,
                ff: FeedForward::new(p, &format!("{name}.ff"), spec.width, spec.d_ff, m)?,
            })
        })?;
        Ok(Hourglass {
            shape: shape.clone(),
            skeleton,
        })
    }

    /// The prediction (B, out, H, W) for x (B, in, H, W) at noise levels `sigma` (B,), with
    /// class rows `class` (B,) and extra mapping inputs `mapping_cond` (B, cond_dim) when the
    /// shape has them; dropout when `mode` trains.
    pub fn forward(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        class: Option<&Tensor>,
        mapping_cond: Option<&Tensor>,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        Tape::forward(mode, |tape| {
            self.record(tape, x, (sigma, class, mapping_cond))
        })
    }

    /// The forward on `tape` (models/tape.rs: one segment per layer, which is what gradient
    /// checkpointing recomputes).
    pub fn record<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        x: &Tensor,
        conditions: (&Tensor, Option<&Tensor>, Option<&Tensor>),
    ) -> Result<Node> {
        let [ph, pw] = self.shape.patch;
        // Each level's positions: the patched grid's, mean-pooled 2×2 per merge.
        let mut positions = vec![axial_pos(x.dim(2)? / ph, x.dim(3)? / pw, x.device())?];
        for _ in 1..self.shape.levels.len() {
            let last = positions.last().expect("the first level's");
            positions.push(downscale_pos(last)?);
        }
        let levels = &self.shape.levels;
        // Each shifted-window level's mask of the wrap, once per forward (its odd layers use it).
        let wraps = levels
            .iter()
            .zip(&positions)
            .map(|(l, pos)| match l.attention {
                SelfAttention::ShiftedWindow { window, .. } if window / 2 > 0 => {
                    let (gh, gw) = (pos.dim(0)?, pos.dim(1)?);
                    wrap_mask(gh / window, gw / window, window, window / 2, pos.device()).map(Some)
                }
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let layer = move |l: &Layer, x: &Tensor, level: usize, cond: &Tensor, mode: &mut Mode| {
            let drop = levels[level].dropout;
            match &l.self_attn {
                Some(a) => {
                    let context = (&positions[level], wraps[level].as_ref());
                    let x = a.forward(x, context, cond, drop, mode)?;
                    l.ff.forward(&x, cond, drop, mode)
                }
                None => l.ff.forward(x, cond, drop, mode),
            }
        };
        self.skeleton.record(tape, x, conditions, Rc::new(layer))
    }
}

/// The model's trainable parameters, counted without drawing them.
pub fn count_parameters(shape: &HourglassShape) -> Result<usize> {
    let mut p = Params::counting();
    Hourglass::new(shape, &mut p)?;
    Ok(p.count())
}
