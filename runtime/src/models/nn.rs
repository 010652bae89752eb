//! Layers with a working backward, initialised from a seeded RNG.
//!
//! Candle's CPU RNG cannot be seeded (`set_seed` bails), and its fused norms have no backward,
//! so the layers here own their parameters: each is a `Var` created by [`Params`] with PyTorch's
//! default initialisation (uniform ±1/√fan_in for weights and biases of convs and linears, ones
//! and zeros for norms), drawn from a ChaCha RNG seeded by `training.seed`. Norms are composites
//! of differentiable ops. Parameter names follow the reference's PyTorch modules, so a
//! `model.safetensors` reads like the reference's `state_dict`.

use candle_core::{DType, Device, Result, Tensor, Var};

use super::lora::{LoraBranch, LoraSpec};
use crate::ops::norm::standardize_last;
use crate::ops::precision::matmul;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Every trainable parameter and every buffer (running statistics), by PyTorch name.
pub struct Params {
    pub trainable: Vec<(String, Var)>,
    pub buffers: Vec<(String, Var)>,
    /// Under LoRA, the model's own parameters that do not train (loaded from the pretrained
    /// weights): their layers hold detached tensors, so no gradient is computed for them.
    pub frozen: Vec<(String, Var)>,
    lora: Option<LoraSpec>,
    rng: ChaCha8Rng,
    device: Device,
    /// Zeros instead of random draws: for counting the parameters of a large model quickly.
    counting: bool,
    /// Another set's tensors by name, handed out detached (`sharing`).
    shared: Option<std::collections::HashMap<String, Var>>,
}

impl Params {
    pub fn new(seed: u64, device: &Device) -> Self {
        Params {
            trainable: vec![],
            buffers: vec![],
            frozen: vec![],
            lora: None,
            rng: ChaCha8Rng::seed_from_u64(seed),
            device: device.clone(),
            counting: false,
            shared: None,
        }
    }

    /// The parameters of `source` for a second model of the same shape that computes with the
    /// same storage (so it sees every later update and load) but detached: it records no
    /// autograd graph, so a forward frees each activation once used. What sampling and
    /// evaluation run (a UNet's graph at batch 16 held 1.4 GB of activations per forward).
    pub fn sharing(source: &Params) -> Self {
        let vars = source
            .trainable
            .iter()
            .chain(&source.frozen)
            .chain(&source.buffers)
            .cloned()
            .collect();
        Params {
            lora: source.lora.clone(),
            counting: true,
            shared: Some(vars),
            ..Params::new(0, &source.device)
        }
    }

    /// `name`'s tensor in the shared set (`sharing`), if this set shares one.
    fn shared_var(&self, name: &str) -> Result<Option<Var>> {
        match &self.shared {
            None => Ok(None),
            Some(vars) => match vars.get(name) {
                Some(var) => Ok(Some(var.clone())),
                None => candle_core::bail!("the shared parameters have no `{name}`"),
            },
        }
    }

    /// Parameters for a model adapted by LoRA: the layers `spec` targets get adapters, which
    /// train with the biases it names; every other parameter is frozen.
    pub fn with_lora(seed: u64, device: &Device, spec: LoraSpec) -> Self {
        Params {
            lora: Some(spec),
            ..Params::new(seed, device)
        }
    }

    /// Parameters that are all zeros (no random draws): for counting them.
    pub fn counting() -> Self {
        Params {
            counting: true,
            ..Params::new(0, &Device::Cpu)
        }
    }

    pub fn uniform(&mut self, name: String, shape: &[usize], bound: f64) -> Result<Tensor> {
        let t = self.draw_uniform(shape, bound)?;
        self.trainable(name, &t)
    }

    /// U(−bound, bound) entries from the seeded stream, not registered (for parameters whose
    /// initial value is computed from a draw); zeros when counting.
    pub fn draw_uniform(&mut self, shape: &[usize], bound: f64) -> Result<Tensor> {
        if self.counting {
            return Tensor::zeros(shape, DType::F32, &self.device);
        }
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| self.rng.random_range(-bound..bound) as f32)
            .collect();
        Tensor::from_vec(data, shape, &self.device)
    }

    /// A model parameter starting at `value`: trainable, or frozen under LoRA unless the
    /// LoRA spec trains it (a bias it names).
    pub fn trainable(&mut self, name: String, value: &Tensor) -> Result<Tensor> {
        if let Some(var) = self.shared_var(&name)? {
            return Ok(var.as_tensor().detach());
        }
        let var = Var::from_tensor(value)?;
        match &self.lora {
            Some(spec) if !spec.trains(&name) => {
                self.frozen.push((name, var.clone()));
                Ok(var.as_tensor().detach())
            }
            _ => {
                self.trainable.push((name, var.clone()));
                Ok(var.as_tensor().clone())
            }
        }
    }

    /// The LoRA adapter of the linear layer `module` (din -> dout), if the spec targets it: A
    /// drawn U(±1/√din) as PEFT does, B zeros; both trainable, named as PEFT names them.
    pub fn lora_branch(
        &mut self,
        module: &str,
        din: usize,
        dout: usize,
    ) -> Result<Option<LoraBranch>> {
        let Some(spec) = self.lora.clone().filter(|s| s.targets(module)) else {
            return Ok(None);
        };
        if self.shared.is_some() {
            let part = |p: &Self, m: &str| -> Result<Tensor> {
                let name = format!("{module}.lora_{m}.weight");
                Ok(p.shared_var(&name)?.expect("sharing").as_tensor().detach())
            };
            let (a, b) = (part(self, "A")?, part(self, "B")?);
            return Ok(Some(LoraBranch::new(a, b, &spec, module)));
        }
        let a = self.draw_uniform(&[spec.rank, din], 1.0 / (din as f64).sqrt())?;
        let a = Var::from_tensor(&a)?;
        let b = Var::from_tensor(&Tensor::zeros((dout, spec.rank), DType::F32, &self.device)?)?;
        self.trainable
            .push((format!("{module}.lora_A.weight"), a.clone()));
        self.trainable
            .push((format!("{module}.lora_B.weight"), b.clone()));
        Ok(Some(LoraBranch::new(
            a.as_tensor().clone(),
            b.as_tensor().clone(),
            &spec,
            module,
        )))
    }

    /// N(0, std²) entries (PyTorch's `nn.Embedding` init with std 1).
    pub fn normal(&mut self, name: String, shape: &[usize], std: f64) -> Result<Tensor> {
        let t = self.normal_tensor(shape, std)?;
        self.trainable(name, &t)
    }

    /// A fixed N(0, std²) buffer (saved with the model, never trained).
    pub fn normal_buffer(&mut self, name: String, shape: &[usize], std: f64) -> Result<Tensor> {
        if let Some(var) = self.shared_var(&name)? {
            return Ok(var.as_tensor().detach());
        }
        let var = Var::from_tensor(&self.normal_tensor(shape, std)?)?;
        self.buffers.push((name, var.clone()));
        // Never trained: detached, so no graph grows from it.
        Ok(var.as_tensor().detach())
    }

    fn normal_tensor(&mut self, shape: &[usize], std: f64) -> Result<Tensor> {
        if self.counting {
            return Tensor::zeros(shape, DType::F32, &self.device);
        }
        let n: usize = shape.iter().product();
        // Box-Muller on the seeded stream.
        let data: Vec<f32> = (0..n)
            .map(|_| {
                let u1: f64 = 1.0 - self.rng.random::<f64>();
                let u2: f64 = self.rng.random::<f64>();
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
            })
            .collect();
        Tensor::from_vec(data, shape, &self.device)
    }

    pub fn constant(&mut self, name: String, shape: &[usize], value: f32) -> Result<Tensor> {
        let t = (Tensor::ones(shape, DType::F32, &self.device)? * value as f64)?;
        self.trainable(name, &t)
    }

    pub fn buffer(&mut self, name: String, shape: &[usize], value: f32) -> Result<Var> {
        if let Some(var) = self.shared_var(&name)? {
            return Ok(var);
        }
        let var =
            Var::from_tensor(&(Tensor::ones(shape, DType::F32, &self.device)? * value as f64)?)?;
        self.buffers.push((name, var.clone()));
        Ok(var)
    }

    /// The model's parameters, trained or frozen, without LoRA's adapters: what the shape plan
    /// counts.
    pub fn count(&self) -> usize {
        self.trainable
            .iter()
            .chain(&self.frozen)
            .filter(|(n, _)| !n.ends_with(".lora_A.weight") && !n.ends_with(".lora_B.weight"))
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// The LoRA spec the layers are built under.
    pub fn lora(&self) -> Option<&LoraSpec> {
        self.lora.as_ref()
    }

    /// The parameters the optimizer updates.
    pub fn trainable_count(&self) -> usize {
        self.trainable.iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// Whether a forward pass trains (dropout on, batch statistics), the RNG it draws masks from,
/// and how far BatchNorm's running statistics move toward each batch's.
pub struct Mode {
    pub train: bool,
    pub rng: ChaCha8Rng,
    /// PyTorch's default 0.1; `update_bn`-style recomputation uses 1/(batches seen + 1).
    pub bn_momentum: f64,
}

impl Mode {
    pub fn train(seed: u64) -> Self {
        Mode {
            train: true,
            rng: ChaCha8Rng::seed_from_u64(seed),
            bn_momentum: 0.1,
        }
    }

    pub fn eval() -> Self {
        Mode {
            train: false,
            rng: ChaCha8Rng::seed_from_u64(0),
            bn_momentum: 0.1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Gelu,
    Relu,
    LeakyRelu,
    Silu,
    Sigmoid,
    Tanh,
    PRelu,
}

/// An activation; PReLU owns one learned slope (PyTorch's `nn.PReLU()` default, init 0.25).
pub struct Act {
    kind: Activation,
    slope: Option<Tensor>,
}

impl Act {
    pub fn new(kind: Activation, p: &mut Params, name: String) -> Result<Self> {
        let slope = if kind == Activation::PRelu {
            Some(p.constant(format!("{name}.weight"), &[1], 0.25)?)
        } else {
            None
        };
        Ok(Act { kind, slope })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.kind {
            // PyTorch's nn.GELU() default is the exact erf form.
            Activation::Gelu => crate::ops::gelu::gelu(x),
            Activation::Relu => x.relu(),
            Activation::LeakyRelu => leaky(x, &Tensor::new(&[0.01f32], x.device())?),
            Activation::Silu => x.silu(),
            Activation::Sigmoid => candle_nn::ops::sigmoid(x),
            Activation::Tanh => x.tanh(),
            Activation::PRelu => leaky(x, self.slope.as_ref().expect("prelu has a slope")),
        }
    }

    /// `dropout_pool(self.forward(x), p, mode)` (2-D); a GELU in training is one op with the
    /// pooling, never keeping its output (ops::pool::gelu_dropout_avg_pool); the same numbers and draws.
    pub fn forward_dropout_pool(&self, x: &Tensor, p: f64, mode: &mut Mode) -> Result<Tensor> {
        if self.kind != Activation::Gelu || !mode.train || x.rank() != 4 {
            return dropout_pool(&self.forward(x)?, p, mode);
        }
        let seed = if p > 0.0 { mode.rng.random::<u64>() } else { 0 };
        crate::ops::pool::gelu_dropout_avg_pool(x, p.max(0.0), seed, 2, 2)
    }
}

/// max(x, 0) + slope · min(x, 0), differentiable in both x and slope.
fn leaky(x: &Tensor, slope: &Tensor) -> Result<Tensor> {
    let neg = x.minimum(0f64)?;
    x.relu()? + neg.broadcast_mul(slope)?
}

pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: usize,
}

impl Conv {
    /// `dims` = 1 or 2; kernel `k`, stride 1, padding `k / 2` (every conv of the CNNs here).
    pub fn new(
        p: &mut Params,
        name: &str,
        dims: usize,
        cin: usize,
        cout: usize,
        k: usize,
    ) -> Result<Self> {
        Self::build(p, name, dims, cin, cout, k, true)
    }

    /// Without a bias: for convolutions followed by a BatchNorm, which would cancel it (and
    /// leave it a parameter with no gradient).
    pub fn no_bias(
        p: &mut Params,
        name: &str,
        dims: usize,
        cin: usize,
        cout: usize,
        k: usize,
    ) -> Result<Self> {
        Self::build(p, name, dims, cin, cout, k, false)
    }

    fn build(
        p: &mut Params,
        name: &str,
        dims: usize,
        cin: usize,
        cout: usize,
        k: usize,
        bias: bool,
    ) -> Result<Self> {
        let fan_in = cin * k.pow(dims as u32);
        let bound = 1.0 / (fan_in as f64).sqrt();
        let shape: Vec<usize> = if dims == 2 {
            vec![cout, cin, k, k]
        } else {
            vec![cout, cin, k]
        };
        let weight = p.uniform(format!("{name}.weight"), &shape, bound)?;
        let bias = if bias {
            Some(p.uniform(format!("{name}.bias"), &[cout], bound)?)
        } else {
            None
        };
        Ok(Conv {
            weight,
            bias,
            padding: k / 2,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::conv::conv(x, &self.weight, self.bias.as_ref(), self.padding)
    }

    /// The weight and bias, for the same layer applied otherwise (with a stride).
    pub fn parts(&self) -> (&Tensor, Option<&Tensor>) {
        (&self.weight, self.bias.as_ref())
    }
}

pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// LoRA's update, where `model.lora.target_modules` names this layer.
    lora: Option<LoraBranch>,
}

impl Linear {
    pub fn new(p: &mut Params, name: &str, din: usize, dout: usize) -> Result<Self> {
        Self::with_bias(p, name, din, dout, true)
    }

    /// `nn.Linear(din, dout, bias=bias)`.
    pub fn with_bias(
        p: &mut Params,
        name: &str,
        din: usize,
        dout: usize,
        bias: bool,
    ) -> Result<Self> {
        let bound = 1.0 / (din as f64).sqrt();
        let weight = p.uniform(format!("{name}.weight"), &[dout, din], bound)?;
        let bias = if bias {
            Some(p.uniform(format!("{name}.bias"), &[dout], bound)?)
        } else {
            None
        };
        let lora = p.lora_branch(name, din, dout)?;
        Ok(Linear { weight, bias, lora })
    }

    /// A linear of a given (dout, din) weight and (dout) bias, for layers initialised otherwise
    /// than PyTorch's default (zeros, a small normal).
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        weight.dims2()?;
        Ok(Linear {
            weight,
            bias,
            lora: None,
        })
    }

    /// (..., din) -> (..., dout), as one GEMM over all leading positions.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.over_rows(x, |x| match (&self.lora, &self.bias) {
            (Some(lora), bias) => lora.forward(x, &self.weight, bias.as_ref()),
            (None, Some(b)) => crate::ops::linear::linear(x, &self.weight, b),
            (None, None) => crate::ops::precision::matmul(x, &self.weight.t()?),
        })
    }

    /// GELU-tanh(x·Wᵀ + b), a feed-forward's first half. On a GPU the bias add rides in the
    /// activation's kernel (one pass and one kept tensor fewer than a separate add); on the CPU
    /// the fused linear op starts its GEMM from the bias, so the add is free there already.
    pub fn forward_gelu_tanh(&self, x: &Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) if x.device().is_cuda() && self.lora.is_none() => self.over_rows(x, |x| {
                let h = crate::ops::precision::matmul(x, &self.weight.t()?)?;
                crate::ops::gelu::bias_gelu_tanh(&h, b)
            }),
            _ => crate::ops::gelu::gelu_tanh(&self.forward(x)?),
        }
    }

    /// `f` of x as (rows, din), its (rows, dout) result given x's leading axes back.
    fn over_rows(&self, x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let din = dims
            .pop()
            .expect("a linear layer's input has a feature axis");
        let rows = dims.iter().product::<usize>();
        let y = f(&x.reshape((rows, din))?)?;
        dims.push(self.weight.dim(0)?);
        y.reshape(dims)
    }
}

/// A norm's per-channel affine: weight ones, bias zeros (PyTorch's init).
pub(crate) fn affine(p: &mut Params, name: &str, channels: usize) -> Result<(Tensor, Tensor)> {
    Ok((
        p.constant(format!("{name}.weight"), &[channels], 1.0)?,
        p.constant(format!("{name}.bias"), &[channels], 0.0)?,
    ))
}

/// GroupNorm with one group: normalise over (C, H, W) per sample, then a per-channel affine.
pub struct GroupNorm1 {
    weight: Tensor,
    bias: Tensor,
}

impl GroupNorm1 {
    pub fn new(p: &mut Params, name: &str, channels: usize) -> Result<Self> {
        let (weight, bias) = affine(p, name, channels)?;
        Ok(GroupNorm1 { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::norm::group_norm(x, &self.weight, &self.bias)
    }

    /// `dropout_pool(self.forward(&act.forward(x)), p, mode)` (2-D), in training as one op that
    /// never keeps the activation (when it is a GELU) or the normalised tensor
    /// (ops::pool::group_norm_dropout_avg_pool); the same numbers and draws.
    pub fn forward_after(&self, act: &Act, x: &Tensor, p: f64, mode: &mut Mode) -> Result<Tensor> {
        if !mode.train {
            return dropout_pool(&self.forward(&act.forward(x)?)?, p, mode);
        }
        // As `dropout_pool`: a seed is drawn only when there is dropout; p = 0 keeps everything.
        let seed = if p > 0.0 { mode.rng.random::<u64>() } else { 0 };
        let params = (&self.weight, &self.bias);
        let drop = (p.max(0.0), seed);
        match act.kind {
            Activation::Gelu => {
                crate::ops::pool::group_norm_dropout_avg_pool(x, true, params, drop, (2, 2))
            }
            _ => crate::ops::pool::group_norm_dropout_avg_pool(
                &act.forward(x)?,
                false,
                params,
                drop,
                (2, 2),
            ),
        }
    }
}

/// BatchNorm over (B, C, ...): batch statistics in training (running averages updated with
/// momentum 0.1 and the unbiased variance, as PyTorch does), running statistics in evaluation.
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
}

impl BatchNorm {
    pub fn new(p: &mut Params, name: &str, channels: usize) -> Result<Self> {
        let (weight, bias) = affine(p, name, channels)?;
        Ok(BatchNorm {
            weight,
            bias,
            running_mean: p.buffer(format!("{name}.running_mean"), &[channels], 0.0)?,
            running_var: p.buffer(format!("{name}.running_var"), &[channels], 1.0)?,
        })
    }

    pub fn forward(&self, x: &Tensor, mode: &Mode) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        // (B, C, rest) so statistics are over batch and every position.
        let flat = x.reshape((b, c, ()))?;
        let (mean, var) = if mode.train {
            let mean = flat.mean_keepdim(2)?.mean_keepdim(0)?; // (1, C, 1)
            let var = flat
                .broadcast_sub(&mean)?
                .sqr()?
                .mean_keepdim(2)?
                .mean_keepdim(0)?;
            let n = (flat.elem_count() / c) as f64;
            let unbiased = (var.detach().flatten_all()? * (n / (n - 1.0).max(1.0)))?;
            let m = mean.detach().flatten_all()?;
            self.running_mean.set(
                &((self.running_mean.as_tensor() * (1.0 - mode.bn_momentum))?
                    + (m * mode.bn_momentum)?)?,
            )?;
            self.running_var.set(
                &((self.running_var.as_tensor() * (1.0 - mode.bn_momentum))?
                    + (unbiased * mode.bn_momentum)?)?,
            )?;
            (mean, var)
        } else {
            (
                self.running_mean.as_tensor().reshape((1, c, 1))?,
                self.running_var.as_tensor().reshape((1, c, 1))?,
            )
        };
        flat.broadcast_sub(&mean)?
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(&self.weight.reshape((1, c, 1))?)?
            .broadcast_add(&self.bias.reshape((1, c, 1))?)?
            .reshape(dims.as_slice())
    }
}

/// LayerNorm over the last dimension, as a composite of differentiable ops (Candle's fused
/// layer_norm has no backward).
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    pub fn new(p: &mut Params, name: &str, dim: usize) -> Result<Self> {
        let (weight, bias) = affine(p, name, dim)?;
        Ok(LayerNorm { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        standardize_last(x, 1e-5)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// Multi-head self-attention with one input projection for q, k and v (PyTorch's
/// `nn.MultiheadAttention` layout: `in_proj` (3d × d) and `out_proj`).
pub struct SelfAttention {
    in_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl SelfAttention {
    pub fn new(p: &mut Params, name: &str, dim: usize, heads: usize) -> Result<Self> {
        Ok(SelfAttention {
            in_proj: Linear::new(p, &format!("{name}.in_proj"), dim, 3 * dim)?,
            out_proj: Linear::new(p, &format!("{name}.out_proj"), dim, dim)?,
            heads,
        })
    }

    /// (B, T, d) -> (B, T, d).
    pub fn forward(&self, x: &Tensor, dropout_p: f64, mode: &mut Mode) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let qkv = self
            .in_proj
            .forward(x)?
            .reshape((b, t, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?; // (3, B, H, T, hd)
        let (q, k, v) = (
            qkv.get(0)?.contiguous()?,
            qkv.get(1)?.contiguous()?,
            qkv.get(2)?.contiguous()?,
        );
        let scores = (matmul(&q, &k.t()?.contiguous()?)? / (hd as f64).sqrt())?;
        let attn = dropout(
            &crate::ops::attention::softmax_last(&scores)?,
            dropout_p,
            mode,
        )?;
        let y = matmul(&attn, &v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out_proj.forward(&y)
    }
}

/// Inverted dropout whose mask comes from the run's seeded RNG (see ops::dropout::dropout), so a seeded
/// run is reproducible, on the CPU and the GPU alike.
pub fn dropout(x: &Tensor, p: f64, mode: &mut Mode) -> Result<Tensor> {
    if !mode.train || p <= 0.0 {
        return Ok(x.clone());
    }
    crate::ops::dropout::dropout(x, p, mode.rng.random::<u64>())
}

/// Dropout, then average pooling with a window of 2 along each spatial axis (2×2 on images,
/// 2 on time series; floor, as PyTorch). In training on the CPU one fused op.
pub fn dropout_pool(x: &Tensor, p: f64, mode: &mut Mode) -> Result<Tensor> {
    if x.rank() == 3 {
        return pool_2d_or_fused(&x.unsqueeze(2)?, p, mode, 1)?.squeeze(2);
    }
    pool_2d_or_fused(x, p, mode, 2)
}

fn pool_2d_or_fused(x: &Tensor, p: f64, mode: &mut Mode, kh: usize) -> Result<Tensor> {
    if !mode.train || p <= 0.0 {
        return crate::ops::pool::avg_pool(x, kh, 2);
    }
    // The same draw as `dropout`: the fused op keeps exactly the elements it would.
    crate::ops::pool::dropout_avg_pool(x, p, mode.rng.random::<u64>(), kh, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1-D convolution's output and kernel gradient equal their definitions (Candle's own
    /// padded conv1d gets the kernel gradient wrong, off by more than its magnitude).
    #[test]
    fn conv1d_and_its_kernel_gradient_match_the_definition() -> Result<()> {
        let dev = Device::Cpu;
        let mut p = Params::new(5, &dev);
        let conv = Conv::new(&mut p, "c", 1, 4, 7, 7)?;
        let x = Tensor::randn(0f32, 1.0, (3, 4, 50), &dev)?;
        let y = conv.forward(&x)?;
        let r = Tensor::randn(0f32, 1.0, y.shape(), &dev)?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let (w_var, b_var) = (&p.trainable[0].1, &p.trainable[1].1);
        let dw = grads.get(w_var).unwrap().to_vec3::<f32>()?;
        let w = w_var.as_tensor().to_vec3::<f32>()?;
        let b = b_var.as_tensor().to_vec1::<f32>()?;
        let xp = x.pad_with_zeros(2, 3, 3)?.to_vec3::<f32>()?;
        let (yv, rv) = (y.to_vec3::<f32>()?, r.to_vec3::<f32>()?);
        for o in 0..7 {
            for t in 0..50 {
                for bi in 0..3 {
                    let mut s = b[o];
                    for c in 0..4 {
                        for k in 0..7 {
                            s += w[o][c][k] * xp[bi][c][t + k];
                        }
                    }
                    assert!((s - yv[bi][o][t]).abs() < 1e-4, "y[{bi},{o},{t}]");
                }
            }
            for c in 0..4 {
                for k in 0..7 {
                    let mut s = 0f32;
                    for bi in 0..3 {
                        for t in 0..50 {
                            s += rv[bi][o][t] * xp[bi][c][t + k];
                        }
                    }
                    assert!(
                        (s - dw[o][c][k]).abs() < 1e-3,
                        "dw[{o},{c},{k}]: {s} vs {}",
                        dw[o][c][k]
                    );
                }
            }
        }
        Ok(())
    }
}
