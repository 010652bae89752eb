//! Classification models: the reference's backbones, layer for layer, plus one MLP head per task.
//!
//! Shapes come from the generated code (`MODEL`), computed by the config crate's shape plan, so
//! the parameter count of what is built here equals the plan's (a generated test checks it for
//! every preset).

use candle_core::{Result, Tensor};

use crate::nn::{
    avg_pool1d_2, dropout, Act, Activation, BatchNorm1d, Conv, GroupNorm1, Linear, Mode, Params,
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
    Batch(BatchNorm1d),
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
            Norm::Batch(BatchNorm1d::new(p, &format!("{name}.0"), cin)?)
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

fn run_blocks(
    blocks: &[Block],
    mut x: Tensor,
    p: f64,
    mode: &mut Mode,
    pool: fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    for b in blocks {
        x = b.norm.forward(&x, mode)?;
        for (conv, act) in &b.convs {
            x = act.forward(&conv.forward(&x)?)?;
        }
        x = pool(&dropout(&x, p, mode)?)?;
    }
    Ok(x)
}

fn pool2d(x: &Tensor) -> Result<Tensor> {
    x.avg_pool2d(2)
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
        let x = self
            .stem_norm
            .forward(&self.stem_act.forward(&self.stem.forward(x)?)?)?;
        let x = pool2d(&dropout(&x, self.dropout, mode)?)?;
        let x = run_blocks(&self.blocks, x, self.dropout, mode, pool2d)?;
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
    stem_norm: BatchNorm1d,
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
        let stem_norm = BatchNorm1d::new(p, "backbone.input_conv.2", s.stem)?;
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
        let x = avg_pool1d_2(&dropout(&x, self.dropout, mode)?)?;
        let x = run_blocks(&self.blocks, x, self.dropout, mode, avg_pool1d_2)?;
        self.proj.forward(&x.mean(2)?)
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
            .map(|(a, b)| b.forward(&a.forward(&features)?.gelu_erf()?))
            .collect()
    }
}

/// Build a model on the CPU and count its trainable parameters (tests compare with the plan).
pub fn count_parameters<B: Backbone>(shape: &B::Shape, tasks: &[TaskSpec]) -> Result<usize> {
    let mut p = Params::new(0, &candle_core::Device::Cpu);
    Classifier::<B>::new(shape, tasks, &mut p)?;
    Ok(p.count())
}
