//! The Stable Diffusion 3 / 3.5 MMDiT: diffusers' `SD3Transformer2DModel` under its parameter
//! names, shaped by a `transformer/config.json`, trainable (every op here has a backward: the
//! norms are our adaLN op and RMSNorm, the joint attention is our attention op; candle-
//! transformers' MMDiT drops the q/k and norm gradients and casts its timestep embedding to f16:
//! spec/pretrained-models.md §2), one timestep per sample.
//!
//!   image (B, C, H, W) ─ patch ─ + centre crop of the position table ─ x tokens
//!   text tokens (B, M, joint) ─ context_embedder ─────────────────────── c tokens
//!   t ─ sinusoid ─ MLP ─┐
//!   pooled text ─ MLP ──┴ temb
//!   per block: adaLN-Zero of x and of c from temb; one attention over [x ; c] (q, k RMS-normed
//!   per head), split; gated residuals; SD 3.5's dual blocks add a second, image-only attention;
//!   gated GELU-tanh feed-forwards. The last block keeps only x (`context_pre_only`).
//!   x ─ adaLN (scale, shift) ─ proj_out ─ unpatchify

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor, Var};

use super::dit::{patches, sincos_positions_spread, sinusoid, take_grad, unpatchify};
use super::nn::{Linear, Params};
use crate::ops::adaln::{gated_residual, modulate};
use crate::ops::attention::attention;
use crate::ops::gelu::silu;
use crate::ops::norm::rms_normalize_last;

/// The numbers of a `transformer/config.json` (read and checked at build time).
pub use signal_diffusion_config::pretrained::Mmdit as MmditShape;

/// The layers diffusers' SD 3 LoRA training script adapts: every attention projection, image
/// and text.
pub const LORA_TARGETS: [&str; 8] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
];

/// A feed-forward: GELU-tanh(x·W₁ + b₁)·W₂ + b₂, 4× wide (diffusers' `FeedForward`).
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(p: &mut Params, name: &str, dim: usize) -> Result<Self> {
        Ok(FeedForward {
            proj: Linear::new(p, &format!("{name}.net.0.proj"), dim, 4 * dim)?,
            out: Linear::new(p, &format!("{name}.net.2"), 4 * dim, dim)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.proj.forward_gelu_tanh(x)?)
    }
}

/// q, k, v projections of one token stream, with the per-head RMSNorm weights of q and k.
struct Projections {
    q: Linear,
    k: Linear,
    v: Linear,
    norms: Option<(Tensor, Tensor)>,
}

impl Projections {
    /// `names`: the q, k, v linears' and the q, k norms' names.
    fn new(p: &mut Params, names: [String; 5], s: &MmditShape) -> Result<Self> {
        let dim = s.dim();
        let [q, k, v, nq, nk] = names;
        let norms = match s.qk_norm {
            true => Some((
                p.constant(format!("{nq}.weight"), &[s.attention_head_dim], 1.0)?,
                p.constant(format!("{nk}.weight"), &[s.attention_head_dim], 1.0)?,
            )),
            false => None,
        };
        Ok(Projections {
            q: Linear::new(p, &q, dim, dim)?,
            k: Linear::new(p, &k, dim, dim)?,
            v: Linear::new(p, &v, dim, dim)?,
            norms,
        })
    }

    /// (q, k, v), each (B, N, heads·head_dim), q and k RMS-normed per head.
    fn forward(&self, x: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k) = (self.q.forward(x)?, self.k.forward(x)?);
        let (q, k) = match &self.norms {
            Some((wq, wk)) => (per_head_rms(&q, wq, heads)?, per_head_rms(&k, wk, heads)?),
            None => (q, k),
        };
        Ok((q, k, self.v.forward(x)?))
    }
}

/// RMSNorm (eps 1e-6) over each head's slice of the last axis, times `weight` (head_dim).
fn per_head_rms(x: &Tensor, weight: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, width) = x.dims3()?;
    let per_head = x.reshape((b, n, heads, width / heads))?;
    rms_normalize_last(&per_head, 1e-6)?
        .broadcast_mul(weight)?
        .reshape((b, n, width))
}

struct Block {
    /// adaLN-Zero of the image tokens: 6 (9 with dual attention) modulations.
    norm1: Linear,
    /// Of the text tokens: 6, or (scale, shift) in the last block.
    norm1_context: Linear,
    image: Projections,
    text: Projections,
    to_out: Linear,
    /// The text tokens' output projection (none in the last block).
    to_add_out: Option<Linear>,
    /// SD 3.5's second attention, over the image tokens alone, and its output projection.
    attn2: Option<(Projections, Linear)>,
    ff: FeedForward,
    ff_context: Option<FeedForward>,
}

impl Block {
    fn new(p: &mut Params, i: usize, s: &MmditShape) -> Result<Self> {
        let n = |part: &str| format!("transformer_blocks.{i}.{part}");
        let dim = s.dim();
        let last = i + 1 == s.num_layers;
        let dual = s.dual_attention_layers.contains(&i);
        let names =
            |q: &str, k: &str, v: &str, nq: &str, nk: &str| [n(q), n(k), n(v), n(nq), n(nk)];
        Ok(Block {
            norm1: Linear::new(p, &n("norm1.linear"), dim, if dual { 9 } else { 6 } * dim)?,
            norm1_context: Linear::new(
                p,
                &n("norm1_context.linear"),
                dim,
                if last { 2 } else { 6 } * dim,
            )?,
            image: Projections::new(
                p,
                names(
                    "attn.to_q",
                    "attn.to_k",
                    "attn.to_v",
                    "attn.norm_q",
                    "attn.norm_k",
                ),
                s,
            )?,
            text: Projections::new(
                p,
                names(
                    "attn.add_q_proj",
                    "attn.add_k_proj",
                    "attn.add_v_proj",
                    "attn.norm_added_q",
                    "attn.norm_added_k",
                ),
                s,
            )?,
            to_out: Linear::new(p, &n("attn.to_out.0"), dim, dim)?,
            to_add_out: match last {
                true => None,
                false => Some(Linear::new(p, &n("attn.to_add_out"), dim, dim)?),
            },
            attn2: match dual {
                true => Some((
                    Projections::new(
                        p,
                        names(
                            "attn2.to_q",
                            "attn2.to_k",
                            "attn2.to_v",
                            "attn2.norm_q",
                            "attn2.norm_k",
                        ),
                        s,
                    )?,
                    Linear::new(p, &n("attn2.to_out.0"), dim, dim)?,
                )),
                false => None,
            },
            ff: FeedForward::new(p, &n("ff"), dim)?,
            ff_context: match last {
                true => None,
                false => Some(FeedForward::new(p, &n("ff_context"), dim)?),
            },
        })
    }

    /// (x, c) -> (x, c) (c `None` after the last block). `temb_act`: SiLU of temb.
    fn forward(
        &self,
        x: &Tensor,
        c: &Tensor,
        temb_act: &Tensor,
        heads: usize,
    ) -> Result<(Tensor, Option<Tensor>)> {
        const EPS: f64 = 1e-6;
        let m = self.norm1.forward(temb_act)?;
        let m = m.chunk(m.dim(1)? / x.dim(2)?, 1)?;
        let (shift_msa, scale_msa, gate_msa) = (&m[0], &m[1], &m[2]);
        let (shift_mlp, scale_mlp, gate_mlp) = (&m[3], &m[4], &m[5]);
        let mc = self.norm1_context.forward(temb_act)?;
        let mc = mc.chunk(mc.dim(1)? / x.dim(2)?, 1)?;
        let c_normed = match self.ff_context {
            // The last block: AdaLayerNormContinuous, (scale, shift) in that order.
            None => modulate(c, EPS, &mc[1], &mc[0])?,
            Some(_) => modulate(c, EPS, &mc[0], &mc[1])?,
        };
        let x_normed = modulate(x, EPS, shift_msa, scale_msa)?;
        // One attention over the image tokens then the text tokens.
        let (qx, kx, vx) = self.image.forward(&x_normed, heads)?;
        let (qc, kc, vc) = self.text.forward(&c_normed, heads)?;
        let joint = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 1);
        let attended = attention(
            &joint(&qx, &qc)?,
            &joint(&kx, &kc)?,
            &joint(&vx, &vc)?,
            heads,
        )?;
        let nx = x.dim(1)?;
        let x_attn = self.to_out.forward(&attended.narrow(1, 0, nx)?)?;
        let mut out = gated_residual(x, &x_attn, gate_msa)?;
        if let Some((proj, to_out)) = &self.attn2 {
            // SD35AdaLayerNormZeroX: the block's input normalised again, with its own shift and
            // scale, attends to itself.
            let (shift2, scale2, gate2) = (&m[6], &m[7], &m[8]);
            let (q, k, v) = proj.forward(&modulate(x, EPS, shift2, scale2)?, heads)?;
            out = gated_residual(
                &out,
                &to_out.forward(&attention(&q, &k, &v, heads)?)?,
                gate2,
            )?;
        }
        let x = gated_residual(
            &out,
            &self
                .ff
                .forward(&modulate(&out, EPS, shift_mlp, scale_mlp)?)?,
            gate_mlp,
        )?;
        let (Some(add_out), Some(ff_context)) = (&self.to_add_out, &self.ff_context) else {
            return Ok((x, None));
        };
        let nc = c.dim(1)?;
        let c_attn = add_out.forward(&attended.narrow(1, nx, nc)?)?;
        let (c_shift_mlp, c_scale_mlp, c_gate_mlp) = (&mc[3], &mc[4], &mc[5]);
        let c = gated_residual(c, &c_attn, &mc[2])?;
        let c = gated_residual(
            &c,
            &ff_context.forward(&modulate(&c, EPS, c_shift_mlp, c_scale_mlp)?)?,
            c_gate_mlp,
        )?;
        Ok((x, Some(c)))
    }
}

pub struct Mmdit {
    shape: MmditShape,
    patch: Tensor,
    patch_bias: Tensor,
    /// diffusers' `pos_embed.pos_embed` (1, max², dim): saved with the weights, drawn here as
    /// diffusers draws it (positions i·base/max on the max × max grid).
    positions: Tensor,
    time_1: Linear,
    time_2: Linear,
    text_1: Linear,
    text_2: Linear,
    context: Linear,
    blocks: Vec<Block>,
    norm_out: Linear,
    proj_out: Linear,
}

impl Mmdit {
    /// The model of `s`, its layers named as diffusers names them.
    pub fn new(s: &MmditShape, p: &mut Params, device: &Device) -> Result<Self> {
        let (dim, ps, c) = (s.dim(), s.patch_size, s.in_channels);
        let bound = 1.0 / ((c * ps * ps) as f64).sqrt();
        let patch = p.uniform("pos_embed.proj.weight".into(), &[dim, c, ps, ps], bound)?;
        let patch_bias = p.uniform("pos_embed.proj.bias".into(), &[dim], bound)?;
        let max = s.pos_embed_max_size;
        let spread = max as f32 / (s.sample_size / ps) as f32;
        let table = sincos_positions_spread(dim, max, max, spread);
        let positions = p.buffer("pos_embed.pos_embed".into(), &[1, max * max, dim], 0.0)?;
        positions.set(&Tensor::from_vec(table, (1, max * max, dim), device)?)?;
        let blocks = (0..s.num_layers)
            .map(|i| Block::new(p, i, s))
            .collect::<Result<_>>()?;
        Ok(Mmdit {
            shape: s.clone(),
            patch,
            patch_bias,
            positions: positions.as_tensor().detach(),
            time_1: Linear::new(p, "time_text_embed.timestep_embedder.linear_1", 256, dim)?,
            time_2: Linear::new(p, "time_text_embed.timestep_embedder.linear_2", dim, dim)?,
            text_1: Linear::new(
                p,
                "time_text_embed.text_embedder.linear_1",
                s.pooled_projection_dim,
                dim,
            )?,
            text_2: Linear::new(p, "time_text_embed.text_embedder.linear_2", dim, dim)?,
            context: Linear::new(p, "context_embedder", s.joint_attention_dim, dim)?,
            blocks,
            norm_out: Linear::new(p, "norm_out.linear", dim, 2 * dim)?,
            proj_out: Linear::new(p, "proj_out", dim, ps * ps * s.out_channels)?,
        })
    }

    pub fn shape(&self) -> &MmditShape {
        &self.shape
    }

    /// x (B, C, H, W) at timesteps `t` (one per sample, σ·1000) with the text tokens `text`
    /// (B, M, joint_attention_dim) and the pooled text vector `pooled` (B, pooled dim) -> the
    /// prediction, shaped like x.
    pub fn forward(&self, x: &Tensor, t: &[f32], text: &Tensor, pooled: &Tensor) -> Result<Tensor> {
        let Embedded {
            mut x_tokens,
            mut c,
            temb_act,
        } = self.embed(x, t, text, pooled)?;
        for block in &self.blocks {
            let (nx, nc) =
                block.forward(&x_tokens, &c, &temb_act, self.shape.num_attention_heads)?;
            x_tokens = nx;
            if let Some(nc) = nc {
                c = nc;
            }
        }
        self.head(&x_tokens, &temb_act, x.dims4()?)
    }

    /// Gradient checkpointing: `loss_of(self.forward(..))` and the gradients of every
    /// parameter, keeping only each block's inputs (image and text tokens) during the forward
    /// and recomputing one block at a time in the backward, from the gradients of the next
    /// block's inputs; the conditioning vector's gradient is summed over the blocks and sent
    /// through the embedders last. Costs one more forward of the blocks.
    pub fn checkpointed_backward(
        &self,
        x: &Tensor,
        t: &[f32],
        (text, pooled): (&Tensor, &Tensor),
        loss_of: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, GradStore)> {
        let heads = self.shape.num_attention_heads;
        let embedded = self.embed(x, t, text, pooled)?;
        let temb = Var::from_tensor(&embedded.temb_act.detach())?;
        // Forward without graphs: detaching drops each block's activations at once.
        let mut inputs = vec![(embedded.x_tokens.detach(), embedded.c.detach())];
        for block in &self.blocks {
            let (x_in, c_in) = inputs.last().expect("the embedded tokens");
            let (nx, nc) = block.forward(x_in, c_in, temb.as_tensor(), heads)?;
            let c_out = nc.map_or_else(|| c_in.clone(), |c| c.detach());
            inputs.push((nx.detach(), c_out));
        }
        let (last, _) = inputs.pop().expect("the last block's output");
        let last = Var::from_tensor(&last)?;
        let loss = loss_of(&self.head(last.as_tensor(), temb.as_tensor(), x.dims4()?)?)?;
        let mut total = loss.backward()?;
        let mut grad_x = take_grad(&mut total, last.as_tensor())?;
        let mut grad_temb = take_grad(&mut total, temb.as_tensor())?;
        // The last block gives no text tokens: nothing flows into its text output.
        let mut grad_c: Option<Tensor> = None;
        for (block, (x_in, c_in)) in self.blocks.iter().zip(&inputs).rev() {
            let (xv, cv) = (Var::from_tensor(x_in)?, Var::from_tensor(c_in)?);
            let tv = Var::from_tensor(temb.as_tensor())?;
            let (nx, nc) = block.forward(xv.as_tensor(), cv.as_tensor(), tv.as_tensor(), heads)?;
            let mut surrogate = (nx * &grad_x)?.sum_all()?;
            if let (Some(nc), Some(g)) = (nc, &grad_c) {
                surrogate = (surrogate + (nc * g)?.sum_all()?)?;
            }
            let mut grads = surrogate.backward()?;
            grad_x = take_grad(&mut grads, xv.as_tensor())?;
            grad_c = Some(take_grad(&mut grads, cv.as_tensor())?);
            grad_temb = (grad_temb + take_grad(&mut grads, tv.as_tensor())?)?;
            total.extend(grads)?;
        }
        // The embedders, from their outputs' gradients.
        let mut tail = ((&embedded.x_tokens * &grad_x)?.sum_all()?
            + (&embedded.temb_act * &grad_temb)?.sum_all()?)?;
        if let Some(g) = &grad_c {
            tail = (tail + (&embedded.c * g)?.sum_all()?)?;
        }
        total.extend(tail.backward()?)?;
        Ok((loss, total))
    }

    /// The image tokens (patches + positions), the text tokens and SiLU of the conditioning
    /// vector (timestep and pooled text).
    fn embed(&self, x: &Tensor, t: &[f32], text: &Tensor, pooled: &Tensor) -> Result<Embedded> {
        let s = &self.shape;
        let (b, _, h, w) = x.dims4()?;
        let (gh, gw) = (h / s.patch_size, w / s.patch_size);
        let max = s.pos_embed_max_size;
        if gh > max || gw > max {
            candle_core::bail!(
                "a {h}×{w} input is {gh}×{gw} patches: more than the position table's {max} per side"
            );
        }
        let dim = s.dim();
        let kernel = self.patch.reshape((dim, ()))?;
        let tokens = crate::ops::linear::linear(
            &patches(x, [s.patch_size, s.patch_size])?,
            &kernel,
            &self.patch_bias,
        )?
        .reshape((b, gh * gw, dim))?;
        // The centre gh × gw of the max × max table.
        let (top, left) = ((max - gh) / 2, (max - gw) / 2);
        let positions = self
            .positions
            .reshape((max, max, dim))?
            .narrow(0, top, gh)?
            .narrow(1, left, gw)?
            .reshape((1, gh * gw, dim))?;
        let time_features = self.time_1.forward(&sinusoid(t, 256, 0.0, x.device())?)?;
        let time = self.time_2.forward(&silu(&time_features)?)?;
        let temb = (time + self.text_2.forward(&silu(&self.text_1.forward(pooled)?)?)?)?;
        Ok(Embedded {
            x_tokens: tokens.broadcast_add(&positions)?,
            c: self.context.forward(text)?,
            temb_act: silu(&temb)?,
        })
    }

    /// x tokens ─ adaLN (scale, shift) ─ proj_out ─ unpatchify to `dims` (B, C, H, W).
    fn head(
        &self,
        x_tokens: &Tensor,
        temb_act: &Tensor,
        dims: (usize, usize, usize, usize),
    ) -> Result<Tensor> {
        let s = &self.shape;
        let (b, _, h, w) = dims;
        let m = self.norm_out.forward(temb_act)?.chunk(2, 1)?;
        let y = self
            .proj_out
            .forward(&modulate(x_tokens, 1e-6, &m[1], &m[0])?)?;
        unpatchify(&y, (b, s.out_channels, h, w), [s.patch_size, s.patch_size])
    }
}

/// What the blocks read: image tokens, text tokens, SiLU(conditioning vector).
struct Embedded {
    x_tokens: Tensor,
    c: Tensor,
    temb_act: Tensor,
}
