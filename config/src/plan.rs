//! The shape plan: every layer's output shape, parameter count and forward FLOPs, computed from
//! the resolved config before any code is generated. The generated trainer bakes these numbers
//! in as constants; `train --plan` prints them. Counts follow the reference's PyTorch modules
//! exactly (tests pin them against `spec/reference/*`).

use serde::Serialize;

use crate::choice::{Activation, Backbone, Choice, Conditioning, DataType, FeedForward, Pooling};
use crate::schema::{Classification, Diffusion};

#[derive(Debug, Clone, Serialize)]
pub struct Layer {
    pub name: String,
    /// Per-sample output shape (no batch dimension).
    pub output: Vec<usize>,
    pub params: u64,
    /// Forward multiply-adds × 2, per sample.
    pub flops: u64,
    /// A convolution's shape and the algorithm its CPU op runs.
    pub conv: Option<ConvShape>,
}

/// A stride-1 convolution as its op sees it (a 1-D one is 2-D with height 1).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ConvShape {
    pub cin: usize,
    pub cout: usize,
    /// (height, width).
    pub kernel: [usize; 2],
    /// The output's (height, width).
    pub side: [usize; 2],
    pub algorithm: ConvAlgorithm,
}

impl ConvShape {
    fn new(cin: usize, cout: usize, kernel: [usize; 2], side: [usize; 2]) -> Self {
        let algorithm = ConvAlgorithm::for_shape(cin, cout, kernel, side);
        ConvShape {
            cin,
            cout,
            kernel,
            side,
            algorithm,
        }
    }
}

/// How a convolution runs on the CPU (runtime/src/ops/conv.rs and winograd.rs): the same rule
/// picks it here, for `train --plan`, and in the op, from the layer's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ConvAlgorithm {
    /// An im2col band, then one GEMM.
    Im2colGemm,
    /// Winograd F(4×4, 3×3): 36 GEMMs over transformed tiles, 4× fewer multiply-adds.
    WinogradF4x3,
}

impl ConvAlgorithm {
    /// The algorithm for a stride-1 convolution of `cin` → `cout` channels with a `kernel`
    /// (height, width) and an output of `side` (height, width), by measurement
    /// (`cargo bench -p signal-diffusion-runtime --bench conv`, docs/benchmarks.md): Winograd for
    /// a 3×3 kernel from 16 channels each side and 16² outputs (16 tiles a sample), where its
    /// transforms, linear in the channels, are small next to its GEMMs, quadratic in them; im2col
    /// below that, for every other kernel, and for 1-D convolutions.
    pub fn for_shape(cin: usize, cout: usize, kernel: [usize; 2], side: [usize; 2]) -> Self {
        let winograd =
            kernel == [3, 3] && cin >= 16 && cout >= 16 && side[0] >= 16 && side[1] >= 16;
        match winograd {
            true => ConvAlgorithm::WinogradF4x3,
            false => ConvAlgorithm::Im2colGemm,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ConvAlgorithm::Im2colGemm => "im2col+GEMM",
            ConvAlgorithm::WinogradF4x3 => "Winograd F(4x4,3x3)",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub model: String,
    pub batch: usize,
    /// Per-sample input shape.
    pub input: Vec<usize>,
    pub layers: Vec<Layer>,
    pub params: u64,
    /// Forward + backward (≈ 3× forward) for one batch.
    pub flops_per_step: u64,
    /// Parameters, gradients and two optimizer moments in f32, plus activations kept for backward
    /// (under LoRA the frozen weights alone: `frozen`).
    pub memory_bytes: u64,
    /// LoRA: the model's weights are frozen (no gradients or optimizer moments; the adapters,
    /// r·(in + out) per adapted layer, are not counted).
    pub frozen: bool,
    /// 8-bit AdamW: its two moments take 2 bytes per parameter (plus a block scale per 256:
    /// runtime/src/train/adamw_8bit.rs), not 8.
    pub moments_8bit: bool,
    /// The frozen pretrained models the run uses, one line each: the VAE and the image →
    /// latent shapes it gives; the caption text encoder and its pooled width.
    pub pretrained: Vec<String>,
    /// LocalMamba's selective-scan state size N (its CUDA kernels are specialised to it).
    pub scan_state: Option<usize>,
    /// The hourglass's neighbourhood-attention levels as (head size, kernel) pairs, one per
    /// level (its CUDA kernels are specialised to them).
    pub neighborhoods: Vec<(usize, usize)>,
}

/// f32 weights, gradients and two optimizer moments, plus about two tensors of each saved
/// output size (pre- and post-activation). An estimate: the benchmarks measure the real peak.
fn training_memory(params: u64, saved_outputs: u64, batch: usize) -> u64 {
    params * 4 * 4 + saved_outputs * batch as u64 * 4 * 2
}

impl Plan {
    fn finish(model: &str, batch: usize, input: Vec<usize>, layers: Vec<Layer>) -> Plan {
        let params: u64 = layers.iter().map(|l| l.params).sum();
        let fwd: u64 = layers.iter().map(|l| l.flops).sum();
        let act: u64 = layers
            .iter()
            .map(|l| l.output.iter().product::<usize>() as u64)
            .sum();
        let memory_bytes = training_memory(params, act, batch);
        Plan {
            model: model.into(),
            batch,
            input,
            layers,
            params,
            flops_per_step: 3 * fwd * batch as u64,
            memory_bytes,
            frozen: false,
            moments_8bit: false,
            pretrained: vec![],
            scan_state: None,
            neighborhoods: vec![],
        }
    }

    /// The estimate with `optimizer`'s moments: 8-bit AdamW's 2.03 bytes per parameter in place
    /// of f32 AdamW's 8.
    pub fn with_optimizer(&mut self, optimizer: crate::choice::OptimizerName) {
        if optimizer == crate::choice::OptimizerName::AdamW8bit && !self.frozen {
            self.moments_8bit = true;
            // 8 − 2.03 bytes per parameter, in hundredths.
            self.memory_bytes -= self.params * 597 / 100;
        }
    }

    pub fn render(&self) -> String {
        let mut s = format!(
            "model {}  batch {}  input {:?}\n",
            self.model, self.batch, self.input
        );
        for line in &self.pretrained {
            s.push_str(line);
            s.push('\n');
        }
        s.push_str(&format!(
            "{:<40} {:>18} {:>12} {:>13}  {}\n",
            "layer", "output", "params", "MFLOP/sample", "convolution on the CPU"
        ));
        for l in &self.layers {
            let line = format!(
                "{:<40} {:>18} {:>12} {:>13.1}  {}",
                l.name,
                format!("{:?}", l.output),
                group(l.params),
                l.flops as f64 / 1e6,
                l.conv.map_or("", |c| c.algorithm.name())
            );
            s.push_str(line.trim_end());
            s.push('\n');
        }
        s.push_str(&format!(
            "total parameters {}\nFLOPs per training step {:.3} GFLOP (forward + backward, batch {})\nmemory estimate {:.1} MiB ({})\n",
            group(self.params),
            self.flops_per_step as f64 / 1e9,
            self.batch,
            self.memory_bytes as f64 / (1 << 20) as f64,
            match (self.frozen, self.moments_8bit) {
                (true, _) => "LoRA: frozen f32 weights and saved activations; the adapters, their grads and Adam moments not counted",
                (false, true) => "f32 weights and grads, 8-bit Adam moments, saved activations",
                (false, false) => "f32 weights, grads, Adam moments, saved activations",
            }
        ));
        s
    }
}

/// 5249477 -> "5,249,477"
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn conv2d(name: String, cin: usize, cout: usize, k: usize, h: usize, w: usize) -> Layer {
    let params = (cin * cout * k * k + cout) as u64;
    Layer {
        conv: Some(ConvShape::new(cin, cout, [k, k], [h, w])),
        name,
        output: vec![cout, h, w],
        params,
        flops: 2 * (cin * k * k * cout * h * w) as u64,
    }
}

fn conv1d(name: String, cin: usize, cout: usize, k: usize, l: usize) -> Layer {
    Layer {
        conv: Some(ConvShape::new(cin, cout, [1, k], [1, l])),
        name,
        output: vec![cout, l],
        params: (cin * cout * k + cout) as u64,
        flops: 2 * (cin * k * cout * l) as u64,
    }
}

fn linear(name: String, din: usize, dout: usize, tokens: usize, out_shape: Vec<usize>) -> Layer {
    Layer {
        conv: None,
        name,
        output: out_shape,
        params: (din * dout + dout) as u64,
        flops: 2 * (din * dout * tokens) as u64,
    }
}

fn norm(name: String, shape: Vec<usize>, channels: usize) -> Layer {
    let n: usize = shape.iter().product();
    Layer {
        conv: None,
        name,
        output: shape,
        params: 2 * channels as u64,
        flops: 8 * n as u64,
    }
}

/// Channel plan of the reference `CNNBackbone` (cnn_light): growth 4 when E/4^depth ≥ 8, else 2.
pub fn cnn_light_channels(embedding_dim: usize, depth: usize) -> (usize, Vec<usize>) {
    let g = embedding_dim as f64 / 4f64.powi(depth as i32);
    let (gf, c0) = if g >= 8.0 {
        (4usize, g as usize)
    } else {
        (2usize, embedding_dim >> depth)
    };
    let c0 = c0.max(1);
    (c0, (0..depth).map(|i| c0 * gf.pow(i as u32 + 1)).collect())
}

/// Channel plan of the reference `CNNBackbone1D`: c0 = max(8, next_pow2(Cin)), growth rounded from
/// (E/c0)^(1/depth) into [2, 4], kernels max(3, 2·depth+1−2i).
pub fn cnn_1d_channels(
    input_channels: usize,
    embedding_dim: usize,
    depth: usize,
) -> (usize, Vec<usize>, Vec<usize>) {
    let c0 = input_channels.next_power_of_two().max(8);
    let gf = (embedding_dim as f64 / c0 as f64)
        .powf(1.0 / depth as f64)
        .clamp(2.0, 4.0)
        .round() as usize;
    let channels = (0..depth).map(|i| c0 * gf.pow(i as u32 + 1)).collect();
    let kernels = (0..depth)
        .map(|i| (2 * depth + 1).saturating_sub(2 * i).max(3))
        .collect();
    (c0, channels, kernels)
}

fn heads(c: &Classification, layers: &mut Vec<Layer>) {
    let e = c.model.embedding_dim;
    for t in &c.tasks {
        layers.push(linear(
            format!("heads.{}.net.0", t.name),
            e,
            2 * e,
            1,
            vec![2 * e],
        ));
        layers.push(linear(
            format!("heads.{}.net.2", t.name),
            2 * e,
            t.outputs,
            1,
            vec![t.outputs],
        ));
    }
}

/// How the transformer backbone sees its input: patches of an image, or one token per EEG
/// channel of a time series.
pub struct Tokens {
    pub input: Vec<usize>,
    /// Patch side for images, 0 for time series.
    pub patch: usize,
    pub tokens: usize,
    pub token_dim: usize,
}

pub fn transformer_tokens(c: &Classification) -> Tokens {
    let m = &c.model;
    if c.data_type == DataType::Timeseries {
        let (ch, len) = (c.dataset.n_eeg_channels, c.dataset.sequence_length);
        Tokens {
            input: vec![ch, len],
            patch: 0,
            tokens: ch,
            token_dim: len,
        }
    } else {
        let (r, p) = (c.dataset.resolution, m.patch_size);
        Tokens {
            input: vec![m.input_channels, r, r],
            patch: p,
            tokens: (r / p) * (r / p),
            token_dim: m.input_channels * p * p,
        }
    }
}

/// Plan of a classification config.
pub fn classification(c: &Classification) -> Plan {
    let m = &c.model;
    let prelu = u64::from(m.activation == Activation::PRelu);
    let mut layers = vec![];
    let input;
    match m.backbone {
        Backbone::CnnLight => {
            let r = c.dataset.resolution;
            input = vec![m.input_channels, r, r];
            let (c0, channels) = cnn_light_channels(m.embedding_dim, m.depth);
            let mut l = conv2d(
                "backbone.input_conv.0".into(),
                m.input_channels,
                c0,
                5,
                r,
                r,
            );
            l.params += prelu;
            layers.push(l);
            layers.push(norm(
                "backbone.input_conv.2 (GroupNorm)".into(),
                vec![c0, r, r],
                c0,
            ));
            let mut side = r / 2;
            let mut cin = c0;
            for (i, &cout) in channels.iter().enumerate() {
                layers.push(norm(
                    format!("backbone.blocks.{i}.0 (GroupNorm)"),
                    vec![cin, side, side],
                    cin,
                ));
                for j in 0..m.layer_repeats {
                    let mut l = conv2d(
                        format!("backbone.blocks.{i}.{}", 1 + 2 * j),
                        if j == 0 { cin } else { cout },
                        cout,
                        3,
                        side,
                        side,
                    );
                    l.params += prelu;
                    layers.push(l);
                }
                side /= 2;
                cin = cout;
            }
            layers.push(Layer {
                conv: None,
                name: "backbone.pool".into(),
                output: vec![cin],
                params: 0,
                flops: 0,
            });
        }
        Backbone::Cnn1d | Backbone::Cnn1dLight => {
            let len = c.dataset.sequence_length;
            input = vec![m.input_channels, len];
            let (c0, channels, kernels) =
                cnn_1d_channels(m.input_channels, m.embedding_dim, m.depth);
            let mut l = conv1d(
                "backbone.input_conv.0".into(),
                m.input_channels,
                c0,
                kernels[0],
                len,
            );
            l.params += prelu;
            layers.push(l);
            layers.push(norm(
                "backbone.input_conv.2 (BatchNorm1d)".into(),
                vec![c0, len],
                c0,
            ));
            let mut l_len = len / 2;
            let mut cin = c0;
            for (i, (&cout, &k)) in channels.iter().zip(&kernels).enumerate() {
                layers.push(norm(
                    format!("backbone.blocks.{i}.0 (BatchNorm1d)"),
                    vec![cin, l_len],
                    cin,
                ));
                for j in 0..m.layer_repeats {
                    let mut l = conv1d(
                        format!("backbone.blocks.{i}.{}", 1 + 2 * j),
                        if j == 0 { cin } else { cout },
                        cout,
                        k,
                        l_len,
                    );
                    l.params += prelu;
                    layers.push(l);
                }
                l_len /= 2;
                cin = cout;
            }
            layers.push(linear(
                "backbone.proj".into(),
                cin,
                m.embedding_dim,
                1,
                vec![m.embedding_dim],
            ));
        }
        Backbone::Cnn => {
            let r = c.dataset.resolution;
            input = vec![m.input_channels, r, r];
            let (c0, channels) = cnn_light_channels(m.embedding_dim, m.depth);
            let mut l = conv2d("backbone.stem.conv".into(), m.input_channels, c0, 5, r, r);
            l.params = l.params - c0 as u64 + prelu; // no bias (a BatchNorm follows)
            layers.push(l);
            layers.push(norm("backbone.stem.norm".into(), vec![c0, r, r], c0));
            let mut side = r / 2;
            let mut cin = c0;
            for (i, &cout) in channels.iter().enumerate() {
                for j in 0..m.layer_repeats {
                    let unit_in = if j == 0 { cin } else { cout };
                    let n = format!("backbone.blocks.{i}.{j}");
                    let mut c1 = conv2d(format!("{n}.conv1"), unit_in, cout, 3, side, side);
                    c1.params -= cout as u64;
                    let mut c2 = conv2d(format!("{n}.conv2"), cout, cout, 3, side, side);
                    c2.params -= cout as u64;
                    c2.params += 2 * prelu; // act1 and act_out
                    layers.push(c1);
                    layers.push(norm(format!("{n}.norm1"), vec![cout, side, side], cout));
                    layers.push(c2);
                    layers.push(norm(format!("{n}.norm2"), vec![cout, side, side], cout));
                    if unit_in != cout {
                        layers.push(conv2d(format!("{n}.skip"), unit_in, cout, 1, side, side));
                    }
                }
                side /= 2;
                cin = cout;
            }
            layers.push(Layer {
                conv: None,
                name: "backbone.pool".into(),
                output: vec![cin],
                params: 0,
                flops: 0,
            });
        }
        Backbone::Transformer => {
            let t = transformer_tokens(c);
            input = t.input.clone();
            let (h, ff) = (m.hidden_dim, m.ff_dim);
            let positions = t.tokens + usize::from(m.pooling == Pooling::Cls);
            layers.push(linear(
                "backbone.embed".into(),
                t.token_dim,
                h,
                t.tokens,
                vec![t.tokens, h],
            ));
            let extra = (positions * h + if m.pooling == Pooling::Cls { h } else { 0 }) as u64;
            layers.push(Layer {
                conv: None,
                name: "backbone.pos_embed (+cls_token)".into(),
                output: vec![positions, h],
                params: extra,
                flops: 0,
            });
            for i in 0..m.num_layers {
                let n = format!("backbone.layers.{i}");
                layers.push(norm(format!("{n}.norm1"), vec![positions, h], h));
                let attn_flops =
                    2 * 4 * (h * h * positions) as u64 + 2 * 2 * (positions * positions * h) as u64;
                layers.push(Layer {
                    conv: None,
                    name: format!("{n}.self_attn"),
                    output: vec![positions, h],
                    params: (4 * h * h + 4 * h) as u64,
                    flops: attn_flops,
                });
                layers.push(norm(format!("{n}.norm2"), vec![positions, h], h));
                let mut f1 = linear(
                    format!("{n}.linear1"),
                    h,
                    ff,
                    positions,
                    vec![positions, ff],
                );
                f1.params += prelu;
                layers.push(f1);
                layers.push(linear(
                    format!("{n}.linear2"),
                    ff,
                    h,
                    positions,
                    vec![positions, h],
                ));
            }
            layers.push(norm("backbone.norm".into(), vec![positions, h], h));
            layers.push(linear(
                "backbone.proj".into(),
                h,
                m.embedding_dim,
                1,
                vec![m.embedding_dim],
            ));
        }
    }
    heads(c, &mut layers);
    Plan::finish(m.backbone.toml(), c.dataset.batch_size, input, layers)
}

/// diffusers' `num_embeds_ada_norm` of a DiT (its label table has one row more): classes plus
/// the null label for `classes`, the 4 gender × health classes plus null for `gend_hlth_age`, and
/// `num_timesteps` for unconditional models (the reference feeds them a constant label).
pub fn dit_num_embeds(d: &Diffusion) -> usize {
    match d.model.conditioning {
        Conditioning::Classes => d.model.num_classes + 1,
        Conditioning::GenderHealthAge => 5,
        Conditioning::None | Conditioning::Caption => d.objective.num_timesteps,
    }
}

/// Plan of a DiT (diffusers `DiTTransformer2DModel` with adaLN-Zero and per-block embedders).
pub fn dit(d: &Diffusion) -> Plan {
    let m = &d.model;
    let dim = m.num_attention_heads * m.attention_head_dim;
    let [h, w] = d.input_hw();
    let [ph, pw] = m.patch_size;
    let tokens = (h / ph) * (w / pw);
    // Label table: num_embeds_ada_norm (+1 for the CFG null row). Without class conditioning the
    // reference feeds a dummy label into a table of num_timesteps rows.
    let num_embeds = dit_num_embeds(d);
    let table_rows = num_embeds + 1;
    // gend_hlth_age adds a per-block age embedder: Linear(256 Fourier features -> D).
    let age = if m.conditioning == Conditioning::GenderHealthAge {
        256 * dim + dim
    } else {
        0
    };
    // caption adds a per-block caption embedder: Linear(pooled width -> D).
    let caption = match (&m.text_encoder_config, m.conditioning) {
        (Some(t), Conditioning::Caption) => t.pooled_dim() * dim + dim,
        _ => 0,
    };
    let age = age + caption;
    let cin = m.in_channels;
    let mut layers = vec![linear(
        "pos_embed.proj".into(),
        cin * ph * pw,
        dim,
        tokens,
        vec![tokens, dim],
    )];
    for b in 0..m.num_layers {
        let p = format!("transformer_blocks.{b}");
        layers.push(Layer {
            conv: None,
            name: format!("{p}.norm1.emb"),
            output: vec![dim],
            params: (256 * dim + dim + dim * dim + dim + table_rows * dim + age) as u64,
            flops: 2 * (256 * dim + dim * dim + age) as u64,
        });
        layers.push(linear(
            format!("{p}.norm1.linear"),
            dim,
            6 * dim,
            1,
            vec![6 * dim],
        ));
        // q, k, v (biases unless `attention_bias = false`) and the output projection (always).
        let qkv_bias = if m.attention_bias { 3 * dim } else { 0 };
        let attn_params = (4 * dim * dim + qkv_bias + dim) as u64;
        let attn_flops =
            2 * 4 * (dim * dim * tokens) as u64 + 2 * 2 * (tokens * tokens * dim) as u64;
        layers.push(Layer {
            conv: None,
            name: format!("{p}.attn1"),
            output: vec![tokens, dim],
            params: attn_params,
            flops: attn_flops,
        });
        if m.norm_elementwise_affine {
            layers.push(Layer {
                conv: None,
                name: format!("{p}.norm3"),
                output: vec![tokens, dim],
                params: 2 * dim as u64,
                flops: 0,
            });
        }
        // The gated activations project to twice the inner width and multiply its halves.
        let gated = matches!(m.activation_fn, FeedForward::Geglu | FeedForward::Swiglu);
        let proj = if gated { 8 * dim } else { 4 * dim };
        layers.push(linear(
            format!("{p}.ff.net.0.proj"),
            dim,
            proj,
            tokens,
            vec![tokens, proj],
        ));
        layers.push(linear(
            format!("{p}.ff.net.2"),
            4 * dim,
            dim,
            tokens,
            vec![tokens, dim],
        ));
    }
    layers.push(linear("proj_out_1".into(), dim, 2 * dim, 1, vec![2 * dim]));
    layers.push(linear(
        "proj_out_2".into(),
        dim,
        ph * pw * m.out_channels,
        tokens,
        vec![m.out_channels, h, w],
    ));
    let input = vec![cin, h, w];
    let mut plan = Plan::finish("dit", d.dataset.batch_size, input, layers);
    if d.training.gradient_checkpointing {
        // Saved: every block's input tokens, one block's activations while it is recomputed, and
        // the patch embedding and head. The FLOPs stay the model's (the recompute is not counted).
        let outputs = |l: &Layer| l.output.iter().product::<usize>() as u64;
        // The first block's layers (after the patch embedding): five, six with an affine norm3.
        let block_layers = 5 + usize::from(m.norm_elementwise_affine);
        let per_block: u64 = plan.layers[1..1 + block_layers].iter().map(outputs).sum();
        let ends =
            outputs(&plan.layers[0]) + plan.layers.iter().rev().take(2).map(outputs).sum::<u64>();
        // One tensor each, where `training_memory` counts two per output.
        let inputs = ((m.num_layers + 1) * tokens * dim) as u64 / 2;
        plan.memory_bytes = training_memory(plan.params, per_block + ends + inputs, plan.batch);
    }
    plan
}

/// Rows of the class table of a hourglass-shaped model: the classes and the null row for
/// `classes`, the 4 gender × health classes and the null for `gend_hlth_age`, none without.
pub fn skeleton_class_rows(d: &Diffusion) -> usize {
    match d.model.conditioning {
        Conditioning::Classes => d.model.num_classes + 1,
        Conditioning::GenderHealthAge => 5,
        Conditioning::None | Conditioning::Caption => 0,
    }
}

/// Plan of Stable Diffusion 3.5's MMDiT (diffusers' `SD3Transformer2DModel`, the blocks
/// runtime/src/models/mmdit.rs builds) on the latent grid: per block the adaLN-Zero
/// modulations of the image and text tokens, one joint attention over both (q and k RMS-normed
/// per head), SD 3.5's second, image-only attention in the dual blocks, and the two
/// feed-forwards; the last block keeps only the image tokens. Text tokens: CLIP's (77) and T5's
/// zero tokens (`SD3_T5_TOKENS`).
pub fn mmdit(d: &Diffusion) -> Plan {
    let m = d
        .model
        .mmdit_config
        .as_ref()
        .expect("SD 3.5 resolves its transformer");
    let text = d
        .model
        .text_encoder_config
        .as_ref()
        .map_or(77, |t| t.max_position_embeddings)
        + crate::pretrained::SD3_T5_TOKENS;
    let (dim, hd, p, side) = (
        m.dim(),
        m.attention_head_dim,
        m.patch_size,
        d.model.sample_size,
    );
    let (c, cout) = (m.in_channels, m.out_channels);
    let n = (side / p) * (side / p);
    let joint = n + text;
    let mut layers = vec![
        linear("pos_embed.proj".into(), c * p * p, dim, n, vec![n, dim]),
        Layer {
            conv: None,
            name: "time_text_embed".into(),
            output: vec![dim],
            params: (256 * dim
                + dim
                + dim * dim
                + dim
                + m.pooled_projection_dim * dim
                + dim
                + dim * dim
                + dim) as u64,
            flops: 2 * (256 * dim + 2 * dim * dim + m.pooled_projection_dim * dim) as u64,
        },
        linear(
            "context_embedder".into(),
            m.joint_attention_dim,
            dim,
            text,
            vec![text, dim],
        ),
    ];
    let qk_norms = if m.qk_norm { 2 * hd } else { 0 };
    for i in 0..m.num_layers {
        let at = format!("transformer_blocks.{i}");
        let (last, dual) = (i + 1 == m.num_layers, m.dual_attention_layers.contains(&i));
        let modulations = if dual { 9 } else { 6 };
        layers.push(linear(
            format!("{at}.norm1.linear"),
            dim,
            modulations * dim,
            1,
            vec![modulations * dim],
        ));
        let context_modulations = if last { 2 } else { 6 };
        layers.push(linear(
            format!("{at}.norm1_context.linear"),
            dim,
            context_modulations * dim,
            1,
            vec![context_modulations * dim],
        ));
        // q, k, v of both streams, the image output projection (and the text one but in the
        // last block), the q/k norms; scores and values over the joint sequence.
        let projections = 7 + usize::from(!last);
        layers.push(Layer {
            conv: None,
            name: format!("{at}.attn"),
            output: vec![joint, dim],
            params: (projections * (dim * dim + dim) + 2 * qk_norms) as u64,
            flops: 2 * (4 * n + 3 * text + if last { 0 } else { text }) as u64 * (dim * dim) as u64
                + 4 * (joint * joint * dim) as u64,
        });
        if dual {
            layers.push(Layer {
                conv: None,
                name: format!("{at}.attn2"),
                output: vec![n, dim],
                params: (4 * (dim * dim + dim) + qk_norms) as u64,
                flops: 8 * (n * dim * dim) as u64 + 4 * (n * n * dim) as u64,
            });
        }
        let streams = if last {
            vec![("ff", n)]
        } else {
            vec![("ff", n), ("ff_context", text)]
        };
        for (ff, tokens) in streams {
            layers.push(linear(
                format!("{at}.{ff}.net.0.proj"),
                dim,
                4 * dim,
                tokens,
                vec![tokens, 4 * dim],
            ));
            layers.push(linear(
                format!("{at}.{ff}.net.2"),
                4 * dim,
                dim,
                tokens,
                vec![tokens, dim],
            ));
        }
    }
    layers.push(linear(
        "norm_out.linear".into(),
        dim,
        2 * dim,
        1,
        vec![2 * dim],
    ));
    layers.push(linear(
        "proj_out".into(),
        dim,
        p * p * cout,
        n,
        vec![cout, side, side],
    ));
    let mut plan = Plan::finish("mmdit", d.dataset.batch_size, vec![c, side, side], layers);
    if d.training.gradient_checkpointing {
        // Saved: every block's input (image and text tokens), one block's activations while it
        // is recomputed, and the embeddings and head.
        let outputs = |l: &Layer| l.output.iter().product::<usize>() as u64;
        let block: u64 = plan
            .layers
            .iter()
            .filter(|l| l.name.starts_with("transformer_blocks.0."))
            .map(outputs)
            .sum();
        let ends: u64 = plan.layers[..3]
            .iter()
            .chain(plan.layers.iter().rev().take(2))
            .map(outputs)
            .sum();
        // One tensor each, where `training_memory` counts two per output.
        let inputs = ((m.num_layers + 1) * joint * dim) as u64 / 2;
        plan.memory_bytes = training_memory(plan.params, block + ends + inputs, plan.batch);
    }
    plan
}

/// Plan of Stable Diffusion 1.5's UNet (diffusers' `UNet2DConditionModel`, the blocks
/// runtime/src/models/unet.rs builds), at the latent side: per level its ResNets (two GroupNorms
/// and 3×3 convolutions, the time projection, a 1×1 shortcut when the width changes) and
/// transformers (GroupNorm, 1×1 or linear projections in and out, self-attention, cross-attention
/// to the 77 text states, GEGLU feed-forward, three LayerNorms), the resampling convolutions, the
/// middle block and the head. Attention FLOPs count the two products of each.
pub fn unet(d: &Diffusion) -> Plan {
    let u = d
        .model
        .unet_config
        .as_ref()
        .expect("SD 1.5 resolves its UNet");
    let text = d
        .model
        .text_encoder_config
        .as_ref()
        .map_or(77, |t| t.max_position_embeddings);
    let ch = &u.block_out_channels;
    let (c0, td, ctx_dim) = (ch[0], 4 * ch[0], u.cross_attention_dim);
    let side = d.model.sample_size;
    let mut layers = vec![
        linear("time_embedding.linear_1".into(), c0, td, 1, vec![td]),
        linear("time_embedding.linear_2".into(), td, td, 1, vec![td]),
        conv2d("conv_in".into(), u.in_channels, c0, 3, side, side),
    ];
    let resnet = |layers: &mut Vec<Layer>, name: String, cin: usize, cout: usize, s: usize| {
        let conv1 = conv2d(format!("{name}.conv1"), cin, cout, 3, s, s);
        let conv2 = conv2d(format!("{name}.conv2"), cout, cout, 3, s, s);
        let shortcut = match cin != cout {
            true => conv2d(format!("{name}.conv_shortcut"), cin, cout, 1, s, s).params,
            false => 0,
        };
        let params =
            (2 * (cin + cout) + td * cout + cout) as u64 + conv1.params + conv2.params + shortcut;
        let shortcut_flops = if cin != cout {
            2 * (cin * cout * s * s) as u64
        } else {
            0
        };
        layers.push(Layer {
            conv: None,
            name,
            output: vec![cout, s, s],
            params,
            flops: conv1.flops + conv2.flops + shortcut_flops + 2 * (td * cout) as u64,
        });
    };
    let transformer = |layers: &mut Vec<Layer>, name: String, c: usize, s: usize| {
        let n = s * s;
        let projections = 2 * (c * c + c);
        let attention = 4 * c * c + c + (c * c + 2 * ctx_dim * c + c * c + c);
        let ff = c * 8 * c + 8 * c + 4 * c * c + c;
        let norms = 2 * c + 3 * 2 * c;
        let params = projections + attention + ff + norms;
        let flops = 2 * n * (2 * c * c + 4 * c * c + 2 * c * c + 12 * c * c)
            + 2 * 2 * text * ctx_dim * c
            + 4 * n * n * c
            + 4 * n * text * c;
        layers.push(Layer {
            conv: None,
            name,
            output: vec![c, s, s],
            params: params as u64,
            flops: flops as u64,
        });
    };
    let levels = ch.len();
    let mut s = side;
    for (i, &cout) in ch.iter().enumerate() {
        let cin = if i == 0 { c0 } else { ch[i - 1] };
        for j in 0..u.layers_per_block {
            let rin = if j == 0 { cin } else { cout };
            resnet(
                &mut layers,
                format!("down_blocks.{i}.resnets.{j}"),
                rin,
                cout,
                s,
            );
            if u.down_attention[i] {
                transformer(
                    &mut layers,
                    format!("down_blocks.{i}.attentions.{j}"),
                    cout,
                    s,
                );
            }
        }
        if i + 1 < levels {
            s /= 2;
            layers.push(conv2d(
                format!("down_blocks.{i}.downsamplers.0.conv"),
                cout,
                cout,
                3,
                s,
                s,
            ));
        }
    }
    let last = ch[levels - 1];
    resnet(&mut layers, "mid_block.resnets.0".into(), last, last, s);
    transformer(&mut layers, "mid_block.attentions.0".into(), last, s);
    resnet(&mut layers, "mid_block.resnets.1".into(), last, last, s);
    let reversed: Vec<usize> = ch.iter().rev().copied().collect();
    for i in 0..levels {
        let (prev, cout) = (reversed[i.saturating_sub(1)], reversed[i]);
        let input = reversed[(i + 1).min(levels - 1)];
        for j in 0..=u.layers_per_block {
            let skip = if j == u.layers_per_block { input } else { cout };
            let rin = if j == 0 { prev } else { cout };
            resnet(
                &mut layers,
                format!("up_blocks.{i}.resnets.{j}"),
                rin + skip,
                cout,
                s,
            );
            if u.up_attention[i] {
                transformer(
                    &mut layers,
                    format!("up_blocks.{i}.attentions.{j}"),
                    cout,
                    s,
                );
            }
        }
        if i + 1 < levels {
            s *= 2;
            layers.push(conv2d(
                format!("up_blocks.{i}.upsamplers.0.conv"),
                cout,
                cout,
                3,
                s,
                s,
            ));
        }
    }
    layers.push(norm("conv_norm_out".into(), vec![c0, side, side], c0));
    layers.push(conv2d("conv_out".into(), c0, u.out_channels, 3, side, side));
    let input = vec![u.in_channels, side, side];
    Plan::finish("stable-diffusion", d.dataset.batch_size, input, layers)
}

/// Plan of the hourglass transformer or LocalMamba: the frame they share (patch_in, the mapping
/// network, 2×2 merges and splits, out_norm, patch_out) around each level's stack, whose
/// layer `layer(level, width, tokens)` gives as (parameters, forward FLOPs per sample).
fn skeleton(
    d: &Diffusion,
    model: &str,
    widths: &[usize],
    layer: impl Fn(usize, usize, usize) -> (u64, u64),
) -> Plan {
    let m = &d.model;
    let (cin, [h, w]) = (m.in_channels, d.input_hw());
    let [ph, pw] = m.patch_size;
    let (mw, mf) = (m.mapping_width, m.mapping_d_ff);
    let grid = |i: usize| ((h / ph) >> i, (w / pw) >> i);
    let (gh, gw) = grid(0);
    let mut layers = vec![Layer {
        conv: None,
        name: "patch_in".into(),
        output: vec![gh, gw, widths[0]],
        params: (cin * ph * pw * widths[0]) as u64,
        flops: 2 * (cin * ph * pw * widths[0] * gh * gw) as u64,
    }];
    // time_in_proj and aug_in_proj (M × M each, no bias), the class table, the mapping
    // condition's projection, then RMSNorm + depth × (RMSNorm, GEGLU up, down) + RMSNorm.
    let rows = skeleton_class_rows(d);
    let inputs = 2 * mw * mw + rows * mw + m.mapping_cond_dim * mw;
    let blocks = m.mapping_depth * (mw + mw * 2 * mf + mf * mw);
    layers.push(Layer {
        conv: None,
        name: "mapping".into(),
        output: vec![mw],
        params: (inputs + 2 * mw + blocks) as u64,
        flops: 2 * (inputs + blocks) as u64,
    });
    let stack = |name: String, i: usize, depth: usize| {
        let (gh, gw) = grid(i);
        let (params, flops) = layer(i, widths[i], gh * gw);
        Layer {
            conv: None,
            name,
            output: vec![gh, gw, widths[i]],
            params: params * depth as u64,
            flops: flops * depth as u64,
        }
    };
    let last = widths.len() - 1;
    for i in 0..last {
        layers.push(stack(format!("down_levels.{i}"), i, m.depths[i]));
        let (gh, gw) = grid(i + 1);
        layers.push(Layer {
            conv: None,
            name: format!("merges.{i}"),
            output: vec![gh, gw, widths[i + 1]],
            params: (4 * widths[i] * widths[i + 1]) as u64,
            flops: 2 * (4 * widths[i] * widths[i + 1] * gh * gw) as u64,
        });
    }
    layers.push(stack("mid_level".into(), last, m.depths[last]));
    for i in (0..last).rev() {
        let (gh, gw) = grid(i);
        layers.push(Layer {
            conv: None,
            name: format!("splits.{i}"),
            output: vec![gh, gw, widths[i]],
            // The projection and the learnable lerp factor.
            params: (4 * widths[i] * widths[i + 1] + 1) as u64,
            flops: 2 * (widths[i + 1] * widths[i] * gh * gw) as u64,
        });
        layers.push(stack(format!("up_levels.{i}"), i, m.depths[i]));
    }
    let cout = m.out_channels;
    layers.push(Layer {
        conv: None,
        name: "out_norm + patch_out".into(),
        output: vec![cout, h, w],
        params: (widths[0] + widths[0] * cout * ph * pw) as u64,
        flops: 2 * (widths[0] * cout * ph * pw * gh * gw) as u64,
    });
    if d.model.name == crate::choice::DiffusionModel::LocalMamba {
        layers.push(conv2d("output_smoother".into(), cout, cout, 3, h, w));
    }
    let mut plan = Plan::finish(model, d.dataset.batch_size, vec![cin, h, w], layers);
    if d.training.gradient_checkpointing {
        // Saved (roughly): one tensor per level output (the segments' inputs), and the largest
        // stack's activations while a layer of it is recomputed.
        let outputs = |l: &Layer| l.output.iter().product::<usize>() as u64;
        let kept: u64 = plan.layers.iter().map(outputs).sum::<u64>() / 2;
        let largest = plan.layers.iter().map(outputs).max().unwrap_or(0);
        plan.memory_bytes = training_memory(plan.params, kept + largest, plan.batch);
    }
    plan
}

/// The plan's lines for the frozen pretrained models: the VAE used, its factors and the shapes
/// it maps between; the caption text encoder and the width of its pooled embedding.
pub fn pretrained_lines(d: &Diffusion) -> Vec<String> {
    let mut lines = vec![];
    if let Some(u) = &d.model.unet_config {
        let o = &d.objective;
        lines.push(format!(
            "UNet {} (Stable Diffusion 1.5's blocks, widths {:?}, cross-attention to {}-wide text states); noise: {} β {} -> {} over {} steps",
            u.dir.display(),
            u.block_out_channels,
            u.cross_attention_dim,
            o.beta_schedule,
            o.beta_start,
            o.beta_end,
            o.num_timesteps
        ));
    }
    if let Some(m) = &d.model.mmdit_config {
        lines.push(format!(
            "transformer {} (SD3Transformer2DModel, {} blocks, {} wide, dual attention in {}); noise: rectified flow over {} steps, timestep shift {}",
            m.dir.display(),
            m.num_layers,
            m.dim(),
            m.dual_attention_layers.len(),
            d.objective.num_timesteps,
            d.objective.flow_shift
        ));
    }
    for t in d
        .model
        .text_encoder_config
        .iter()
        .chain(&d.model.text_encoder_2_config)
    {
        // A UNet attends to the text states; an MMDiT reads both encoders' states (side by side,
        // then T5's zero tokens) and pooled embeddings; the other models the pooled embedding.
        let fed = match (&d.model.unet_config, &d.model.mmdit_config) {
            (Some(_), _) => format!(
                "text states [{}, {}]",
                t.max_position_embeddings, t.hidden_size
            ),
            (_, Some(m)) => format!(
                "penultimate states [{}, {}] into [{}, {}] with T5's zero tokens, pooled {} of {}",
                t.max_position_embeddings,
                t.hidden_size,
                t.max_position_embeddings + crate::pretrained::SD3_T5_TOKENS,
                m.joint_attention_dim,
                t.pooled_dim(),
                m.pooled_projection_dim
            ),
            (None, None) => format!("pooled embedding {}", t.pooled_dim()),
        };
        lines.push(format!(
            "captions: text encoder {} (CLIP, {} layers, {} wide; {fed}), tokenizer {}",
            t.dir.display(),
            t.num_hidden_layers,
            t.hidden_size,
            t.tokenizer_dir.display()
        ));
    }
    let Some(v) = &d.model.vae_config else {
        return lines;
    };
    let (r, s) = (d.dataset.resolution, d.model.sample_size);
    lines.insert(0, format!(
        "latent space: VAE {} ({} latent channels, downscale {}, scale {}, shift {}): images [3, {r}, {r}] -> latents [{}, {s}, {s}]",
        v.dir.display(),
        v.latent_channels,
        v.downscale(),
        v.scaling_factor,
        v.shift_factor,
        v.latent_channels
    ));
    lines
}

/// Plan of the hourglass transformer (k-diffusion's `image_transformer_v2` as the reference
/// builds it). A layer: AdaRMSNorm projections (M × width, twice), qkv, the per-head scale,
/// the output projection, the GEGLU up (width × 2·d_ff) and down; without attention the
/// feed-forward's alone.
pub fn hourglass(d: &Diffusion) -> Plan {
    let m = &d.model;
    let mw = m.mapping_width;
    let plan = skeleton(d, "hourglass", &m.widths, |i, width, tokens| {
        let f = m.d_ffs[i];
        let feed_forward = (mw * width + 3 * width * f, 2 * tokens * 3 * width * f);
        // Keys per query: the k×k neighbourhood or window, or every token.
        let keys = match m.kernel_sizes[i] {
            0 => tokens,
            k => k * k,
        };
        let (params, flops) = match m.attention[i].as_str() {
            "none" => feed_forward,
            _ => (
                feed_forward.0 + mw * width + 4 * width * width + width / m.d_heads[i],
                feed_forward.1 + 2 * tokens * 4 * width * width + 4 * tokens * keys * width,
            ),
        };
        (params as u64, flops as u64)
    });
    let neighborhoods = (0..m.widths.len())
        .filter(|&i| m.attention[i] == "neighborhood")
        .map(|i| (m.d_heads[i], m.kernel_sizes[i]))
        .collect();
    Plan {
        neighborhoods,
        ..plan
    }
}

/// Plan of LocalMamba (LocalVMamba's SS2D on the hourglass frame). A block at width d with
/// E = ssm_ratio·d inner channels, rank R (`ssm_dt_rank`, "auto" = ⌈d/16⌉), state N and K scan
/// directions: AdaRMSNorm (M × d), in_proj (d × 2E), the depthwise `d_conv`² conv, per direction
/// x_proj ((R + 2N) × E), dt_proj (E × R and E), A_log (E × N) and D (E), the output LayerNorm
/// (2E), out_proj (E × d) and the BiAttn gate (LayerNorm, E → E/8 → E with biases).
pub fn localmamba(d: &Diffusion) -> Plan {
    let m = &d.model;
    let (mw, n, k) = (m.mapping_width, m.d_state, m.scan_directions.len());
    let plan = skeleton(d, "localmamba", &m.dims, |_, width, tokens| {
        let e = (m.ssm_ratio * width as f64) as usize;
        let r = m.ssm_dt_rank.unwrap_or(width.div_ceil(16));
        let taps = m.d_conv * m.d_conv;
        let gate = 2 * e + e * (e / 8) + e / 8 + (e / 8) * e + e;
        let scans = k * ((r + 2 * n) * e + e * r + e + e * n + e);
        let conv = taps * e + e;
        let params = mw * width + width * 2 * e + conv + scans + 2 * e + e * width + gate;
        // Projections, the conv, and per direction and token the scan's ~6·E·N.
        let flops = 2 * tokens * (3 * width * e + taps * e + k * ((r + 2 * n) * e + e * r))
            + 6 * k * tokens * e * n;
        (params as u64, flops as u64)
    });
    Plan {
        scan_state: Some(n),
        ..plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cnn_light_channel_plans_match_the_reference_table() {
        assert_eq!(cnn_light_channels(256, 3), (32, vec![64, 128, 256]));
        assert_eq!(cnn_light_channels(384, 3), (48, vec![96, 192, 384]));
        assert_eq!(cnn_light_channels(256, 2), (16, vec![64, 256]));
        assert_eq!(cnn_light_channels(192, 2), (12, vec![48, 192]));
    }

    #[test]
    fn cnn_1d_channel_plan_matches_the_reference() {
        assert_eq!(
            cnn_1d_channels(20, 256, 3),
            (32, vec![64, 128, 256], vec![7, 5, 3])
        );
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(group(5249477), "5,249,477");
        assert_eq!(group(12), "12");
    }
}
