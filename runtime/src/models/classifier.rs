//! Classification models: the reference's backbones, layer for layer, plus one MLP head per task.
//!
//! Shapes come from the generated code (`MODEL`), computed by the config crate's shape plan, so
//! the parameter count of what is built here equals the plan's (a generated test checks it for
//! every preset).

use candle_core::{Result, Tensor};

use crate::models::nn::{
    dropout, dropout_pool, Act, Activation, BatchNorm, Conv, GroupNorm1, LayerNorm, Linear, Mode,
    Params, SelfAttention,
};
use crate::tasks::TaskSpec;

/// A feature extractor: input batch -> (B, embedding_dim).
pub trait Backbone: Sized {
    type Shape: 'static;
    fn new(shape: &Self::Shape, p: &mut Params) -> Result<Self>;
    fn embedding_dim(shape: &Self::Shape) -> usize;
    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor>;
}

/// `cnn_light` (reference `CNNBackbone`): a stem conv, then `depth` blocks of
/// GroupNorm → (conv 3×3 → act) × repeats → dropout → avg-pool, then a global average pool.
#[derive(Debug, Clone, Copy)]
pub struct CnnLightShape {
    pub in_channels: usize,
    pub resolution: usize,
    pub stem: usize,
    pub channels: &'static [usize],
    pub layer_repeats: usize,
    pub embedding_dim: usize,
    pub activation: Activation,
    pub dropout: f64,
}

struct Block {
    norm: Norm,
    convs: Vec<(Conv, Act)>,
}

enum Norm {
    Group(GroupNorm1),
    Batch(BatchNorm),
}

impl Norm {
    fn forward(&self, x: &Tensor, mode: &Mode) -> Result<Tensor> {
        match self {
            Norm::Group(n) => n.forward(x),
            Norm::Batch(n) => n.forward(x, mode),
        }
    }
}

pub struct CnnLight {
    stem: Conv,
    stem_act: Act,
    stem_norm: GroupNorm1,
    blocks: Vec<Block>,
    dropout: f64,
}

fn blocks(
    p: &mut Params,
    dims: usize,
    stem: usize,
    channels: &[usize],
    kernels: &[usize],
    repeats: usize,
    act: Activation,
) -> Result<Vec<Block>> {
    let mut cin = stem;
    let mut out = vec![];
    for (i, (&cout, &k)) in channels.iter().zip(kernels).enumerate() {
        let name = format!("backbone.blocks.{i}");
        let norm = if dims == 2 {
            Norm::Group(GroupNorm1::new(p, &format!("{name}.0"), cin)?)
        } else {
            Norm::Batch(BatchNorm::new(p, &format!("{name}.0"), cin)?)
        };
        let mut convs = vec![];
        for j in 0..repeats {
            let conv = Conv::new(
                p,
                &format!("{name}.{}", 1 + 2 * j),
                dims,
                if j == 0 { cin } else { cout },
                cout,
                k,
            )?;
            convs.push((conv, Act::new(act, p, format!("{name}.{}", 2 + 2 * j))?));
        }
        out.push(Block { norm, convs });
        cin = cout;
    }
    Ok(out)
}

fn run_blocks(blocks: &[Block], mut x: Tensor, p: f64, mode: &mut Mode) -> Result<Tensor> {
    for b in blocks {
        x = b.norm.forward(&x, mode)?;
        let (last, first) = b.convs.split_last().expect("a block has a conv");
        for (conv, act) in first {
            x = act.forward(&conv.forward(&x)?)?;
        }
        x = last.1.forward_dropout_pool(&last.0.forward(&x)?, p, mode)?;
    }
    Ok(x)
}

impl Backbone for CnnLight {
    type Shape = CnnLightShape;

    fn new(s: &CnnLightShape, p: &mut Params) -> Result<Self> {
        let stem = Conv::new(p, "backbone.input_conv.0", 2, s.in_channels, s.stem, 5)?;
        let stem_act = Act::new(s.activation, p, "backbone.input_conv.1".into())?;
        let stem_norm = GroupNorm1::new(p, "backbone.input_conv.2", s.stem)?;
        let kernels = vec![3; s.channels.len()];
        let blocks = blocks(
            p,
            2,
            s.stem,
            s.channels,
            &kernels,
            s.layer_repeats,
            s.activation,
        )?;
        Ok(CnnLight {
            stem,
            stem_act,
            stem_norm,
            blocks,
            dropout: s.dropout,
        })
    }

    fn embedding_dim(s: &CnnLightShape) -> usize {
        s.embedding_dim
    }

    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let x = self.stem.forward(x)?;
        let x = self
            .stem_norm
            .forward_after(&self.stem_act, &x, self.dropout, mode)?;
        let x = run_blocks(&self.blocks, x, self.dropout, mode)?;
        x.mean(3)?.mean(2)
    }
}

/// `cnn_1d` (reference `CNNBackbone1D`): as cnn_light in 1-D with BatchNorm, kernels shrinking
/// per block, and a final projection to `embedding_dim`.
#[derive(Debug, Clone, Copy)]
pub struct Cnn1dShape {
    pub in_channels: usize,
    pub length: usize,
    pub stem: usize,
    pub channels: &'static [usize],
    pub kernels: &'static [usize],
    pub layer_repeats: usize,
    pub embedding_dim: usize,
    pub activation: Activation,
    pub dropout: f64,
}

pub struct Cnn1d {
    stem: Conv,
    stem_act: Act,
    stem_norm: BatchNorm,
    blocks: Vec<Block>,
    proj: Linear,
    dropout: f64,
}

impl Backbone for Cnn1d {
    type Shape = Cnn1dShape;

    fn new(s: &Cnn1dShape, p: &mut Params) -> Result<Self> {
        let stem = Conv::new(
            p,
            "backbone.input_conv.0",
            1,
            s.in_channels,
            s.stem,
            s.kernels[0],
        )?;
        let stem_act = Act::new(s.activation, p, "backbone.input_conv.1".into())?;
        let stem_norm = BatchNorm::new(p, "backbone.input_conv.2", s.stem)?;
        let blocks = blocks(
            p,
            1,
            s.stem,
            s.channels,
            s.kernels,
            s.layer_repeats,
            s.activation,
        )?;
        let last = *s.channels.last().unwrap_or(&s.stem);
        let proj = Linear::new(p, "backbone.proj", last, s.embedding_dim)?;
        Ok(Cnn1d {
            stem,
            stem_act,
            stem_norm,
            blocks,
            proj,
            dropout: s.dropout,
        })
    }

    fn embedding_dim(s: &Cnn1dShape) -> usize {
        s.embedding_dim
    }

    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let x = self
            .stem_norm
            .forward(&self.stem_act.forward(&self.stem.forward(x)?)?, mode)?;
        let x = dropout_pool(&x, self.dropout, mode)?;
        let x = run_blocks(&self.blocks, x, self.dropout, mode)?;
        self.proj.forward(&x.mean(2)?)
    }
}

/// `cnn`: the stronger 2-D backbone the reference lists but never built. Same knobs and channel
/// plan as cnn_light; each block is `layer_repeats` residual units
/// (conv 3×3 → BatchNorm → act → conv 3×3 → BatchNorm, plus the input through a 1×1 conv when
/// the width changes, then act), followed by dropout and a 2×2 average pool.
#[derive(Debug, Clone, Copy)]
pub struct CnnShape {
    pub in_channels: usize,
    pub resolution: usize,
    pub stem: usize,
    pub channels: &'static [usize],
    pub layer_repeats: usize,
    pub embedding_dim: usize,
    pub activation: Activation,
    pub dropout: f64,
}

struct Residual {
    conv1: Conv,
    norm1: BatchNorm,
    act1: Act,
    conv2: Conv,
    norm2: BatchNorm,
    skip: Option<Conv>,
    act_out: Act,
}

pub struct Cnn {
    stem: Conv,
    stem_norm: BatchNorm,
    stem_act: Act,
    blocks: Vec<Vec<Residual>>,
    dropout: f64,
}

impl Backbone for Cnn {
    type Shape = CnnShape;

    fn new(s: &CnnShape, p: &mut Params) -> Result<Self> {
        let stem = Conv::no_bias(p, "backbone.stem.conv", 2, s.in_channels, s.stem, 5)?;
        let stem_norm = BatchNorm::new(p, "backbone.stem.norm", s.stem)?;
        let stem_act = Act::new(s.activation, p, "backbone.stem.act".into())?;
        let mut cin = s.stem;
        let mut blocks = vec![];
        for (i, &cout) in s.channels.iter().enumerate() {
            let mut units = vec![];
            for j in 0..s.layer_repeats {
                let n = format!("backbone.blocks.{i}.{j}");
                let unit_in = if j == 0 { cin } else { cout };
                units.push(Residual {
                    conv1: Conv::no_bias(p, &format!("{n}.conv1"), 2, unit_in, cout, 3)?,
                    norm1: BatchNorm::new(p, &format!("{n}.norm1"), cout)?,
                    act1: Act::new(s.activation, p, format!("{n}.act1"))?,
                    conv2: Conv::no_bias(p, &format!("{n}.conv2"), 2, cout, cout, 3)?,
                    norm2: BatchNorm::new(p, &format!("{n}.norm2"), cout)?,
                    skip: if unit_in != cout {
                        Some(Conv::new(p, &format!("{n}.skip"), 2, unit_in, cout, 1)?)
                    } else {
                        None
                    },
                    act_out: Act::new(s.activation, p, format!("{n}.act_out"))?,
                });
            }
            blocks.push(units);
            cin = cout;
        }
        Ok(Cnn {
            stem,
            stem_norm,
            stem_act,
            blocks,
            dropout: s.dropout,
        })
    }

    fn embedding_dim(s: &CnnShape) -> usize {
        s.embedding_dim
    }

    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let mut x = crate::ops::pool::avg_pool(
            &self
                .stem_act
                .forward(&self.stem_norm.forward(&self.stem.forward(x)?, mode)?)?,
            2,
            2,
        )?;
        for units in &self.blocks {
            for u in units {
                let h = u
                    .act1
                    .forward(&u.norm1.forward(&u.conv1.forward(&x)?, mode)?)?;
                let h = u.norm2.forward(&u.conv2.forward(&h)?, mode)?;
                let skip = match &u.skip {
                    Some(c) => c.forward(&x)?,
                    None => x.clone(),
                };
                x = u.act_out.forward(&(h + skip)?)?;
            }
            x = dropout_pool(&x, self.dropout, mode)?;
        }
        x.mean(3)?.mean(2)
    }
}

/// `transformer`: a pre-norm encoder over tokens. Spectrograms are cut into p×p patches
/// (channels × p² values per token, as a ViT); time series use one token per EEG channel (the
/// reference's layout). Unlike the reference it has learned positional embeddings, an optional
/// learned CLS token (`pooling = "cls"`; "mean" averages the tokens) and a final LayerNorm; the
/// feed-forward activation is `model.activation`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerShape {
    /// 0 for time series; the patch side for images.
    pub patch: usize,
    pub tokens: usize,
    pub token_dim: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub ff: usize,
    pub cls: bool,
    pub embedding_dim: usize,
    pub activation: Activation,
    pub dropout: f64,
}

struct EncoderLayer {
    norm1: LayerNorm,
    attn: SelfAttention,
    norm2: LayerNorm,
    ff1: Linear,
    act: Act,
    ff2: Linear,
}

pub struct Transformer {
    shape: TransformerShape,
    embed: Linear,
    pos: Tensor,
    cls: Option<Tensor>,
    layers: Vec<EncoderLayer>,
    norm: LayerNorm,
    proj: Linear,
}

impl Backbone for Transformer {
    type Shape = TransformerShape;

    fn new(s: &TransformerShape, p: &mut Params) -> Result<Self> {
        let embed = Linear::new(p, "backbone.embed", s.token_dim, s.hidden)?;
        let positions = s.tokens + usize::from(s.cls);
        let pos = p.uniform("backbone.pos_embed".into(), &[positions, s.hidden], 0.02)?;
        let cls = if s.cls {
            Some(p.uniform("backbone.cls_token".into(), &[1, 1, s.hidden], 0.02)?)
        } else {
            None
        };
        let layers = (0..s.layers)
            .map(|i| {
                let n = format!("backbone.layers.{i}");
                Ok(EncoderLayer {
                    norm1: LayerNorm::new(p, &format!("{n}.norm1"), s.hidden)?,
                    attn: SelfAttention::new(p, &format!("{n}.self_attn"), s.hidden, s.heads)?,
                    norm2: LayerNorm::new(p, &format!("{n}.norm2"), s.hidden)?,
                    ff1: Linear::new(p, &format!("{n}.linear1"), s.hidden, s.ff)?,
                    act: Act::new(s.activation, p, format!("{n}.activation"))?,
                    ff2: Linear::new(p, &format!("{n}.linear2"), s.ff, s.hidden)?,
                })
            })
            .collect::<Result<_>>()?;
        let norm = LayerNorm::new(p, "backbone.norm", s.hidden)?;
        let proj = Linear::new(p, "backbone.proj", s.hidden, s.embedding_dim)?;
        Ok(Transformer {
            shape: *s,
            embed,
            pos,
            cls,
            layers,
            norm,
            proj,
        })
    }

    fn embedding_dim(s: &TransformerShape) -> usize {
        s.embedding_dim
    }

    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let s = &self.shape;
        let b = x.dim(0)?;
        // Tokens: (B, T, token_dim).
        let tokens = if s.patch > 0 {
            let (_, c, h, w) = x.dims4()?;
            let p = s.patch;
            x.reshape((b, c, h / p, p, w / p, p))?
                .permute((0, 2, 4, 1, 3, 5))?
                .reshape((b, s.tokens, s.token_dim))?
        } else {
            x.clone()
        };
        let mut h = self.embed.forward(&tokens)?;
        if let Some(cls) = &self.cls {
            h = Tensor::cat(&[&cls.broadcast_as((b, 1, s.hidden))?, &h], 1)?;
        }
        h = dropout(&h.broadcast_add(&self.pos)?, s.dropout, mode)?;
        for l in &self.layers {
            let a = l.attn.forward(&l.norm1.forward(&h)?, s.dropout, mode)?;
            h = (h + dropout(&a, s.dropout, mode)?)?;
            let f = l.ff2.forward(&dropout(
                &l.act.forward(&l.ff1.forward(&l.norm2.forward(&h)?)?)?,
                s.dropout,
                mode,
            )?)?;
            h = (h + dropout(&f, s.dropout, mode)?)?;
        }
        let h = self.norm.forward(&h)?;
        let pooled = if self.cls.is_some() {
            h.narrow(1, 0, 1)?.squeeze(1)?
        } else {
            h.mean(1)?
        };
        self.proj.forward(&pooled)
    }
}

/// Backbone + one head per task: Linear(E, 2E) → GELU → Linear(2E, outputs), as the reference.
pub struct Classifier<B> {
    pub backbone: B,
    heads: Vec<(Linear, Linear)>,
}

impl<B: Backbone> Classifier<B> {
    pub fn new(shape: &B::Shape, tasks: &[TaskSpec], p: &mut Params) -> Result<Self> {
        let backbone = B::new(shape, p)?;
        let e = B::embedding_dim(shape);
        let heads = tasks
            .iter()
            .map(|t| {
                let name = format!("heads.{}.net", t.name);
                Ok((
                    Linear::new(p, &format!("{name}.0"), e, 2 * e)?,
                    Linear::new(p, &format!("{name}.2"), 2 * e, t.outputs)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Classifier { backbone, heads })
    }

    /// One output per task, in task order: (B, outputs).
    pub fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Vec<Tensor>> {
        let features = self.backbone.forward(x, mode)?;
        self.heads
            .iter()
            .map(|(a, b)| b.forward(&crate::ops::gelu::gelu(&a.forward(&features)?)?))
            .collect()
    }
}

/// Build a model on the CPU and count its trainable parameters (tests compare with the plan).
pub fn count_parameters<B: Backbone>(shape: &B::Shape, tasks: &[TaskSpec]) -> Result<usize> {
    let mut p = Params::new(0, &candle_core::Device::Cpu);
    Classifier::<B>::new(shape, tasks, &mut p)?;
    Ok(p.count())
}
