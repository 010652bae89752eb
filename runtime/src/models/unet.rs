//! The Stable Diffusion 1.5 UNet: diffusers' `UNet2DConditionModel` with the blocks SD 1.5 uses
//! (`CrossAttnDownBlock2D` / `DownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D` /
//! `CrossAttnUpBlock2D`), under diffusers' parameter names, built from the numbers of its
//! `unet/config.json` and trainable: every layer here has a backward (GroupNorm as our grouped
//! norm op, LayerNorm as differentiable ops, self-attention through the project's attention op, the
//! cross-attention's softmax through ops::attention::softmax_last), and timesteps are one per
//! sample (candle-transformers' UNet takes one per batch and drops q/k gradients in its fused
//! softmax and norms: spec/pretrained-models.md §2).
//!
//!   t ─ sinusoid ─ linear_1 ─ SiLU ─ linear_2 ─────────────── temb (to every ResNet)
//!   x ─ conv_in ─ down blocks ─ mid block ─ up blocks ─ GroupNorm ─ SiLU ─ conv_out
//!                  │ (ResNet, transformer)×n, ↓2  ↑ (cat skip, ResNet, transformer)×(n+1), ↑2
//!                  └───────────── every output kept as a skip ──────┘
//!
//! A transformer is `Transformer2DModel`: GroupNorm (eps 1e-6), 1×1 `proj_in`, then per token
//! LayerNorm → self-attention, LayerNorm → cross-attention to the text tokens, LayerNorm →
//! GEGLU feed-forward, each residual, then 1×1 `proj_out`, residual around the whole.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use super::nn::{affine, Conv, LayerNorm, Linear, Params};
use crate::ops::attention::{attention, softmax_last};
use crate::ops::gelu::silu;
use crate::ops::norm::group_norm_grouped;
use crate::ops::precision::matmul;

/// The numbers of a `unet/config.json` that shape the model (read and checked at build time).
pub use signal_diffusion_config::pretrained::Unet as UnetShape;

/// The layers diffusers' SD LoRA training scripts adapt: every attention projection, self and
/// cross.
pub const LORA_TARGETS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];

fn time_dim(s: &UnetShape) -> usize {
    4 * s.block_out_channels[0]
}

/// GroupNorm over (B, C, H, W) with `groups` groups and a per-channel affine (one op).
struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    fn new(p: &mut Params, name: &str, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        let (weight, bias) = affine(p, name, channels)?;
        Ok(GroupNorm {
            weight,
            bias,
            groups,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        group_norm_grouped(x, &self.weight, &self.bias, self.groups, self.eps)
    }
}

/// `ResnetBlock2D`: GroupNorm, SiLU, conv; + the time embedding's projection; GroupNorm, SiLU,
/// conv; plus the input (through a 1×1 conv when the width changes).
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv,
    time: Linear,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl Resnet {
    fn new(p: &mut Params, name: &str, cin: usize, cout: usize, s: &UnetShape) -> Result<Self> {
        let (g, eps) = (s.norm_num_groups, s.norm_eps);
        Ok(Resnet {
            norm1: GroupNorm::new(p, &format!("{name}.norm1"), cin, g, eps)?,
            conv1: Conv::new(p, &format!("{name}.conv1"), 2, cin, cout, 3)?,
            time: Linear::new(p, &format!("{name}.time_emb_proj"), time_dim(s), cout)?,
            norm2: GroupNorm::new(p, &format!("{name}.norm2"), cout, g, eps)?,
            conv2: Conv::new(p, &format!("{name}.conv2"), 2, cout, cout, 3)?,
            shortcut: match cin != cout {
                true => Some(Conv::new(
                    p,
                    &format!("{name}.conv_shortcut"),
                    2,
                    cin,
                    cout,
                    1,
                )?),
                false => None,
            },
        })
    }

    /// `temb_act`: SiLU of the time embedding (the same for every ResNet).
    fn forward(&self, x: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&silu(&self.norm1.forward(x)?)?)?;
        let t = self.time.forward(temb_act)?.unsqueeze(2)?.unsqueeze(3)?;
        let h = h.broadcast_add(&t)?;
        let h = self.conv2.forward(&silu(&self.norm2.forward(&h)?)?)?;
        match &self.shortcut {
            Some(conv) => conv.forward(x)? + h,
            None => x + h,
        }
    }
}

/// diffusers' `Attention` without biases on q, k, v: self-attention (`attn1`) or
/// cross-attention to the text tokens (`attn2`, k and v from `context_dim`).
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn new(
        p: &mut Params,
        name: &str,
        dim: usize,
        context_dim: usize,
        heads: usize,
    ) -> Result<Self> {
        Ok(Attention {
            q: Linear::with_bias(p, &format!("{name}.to_q"), dim, dim, false)?,
            k: Linear::with_bias(p, &format!("{name}.to_k"), context_dim, dim, false)?,
            v: Linear::with_bias(p, &format!("{name}.to_v"), context_dim, dim, false)?,
            out: Linear::new(p, &format!("{name}.to_out.0"), dim, dim)?,
            heads,
        })
    }

    /// x (B, N, dim) attends to `context` (B, M, context_dim), or to itself.
    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let q = self.q.forward(x)?;
        let attended = match context {
            None => attention(&q, &self.k.forward(x)?, &self.v.forward(x)?, self.heads)?,
            Some(c) => self.cross(&q, &self.k.forward(c)?, &self.v.forward(c)?)?,
        };
        self.out.forward(&attended)
    }

    /// softmax(q·kᵀ/√d)·v per head with k, v of another length than q (the text's 77 tokens: a
    /// small score matrix, written as two products around the softmax op).
    fn cross(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, n, width) = q.dims3()?;
        let d = width / self.heads;
        let split = |t: &Tensor| {
            let m = t.dim(1)?;
            t.reshape((b, m, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(q)?, split(k)?, split(v)?);
        let scores = (matmul(&q, &k.t()?.contiguous()?)? / (d as f64).sqrt())?;
        matmul(&softmax_last(&scores)?, &v)?
            .transpose(1, 2)?
            .reshape((b, n, width))
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, each after a
/// LayerNorm and residual.
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn new(p: &mut Params, name: &str, dim: usize, s: &UnetShape, heads: usize) -> Result<Self> {
        let n = |part: &str| format!("{name}.{part}");
        Ok(TransformerBlock {
            norm1: LayerNorm::new(p, &n("norm1"), dim)?,
            attn1: Attention::new(p, &n("attn1"), dim, dim, heads)?,
            norm2: LayerNorm::new(p, &n("norm2"), dim)?,
            attn2: Attention::new(p, &n("attn2"), dim, s.cross_attention_dim, heads)?,
            norm3: LayerNorm::new(p, &n("norm3"), dim)?,
            ff_in: Linear::new(p, &n("ff.net.0.proj"), dim, 8 * dim)?,
            ff_out: Linear::new(p, &n("ff.net.2"), 4 * dim, dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (x + self.attn1.forward(&self.norm1.forward(x)?, None)?)?;
        let x = (&x
            + self
                .attn2
                .forward(&self.norm2.forward(&x)?, Some(context))?)?;
        let h = crate::ops::gelu::geglu(&self.ff_in.forward(&self.norm3.forward(&x)?)?)?;
        &x + self.ff_out.forward(&h)?
    }
}

/// A 1×1 projection between the feature map and the tokens: a convolution (SD 1.5) or a linear
/// layer on the tokens (`use_linear_projection`), both with diffusers' weight shapes.
enum Projection {
    Conv(Conv),
    Linear(Linear),
}

impl Projection {
    fn new(p: &mut Params, name: &str, c: usize, s: &UnetShape) -> Result<Self> {
        Ok(match s.use_linear_projection {
            true => Projection::Linear(Linear::new(p, name, c, c)?),
            false => Projection::Conv(Conv::new(p, name, 2, c, c, 1)?),
        })
    }
}

/// `Transformer2DModel` with one `BasicTransformerBlock` (SD 1.5's `transformer_layers_per_block`).
struct Transformer {
    norm: GroupNorm,
    proj_in: Projection,
    block: TransformerBlock,
    proj_out: Projection,
}

impl Transformer {
    fn new(p: &mut Params, name: &str, c: usize, heads: usize, s: &UnetShape) -> Result<Self> {
        Ok(Transformer {
            norm: GroupNorm::new(p, &format!("{name}.norm"), c, s.norm_num_groups, 1e-6)?,
            proj_in: Projection::new(p, &format!("{name}.proj_in"), c, s)?,
            block: TransformerBlock::new(p, &format!("{name}.transformer_blocks.0"), c, s, heads)?,
            proj_out: Projection::new(p, &format!("{name}.proj_out"), c, s)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_tokens = |m: &Tensor| m.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous();
        let to_map = |t: &Tensor| t.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w));
        let normed = self.norm.forward(x)?;
        let tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        let tokens = self.block.forward(&tokens, context)?;
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens)?)?,
            Projection::Linear(lin) => to_map(&lin.forward(&tokens)?)?,
        };
        x + out
    }
}

/// A 3×3 convolution of stride 2, padding 1 (`Downsample2D`), or nearest-neighbour 2× then a 3×3
/// convolution (`Upsample2D`); Candle's strided convolution and upsampling have backwards.
struct Resample {
    conv: Conv,
}

impl Resample {
    fn new(p: &mut Params, name: &str, c: usize) -> Result<Self> {
        Ok(Resample {
            conv: Conv::new(p, &format!("{name}.conv"), 2, c, c, 3)?,
        })
    }

    /// The 3×3 stride-2 convolution (padding 1) as one GEMM of our linear op over the nine
    /// strided views of the padded input (Candle's strided convolution's backward is a direct
    /// transposed convolution).
    fn down(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (ho, wo) = (h.div_ceil(2), w.div_ceil(2));
        // Padded to 2·ho + 2 rows and 2·wo + 2 columns, so each tap's view is a reshape.
        let padded =
            x.pad_with_zeros(2, 1, 2 * ho + 1 - h)?
                .pad_with_zeros(3, 1, 2 * wo + 1 - w)?;
        let mut taps = Vec::with_capacity(9);
        for ky in 0..3 {
            let rows = padded
                .narrow(2, ky, 2 * ho)?
                .reshape((b, c, ho, 2, 2 * wo + 2))?
                .narrow(3, 0, 1)?;
            for kx in 0..3 {
                let tap = rows
                    .narrow(4, kx, 2 * wo)?
                    .reshape((b, c, ho, 1, wo, 2))?
                    .narrow(5, 0, 1)?;
                taps.push(tap.reshape((b, c, 1, ho, wo))?);
            }
        }
        // (B, C, 9, ho, wo) -> rows (B·ho·wo, C·9) in the kernel's (C, ky, kx) order.
        let cols = Tensor::cat(&taps, 2)?
            .permute([0, 3, 4, 1, 2])?
            .reshape((b * ho * wo, c * 9))?;
        let (weight, bias) = self.conv.parts();
        let o = weight.dim(0)?;
        let kernel = weight.reshape((o, c * 9))?;
        let y = match bias {
            Some(bias) => crate::ops::linear::linear(&cols, &kernel, bias)?,
            None => matmul(&cols, &kernel.t()?)?,
        };
        y.reshape((b, ho, wo, o))?
            .permute([0, 3, 1, 2])?
            .contiguous()
    }

    /// Nearest-neighbour 2× as a broadcast (Candle's `upsample_nearest2d` backward is a grouped
    /// convolution, one per channel), then the convolution.
    fn up(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let doubled = x
            .reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, 2, w, 2))?
            .reshape((b, c, 2 * h, 2 * w))?;
        self.conv.forward(&doubled)
    }
}

/// A level of the UNet: its ResNets, their transformers (cross-attention blocks) and the
/// resampling at its end (none at the bottom going down, none at the top going up).
struct Level {
    resnets: Vec<Resnet>,
    transformers: Vec<Transformer>,
    resample: Option<Resample>,
}

pub struct Unet {
    shape: UnetShape,
    time_1: Linear,
    time_2: Linear,
    conv_in: Conv,
    down: Vec<Level>,
    mid: (Resnet, Transformer, Resnet),
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Unet {
    /// The model of `s`, its layers named as diffusers names them.
    pub fn new(s: &UnetShape, p: &mut Params) -> Result<Self> {
        let ch = &s.block_out_channels;
        let levels = ch.len();
        let (c0, td) = (ch[0], time_dim(s));
        let time_1 = Linear::new(p, "time_embedding.linear_1", c0, td)?;
        let time_2 = Linear::new(p, "time_embedding.linear_2", td, td)?;
        let conv_in = Conv::new(p, "conv_in", 2, s.in_channels, c0, 3)?;
        let mut down = Vec::with_capacity(levels);
        for (i, &cout) in ch.iter().enumerate() {
            let name = format!("down_blocks.{i}");
            let cin = if i == 0 { c0 } else { ch[i - 1] };
            let mut level = Level {
                resnets: vec![],
                transformers: vec![],
                resample: None,
            };
            for j in 0..s.layers_per_block {
                let rin = if j == 0 { cin } else { cout };
                level.resnets.push(Resnet::new(
                    p,
                    &format!("{name}.resnets.{j}"),
                    rin,
                    cout,
                    s,
                )?);
                if s.down_attention[i] {
                    let t = Transformer::new(
                        p,
                        &format!("{name}.attentions.{j}"),
                        cout,
                        s.heads[i],
                        s,
                    )?;
                    level.transformers.push(t);
                }
            }
            if i + 1 < levels {
                level.resample = Some(Resample::new(p, &format!("{name}.downsamplers.0"), cout)?);
            }
            down.push(level);
        }
        let last = ch[levels - 1];
        let mid = (
            Resnet::new(p, "mid_block.resnets.0", last, last, s)?,
            Transformer::new(p, "mid_block.attentions.0", last, s.heads[levels - 1], s)?,
            Resnet::new(p, "mid_block.resnets.1", last, last, s)?,
        );
        let mut up = Vec::with_capacity(levels);
        let reversed: Vec<usize> = ch.iter().rev().copied().collect();
        let heads: Vec<usize> = s.heads.iter().rev().copied().collect();
        for i in 0..levels {
            let name = format!("up_blocks.{i}");
            let prev = reversed[i.saturating_sub(1)];
            let cout = reversed[i];
            let input = reversed[(i + 1).min(levels - 1)];
            let mut level = Level {
                resnets: vec![],
                transformers: vec![],
                resample: None,
            };
            for j in 0..=s.layers_per_block {
                let skip = if j == s.layers_per_block { input } else { cout };
                let rin = if j == 0 { prev } else { cout };
                level.resnets.push(Resnet::new(
                    p,
                    &format!("{name}.resnets.{j}"),
                    rin + skip,
                    cout,
                    s,
                )?);
                if s.up_attention[i] {
                    let t =
                        Transformer::new(p, &format!("{name}.attentions.{j}"), cout, heads[i], s)?;
                    level.transformers.push(t);
                }
            }
            if i + 1 < levels {
                level.resample = Some(Resample::new(p, &format!("{name}.upsamplers.0"), cout)?);
            }
            up.push(level);
        }
        Ok(Unet {
            shape: s.clone(),
            time_1,
            time_2,
            conv_in,
            down,
            mid,
            up,
            norm_out: GroupNorm::new(p, "conv_norm_out", c0, s.norm_num_groups, s.norm_eps)?,
            conv_out: Conv::new(p, "conv_out", 2, c0, s.out_channels, 3)?,
        })
    }

    pub fn shape(&self) -> &UnetShape {
        &self.shape
    }

    /// x (B, C, H, W) at timesteps `t` (one per sample, the scheduler's 0..T scale) attending
    /// to `context` (B, M, cross_attention_dim), the text encoder's hidden states -> the
    /// prediction, shaped like x.
    pub fn forward(&self, x: &Tensor, t: &[f32], context: &Tensor) -> Result<Tensor> {
        let temb_act = self.time_embedding(t, x.device())?;
        let mut values = vec![self.conv_in.forward(x)?];
        for segment in self.segments() {
            let h = values.last().expect("conv_in's output");
            let skip = segment.skip.map(|i| &values[i]);
            let out = segment.forward(h, skip, &temb_act, context)?;
            values.push(out);
        }
        self.head(values.last().expect("the last block's output"))
    }

    /// SiLU of the time embedding, what every ResNet reads.
    fn time_embedding(&self, t: &[f32], device: &candle_core::Device) -> Result<Tensor> {
        let c0 = self.shape.block_out_channels[0];
        let features = super::dit::sinusoid(t, c0, self.shape.freq_shift, device)?;
        let temb = self
            .time_2
            .forward(&silu(&self.time_1.forward(&features)?)?)?;
        silu(&temb)
    }

    fn head(&self, h: &Tensor) -> Result<Tensor> {
        self.conv_out.forward(&silu(&self.norm_out.forward(h)?)?)
    }

    /// The blocks after `conv_in`, in order, each taking the previous one's output (value k − 1
    /// for block k, value 0 being conv_in's) and an up-block ResNet also the skip it reads (the
    /// index of a down-path value).
    fn segments(&self) -> Vec<Segment<'_>> {
        let mut segments = vec![];
        let mut skips = vec![0];
        fn push<'a>(
            segments: &mut Vec<Segment<'a>>,
            block: Block<'a>,
            skip: Option<usize>,
        ) -> usize {
            segments.push(Segment { block, skip });
            segments.len()
        }
        for level in &self.down {
            for (j, resnet) in level.resnets.iter().enumerate() {
                let mut out = push(&mut segments, Block::Resnet(resnet), None);
                if let Some(t) = level.transformers.get(j) {
                    out = push(&mut segments, Block::Transformer(t), None);
                }
                skips.push(out);
            }
            if let Some(down) = &level.resample {
                skips.push(push(&mut segments, Block::Down(down), None));
            }
        }
        let (r0, attn, r1) = &self.mid;
        for block in [
            Block::Resnet(r0),
            Block::Transformer(attn),
            Block::Resnet(r1),
        ] {
            push(&mut segments, block, None);
        }
        for level in &self.up {
            for (j, resnet) in level.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up-block ResNet");
                push(&mut segments, Block::Resnet(resnet), Some(skip));
                if let Some(t) = level.transformers.get(j) {
                    push(&mut segments, Block::Transformer(t), None);
                }
            }
            if let Some(up) = &level.resample {
                push(&mut segments, Block::Up(up), None);
            }
        }
        segments
    }

    /// Gradient checkpointing: `loss_of(self.forward(x, t, context))` and the gradients of
    /// every parameter, keeping only each block's output during the forward (the skips are
    /// among them) and recomputing one block at a time in the backward, last first, from the
    /// gradient its output gathered (from the next block, and from the up-block that reads it
    /// as a skip). The time embedding's gradient is summed over the ResNets, then taken through
    /// its MLP. Costs one more forward of the blocks; the activations held are one block's.
    pub fn checkpointed_backward(
        &self,
        x: &Tensor,
        t: &[f32],
        context: &Tensor,
        loss_of: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, GradStore)> {
        let temb_act = self.time_embedding(t, x.device())?;
        let temb_in = Var::from_tensor(&temb_act.detach())?;
        let segments = self.segments();
        // Forward without graphs: detaching drops each block's activations at once.
        let mut values = vec![self.conv_in.forward(x)?.detach()];
        for segment in &segments {
            let h = values.last().expect("conv_in's output");
            let skip = segment.skip.map(|i| &values[i]);
            let out = segment.forward(h, skip, temb_in.as_tensor(), context)?;
            values.push(out.detach());
        }
        let last = Var::from_tensor(values.last().expect("the last block's output"))?;
        let loss = loss_of(&self.head(last.as_tensor())?)?;
        let mut total = loss.backward()?;
        let mut grads: Vec<Option<Tensor>> = vec![None; values.len()];
        grads[values.len() - 1] = Some(super::dit::take_grad(&mut total, last.as_tensor())?);
        let mut temb_grad: Option<Tensor> = None;
        let add = |slot: &mut Option<Tensor>, g: Tensor| -> Result<()> {
            *slot = Some(match slot.take() {
                Some(sum) => (sum + g)?,
                None => g,
            });
            Ok(())
        };
        // Segment k's output is value k + 1; its input value k, and its skip.
        for (k, segment) in segments.iter().enumerate().rev() {
            let Some(upstream) = grads[k + 1].take() else {
                continue;
            };
            let h = Var::from_tensor(&values[k])?;
            let skip = segment
                .skip
                .map(|i| Var::from_tensor(&values[i]))
                .transpose()?;
            let temb = Var::from_tensor(temb_in.as_tensor())?;
            let out = segment.forward(
                h.as_tensor(),
                skip.as_ref().map(Var::as_tensor),
                temb.as_tensor(),
                context,
            )?;
            let mut g = (out * &upstream)?.sum_all()?.backward()?;
            g.remove(&upstream);
            add(&mut grads[k], super::dit::take_grad(&mut g, h.as_tensor())?)?;
            if let (Some(skip), Some(i)) = (&skip, segment.skip) {
                add(
                    &mut grads[i],
                    super::dit::take_grad(&mut g, skip.as_tensor())?,
                )?;
            }
            if let Block::Resnet(_) = segment.block {
                add(
                    &mut temb_grad,
                    super::dit::take_grad(&mut g, temb.as_tensor())?,
                )?;
            }
            total.extend(g)?;
        }
        // conv_in and the time embedding's MLP, from their outputs' gradients.
        let conv_in = self.conv_in.forward(x)?;
        let mut tail = match grads[0].take() {
            Some(g) => (conv_in * g)?.sum_all()?,
            None => Tensor::zeros((), conv_in.dtype(), x.device())?,
        };
        if let Some(g) = temb_grad {
            tail = (tail + (temb_act * g)?.sum_all()?)?;
        }
        total.extend(tail.backward()?)?;
        Ok((loss, total))
    }
}

/// One block of the UNet between `conv_in` and the head.
enum Block<'a> {
    Resnet(&'a Resnet),
    Transformer(&'a Transformer),
    Down(&'a Resample),
    Up(&'a Resample),
}

struct Segment<'a> {
    block: Block<'a>,
    /// The down-path value an up-block ResNet concatenates to its input.
    skip: Option<usize>,
}

impl Segment<'_> {
    fn forward(
        &self,
        h: &Tensor,
        skip: Option<&Tensor>,
        temb_act: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        match (&self.block, skip) {
            (Block::Resnet(r), Some(skip)) => r.forward(&Tensor::cat(&[h, skip], 1)?, temb_act),
            (Block::Resnet(r), None) => r.forward(h, temb_act),
            (Block::Transformer(t), _) => t.forward(h, context),
            (Block::Down(d), _) => d.down(h),
            (Block::Up(u), _) => u.up(h),
        }
    }
}
