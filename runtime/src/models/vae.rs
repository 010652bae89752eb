//! diffusers' `AutoencoderKL` (the Stable Diffusion 1.5 and 3.5 VAEs), frozen: it encodes
//! spectrograms into the latent space the denoiser trains in, and decodes samples for the
//! evaluation grids, KID/MMD² and `sigdiff sample`. Built from the `config.json` the build read
//! (config/src/pretrained.rs) and loaded from diffusers' weight names (the old
//! `query`/`key`/`value`/`proj_attn` attention names too).
//!
//! Encoder: conv_in; per block `layers_per_block` ResNet blocks and, but for the last, a
//! stride-2 convolution after padding right and bottom by one; a middle block (ResNet,
//! single-head self-attention, ResNet); GroupNorm, SiLU, conv_out to the mean and log-variance
//! (clamped to [-30, 20], as diffusers does), then `quant_conv` when the VAE has one. The
//! decoder mirrors it with `layers_per_block + 1` ResNets per block and nearest 2× upsampling.
//! Every GroupNorm has `norm_num_groups` groups and ε = 1e-6.
//!
//! With tiling on (`model.vae_tiling`), images larger than the VAE's `sample_size` (latents
//! larger than its latent tile) are encoded (decoded) as diffusers' `enable_tiling()` does:
//! tiles of that size every three quarters of it, each blended linearly into its upper and left
//! neighbours over a quarter of a tile, then cropped and joined.
//!
//! Nothing here is trained, so the layers are plain tensor expressions (no backward needed);
//! the stride-1 convolutions and the attention use the project's fused CPU ops all the same,
//! since encoding a dataset is their hot loop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use signal_diffusion_config::pretrained::{weights_in, Vae as VaeConfig};

use crate::ops::attention::attention;
use crate::ops::conv::conv;

const EPS: f64 = 1e-6;

/// The weights of one VAE by name, and where they came from (for errors).
struct Weights {
    map: HashMap<String, Tensor>,
    file: PathBuf,
}

impl Weights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.map.get(name).with_context(|| {
            format!(
                "{}: no tensor `{name}` (is this the VAE its config.json describes?)",
                self.file.display()
            )
        })?;
        // Old checkpoints store the attention projections as 1×1 convolutions.
        let t = if t.rank() == 4 && shape.len() == 2 {
            t.flatten_from(1)?
        } else {
            t.clone()
        };
        if t.dims() != shape {
            bail!(
                "{}: `{name}` has shape {:?}, the config.json gives {shape:?}",
                self.file.display(),
                t.dims()
            );
        }
        Ok(t.to_dtype(DType::F32)?)
    }

    /// The first of `names` present (diffusers' current name, then the old one).
    fn get_any(&self, names: [&str; 2], shape: &[usize]) -> Result<Tensor> {
        match self.map.contains_key(names[0]) {
            true => self.get(names[0], shape),
            false => self.get(names[1], shape),
        }
    }
}

struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

impl GroupNorm {
    fn new(w: &Weights, name: &str, c: usize, groups: usize) -> Result<Self> {
        Ok(GroupNorm {
            weight: w
                .get(&format!("{name}.weight"), &[c])?
                .reshape((1, c, 1, 1))?,
            bias: w
                .get(&format!("{name}.bias"), &[c])?
                .reshape((1, c, 1, 1))?,
            groups,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, wd) = x.dims4()?;
        let g = x.reshape((n, self.groups, (c / self.groups) * h * wd))?;
        let centered = g.broadcast_sub(&g.mean_keepdim(2)?)?;
        let std = (centered.sqr()?.mean_keepdim(2)? + EPS)?.sqrt()?;
        let normed = centered.broadcast_div(&std)?.reshape((n, c, h, wd))?;
        Ok(normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }
}

struct Conv2d {
    weight: Tensor,
    bias: Tensor,
}

impl Conv2d {
    fn new(w: &Weights, name: &str, cin: usize, cout: usize, k: usize) -> Result<Self> {
        Ok(Conv2d {
            weight: w.get(&format!("{name}.weight"), &[cout, cin, k, k])?,
            bias: w.get(&format!("{name}.bias"), &[cout])?,
        })
    }

    /// Stride 1, "same" padding.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.weight.dim(3)?;
        Ok(conv(x, &self.weight, Some(&self.bias), k / 2)?)
    }

    /// diffusers' `Downsample2D` without padding: stride 2 after padding right and bottom by one.
    fn forward_down(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.bias.dim(0)?;
        let x = x
            .pad_with_zeros(D::Minus1, 0, 1)?
            .pad_with_zeros(D::Minus2, 0, 1)?;
        Ok(x.conv2d(&self.weight, 0, 2, 1, 1)?
            .broadcast_add(&self.bias.reshape((1, c, 1, 1))?)?)
    }
}

struct Linear {
    weight_t: Tensor,
    bias: Tensor,
}

impl Linear {
    fn new(w: &Weights, names: [&str; 2], c: usize) -> Result<Self> {
        let [new, old] = names.map(|n| n.to_string());
        Ok(Linear {
            weight_t: w
                .get_any(
                    [&format!("{new}.weight"), &format!("{old}.weight")],
                    &[c, c],
                )?
                .t()?
                .contiguous()?,
            bias: w.get_any([&format!("{new}.bias"), &format!("{old}.bias")], &[c])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_matmul(&self.weight_t)?
            .broadcast_add(&self.bias)?)
    }
}

/// `ResnetBlock2D` without a time embedding: x + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))),
/// the skip through a 1×1 convolution when the width changes.
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl Resnet {
    fn new(w: &Weights, name: &str, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(Resnet {
            norm1: GroupNorm::new(w, &format!("{name}.norm1"), cin, groups)?,
            conv1: Conv2d::new(w, &format!("{name}.conv1"), cin, cout, 3)?,
            norm2: GroupNorm::new(w, &format!("{name}.norm2"), cout, groups)?,
            conv2: Conv2d::new(w, &format!("{name}.conv2"), cout, cout, 3)?,
            shortcut: (cin != cout)
                .then(|| Conv2d::new(w, &format!("{name}.conv_shortcut"), cin, cout, 1))
                .transpose()?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

/// The middle block's single-head self-attention over the H·W positions, residual.
struct Attention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl Attention {
    fn new(w: &Weights, name: &str, c: usize, groups: usize) -> Result<Self> {
        let n = |new: &str, old: &str| [format!("{name}.{new}"), format!("{name}.{old}")];
        let linear = |[new, old]: [String; 2]| Linear::new(w, [&new, &old], c);
        Ok(Attention {
            norm: GroupNorm::new(w, &format!("{name}.group_norm"), c, groups)?,
            q: linear(n("to_q", "query"))?,
            k: linear(n("to_k", "key"))?,
            v: linear(n("to_v", "value"))?,
            out: linear(n("to_out.0", "proj_attn"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k, v) = (
            self.q.forward(&tokens)?,
            self.k.forward(&tokens)?,
            self.v.forward(&tokens)?,
        );
        let a = self.out.forward(&attention(&q, &k, &v, 1)?)?;
        Ok((x + a.transpose(1, 2)?.reshape((b, c, h, w))?)?)
    }
}

/// ResNet, attention (when the VAE has it), ResNet.
struct MidBlock {
    first: Resnet,
    attention: Option<Attention>,
    second: Resnet,
}

impl MidBlock {
    fn new(w: &Weights, name: &str, c: usize, cfg: &VaeConfig) -> Result<Self> {
        let g = cfg.norm_num_groups;
        Ok(MidBlock {
            first: Resnet::new(w, &format!("{name}.resnets.0"), c, c, g)?,
            attention: cfg
                .mid_block_add_attention
                .then(|| Attention::new(w, &format!("{name}.attentions.0"), c, g))
                .transpose()?,
            second: Resnet::new(w, &format!("{name}.resnets.1"), c, c, g)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.first.forward(x)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x)?;
        }
        self.second.forward(&x)
    }
}

/// One block of either stack: its ResNets, then the resampling convolution if it has one.
struct Block {
    resnets: Vec<Resnet>,
    resample: Option<Conv2d>,
}

pub struct Vae {
    pub config: VaeConfig,
    conv_in: Conv2d,
    down: Vec<Block>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant: Option<Conv2d>,
    post_quant: Option<Conv2d>,
    dec_conv_in: Conv2d,
    dec_mid: MidBlock,
    up: Vec<Block>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv2d,
    /// Identifies the weights (their file's contents), for the latent cache's key.
    pub weights_hash: String,
    /// Encode and decode large inputs in blended tiles (diffusers' `enable_tiling`).
    pub tiling: bool,
}

impl Vae {
    /// The VAE `cfg` describes, from the weights beside its config.json, encoding and decoding
    /// in tiles when `tiling` (`model.vae_tiling`).
    pub fn load(cfg: &VaeConfig, tiling: bool, device: &Device) -> Result<Self> {
        let file = weights_in(&cfg.dir, Path::is_file).with_context(|| {
            format!(
                "{}: no diffusion_pytorch_model.safetensors (or .fp16 / sharded) beside the VAE's config.json; download the weights (`huggingface-cli download <model> --include \"vae/*\"`)",
                cfg.dir.display()
            )
        })?;
        let (map, weights_hash) = read_weights(&file, device)?;
        let vae = Self::from_weights(cfg, &Weights { map, file }, weights_hash)?;
        Ok(Self { tiling, ..vae })
    }

    /// What the latents it encodes depend on, for the latent cache's key: the weights, and
    /// tiling (tiles blended at their seams give other latents).
    pub fn encoding_key(&self) -> String {
        match self.tiling {
            true => format!("{}+tiling", self.weights_hash),
            false => self.weights_hash.clone(),
        }
    }

    fn from_weights(cfg: &VaeConfig, w: &Weights, weights_hash: String) -> Result<Self> {
        let (g, widths, l) = (
            cfg.norm_num_groups,
            &cfg.block_out_channels,
            cfg.latent_channels,
        );
        let last = *widths.last().expect("the build checked block_out_channels");
        let n = widths.len();
        let mut down = vec![];
        let mut cin = widths[0];
        for (i, &c) in widths.iter().enumerate() {
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let input = if j == 0 { cin } else { c };
                    Resnet::new(
                        w,
                        &format!("encoder.down_blocks.{i}.resnets.{j}"),
                        input,
                        c,
                        g,
                    )
                })
                .collect::<Result<_>>()?;
            let name = format!("encoder.down_blocks.{i}.downsamplers.0.conv");
            let resample = (i + 1 < n)
                .then(|| Conv2d::new(w, &name, c, c, 3))
                .transpose()?;
            down.push(Block { resnets, resample });
            cin = c;
        }
        let mut up = vec![];
        let mut cin = last;
        for (i, &c) in widths.iter().rev().enumerate() {
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let input = if j == 0 { cin } else { c };
                    Resnet::new(
                        w,
                        &format!("decoder.up_blocks.{i}.resnets.{j}"),
                        input,
                        c,
                        g,
                    )
                })
                .collect::<Result<_>>()?;
            let name = format!("decoder.up_blocks.{i}.upsamplers.0.conv");
            let resample = (i + 1 < n)
                .then(|| Conv2d::new(w, &name, c, c, 3))
                .transpose()?;
            up.push(Block { resnets, resample });
            cin = c;
        }
        let quant = |on: bool, name: &str| {
            on.then(|| Conv2d::new(w, name, 2 * l, 2 * l, 1))
                .transpose()
        };
        Ok(Vae {
            config: cfg.clone(),
            conv_in: Conv2d::new(w, "encoder.conv_in", cfg.in_channels, widths[0], 3)?,
            down,
            mid: MidBlock::new(w, "encoder.mid_block", last, cfg)?,
            norm_out: GroupNorm::new(w, "encoder.conv_norm_out", last, g)?,
            conv_out: Conv2d::new(w, "encoder.conv_out", last, 2 * l, 3)?,
            quant: quant(cfg.use_quant_conv, "quant_conv")?,
            post_quant: cfg
                .use_post_quant_conv
                .then(|| Conv2d::new(w, "post_quant_conv", l, l, 1))
                .transpose()?,
            dec_conv_in: Conv2d::new(w, "decoder.conv_in", l, last, 3)?,
            dec_mid: MidBlock::new(w, "decoder.mid_block", last, cfg)?,
            up,
            dec_norm_out: GroupNorm::new(w, "decoder.conv_norm_out", widths[0], g)?,
            dec_conv_out: Conv2d::new(w, "decoder.conv_out", widths[0], cfg.out_channels, 3)?,
            weights_hash,
            tiling: false,
        })
    }

    /// The latent distribution of images `x` (B, 3, H, W) in [-1, 1]: its mean and log-variance
    /// (B, latent_channels, H / downscale, W / downscale).
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let tile = self.config.sample_size;
        let (_, _, height, width) = x.dims4()?;
        let h = match self.tiling && (height > tile || width > tile) {
            true => tiled(x, tile, tile / self.config.downscale(), |t| self.moments(t))?,
            false => self.moments(x)?,
        };
        let l = self.config.latent_channels;
        let mean = h.narrow(1, 0, l)?.contiguous()?;
        let logvar = h.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// The encoder's output: the mean and log-variance stacked on the channels.
    fn moments(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.down {
            for r in &block.resnets {
                h = r.forward(&h)?;
            }
            if let Some(d) = &block.resample {
                h = d.forward_down(&h)?;
            }
        }
        h = self.mid.forward(&h)?;
        h = self.conv_out.forward(&self.norm_out.forward(&h)?.silu()?)?;
        if let Some(q) = &self.quant {
            h = q.forward(&h)?;
        }
        Ok(h)
    }

    /// Images (B, 3, H, W) of VAE latents `z` (unscaled: what the encoder's distribution holds).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let tile = self.config.sample_size / self.config.downscale();
        let (_, _, height, width) = z.dims4()?;
        match self.tiling && (height > tile || width > tile) {
            true => tiled(z, tile, self.config.sample_size, |t| self.decode_whole(t)),
            false => self.decode_whole(z),
        }
    }

    fn decode_whole(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = match &self.post_quant {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        h = self.dec_mid.forward(&self.dec_conv_in.forward(&h)?)?;
        for block in &self.up {
            for r in &block.resnets {
                h = r.forward(&h)?;
            }
            if let Some(u) = &block.resample {
                let (_, _, hh, ww) = h.dims4()?;
                h = u.forward(&h.upsample_nearest2d(2 * hh, 2 * ww)?)?;
            }
        }
        self.dec_conv_out
            .forward(&self.dec_norm_out.forward(&h)?.silu()?)
    }

    /// The denoiser's input from VAE latents: (z − shift) · scale.
    pub fn to_model(&self, z: &Tensor) -> Result<Tensor> {
        Ok(z.affine(
            self.config.scaling_factor,
            -self.config.shift_factor * self.config.scaling_factor,
        )?)
    }

    /// VAE latents from the denoiser's output: x / scale + shift.
    pub fn from_model(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.affine(1.0 / self.config.scaling_factor, self.config.shift_factor)?)
    }
}

/// `f` (an encoder or decoder mapping `tile_in`-sized tiles to `tile_out`-sized ones) over `x`
/// in tiles as diffusers' `_tiled_encode` / `tiled_decode`: a tile every ¾ `tile_in` along each
/// axis (the last ones cut short by the border), each tile's first ¼ `tile_out` rows and columns
/// blended linearly with the already blended tiles above and to the left, each kept up to
/// `tile_out` − ¼ `tile_out`, then joined.
fn tiled(
    x: &Tensor,
    tile_in: usize,
    tile_out: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let step = (tile_in as f64 * 0.75) as usize;
    let blend = (tile_out as f64 * 0.25) as usize;
    let keep = tile_out - blend;
    let (_, _, h, w) = x.dims4()?;
    let mut rows: Vec<Vec<Tensor>> = vec![];
    for i in (0..h).step_by(step) {
        let mut row: Vec<Tensor> = vec![];
        for j in (0..w).step_by(step) {
            let piece = x
                .narrow(2, i, tile_in.min(h - i))?
                .narrow(3, j, tile_in.min(w - j))?;
            let mut t = f(&piece)?;
            if let Some(above) = rows.last() {
                t = blend_into(&above[row.len()], &t, blend, 2)?;
            }
            if let Some(left) = row.last() {
                t = blend_into(left, &t, blend, 3)?;
            }
            row.push(t);
        }
        rows.push(row);
    }
    let crop = |t: &Tensor, axis: usize| t.narrow(axis, 0, keep.min(t.dim(axis).unwrap_or(0)));
    let joined = rows
        .iter()
        .map(|row| {
            let cropped = row
                .iter()
                .map(|t| crop(&crop(t, 2)?, 3))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&cropped, 3)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&joined, 2)?)
}

/// `b` with its first `extent` slices along `axis` (2: rows, 3: columns) blended from `a`'s
/// last ones: a·(1 − k/extent) + b·(k/extent) for slice k (diffusers' `blend_v` / `blend_h`).
fn blend_into(a: &Tensor, b: &Tensor, extent: usize, axis: usize) -> Result<Tensor> {
    let e = extent.min(a.dim(axis)?).min(b.dim(axis)?);
    if e == 0 {
        return Ok(b.clone());
    }
    let mut shape = [1usize; 4];
    shape[axis] = e;
    let ramp: Vec<f32> = (0..e).map(|k| (k as f64 / e as f64) as f32).collect();
    let ramp = Tensor::from_vec(ramp, shape.as_slice(), b.device())?;
    let tail = a.narrow(axis, a.dim(axis)? - e, e)?;
    let head = b.narrow(axis, 0, e)?;
    let blended = (tail.broadcast_mul(&ramp.affine(-1.0, 1.0)?)? + head.broadcast_mul(&ramp)?)?;
    let rest = b.narrow(axis, e, b.dim(axis)? - e)?;
    Ok(Tensor::cat(&[&blended, &rest], axis)?)
}

/// Every tensor of a safetensors file or a shard index, and a hash of the bytes read.
fn read_weights(file: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, String)> {
    let files: Vec<PathBuf> = if file.extension().is_some_and(|e| e == "json") {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a shard index", file.display()))?;
        let mut shards: Vec<String> = index["weight_map"]
            .as_object()
            .with_context(|| format!("{}: no `weight_map`", file.display()))?
            .values()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        shards.sort();
        shards.dedup();
        let dir = file.parent().unwrap_or(Path::new("."));
        shards.iter().map(|s| dir.join(s)).collect()
    } else {
        vec![file.to_path_buf()]
    };
    let mut map = HashMap::new();
    let mut hash = 0u64;
    for f in &files {
        let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
        hash = hash.rotate_left(17) ^ crate::data::io::fnv(&bytes);
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .with_context(|| format!("{}: not a safetensors file", f.display()))?;
        map.extend(tensors);
    }
    Ok((map, format!("{hash:016x}")))
}
