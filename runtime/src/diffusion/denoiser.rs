//! The network the diffusion loop trains and samples, whichever family it is: one forward
//! (x_t, noise levels, condition) → prediction. Each family reads the loop's inputs its own way,
//! and this is the one place that knows how:
//!
//! - DiT takes the scheduler's timestep t (σ·T on the flow path) and a label per sample; its
//!   age features live inside it (dit.rs).
//! - The hourglass and LocalMamba take the noise level σ: the path's noise coefficient s (the
//!   flow's σ, as the reference feeds them; on a VP path √(1 − ᾱ_t)), a class row and the
//!   mapping condition. For `gend_hlth_age` the row is gender·2 + health (4 = null) and the
//!   mapping condition is the age's Fourier features: cos ‖ sin of 2π·(age/100)·w over a fixed
//!   N(0, 1) buffer w (`age_emb.weight`, saved with the weights). A null age is the zero vector in
//!   training and sampling alike: the reference fed FF(0) = [1…1, 0…0] in training but zeros at
//!   sampling (spec/reference/diffusion.md §3), and kept w in neither checkpoint nor config, so a
//!   reloaded model met different age features.

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor};
use serde::{Deserialize, Serialize};
use signal_diffusion_config::choice::DiffusionModel;
use signal_diffusion_config::pretrained::{weight_files, ClipText, SD3_T5_TOKENS};

use super::path::Level;
use crate::models::clip::{sd3_sequence, CaptionEncoder, CaptionInput};
use crate::models::dit::{age_features, Condition, Conditioning, Dit, DitShape};
use crate::models::hourglass::{Hourglass, HourglassShape};
use crate::models::localmamba::{LocalMamba, LocalMambaShape};
use crate::models::lora::LoraDropout;
use crate::models::mmdit::{Mmdit, MmditShape};
use crate::models::nn::Params;
use crate::models::tape::{Node, Tape};
use crate::models::unet::{Unet, UnetShape};

/// A denoiser's shape: the model's own and what the loop needs around it (`sampling.json` keeps
/// it; a DiT's is its bare shape, as files written before the other families had it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DenoiserShape {
    Dit(DitShape),
    Hourglass {
        hourglass: HourglassShape,
        #[serde(flatten)]
        frame: Frame,
    },
    LocalMamba {
        localmamba: LocalMambaShape,
        #[serde(flatten)]
        frame: Frame,
    },
    /// Stable Diffusion 1.5's UNet, attending to `text_tokens` text states per caption.
    Unet {
        unet: UnetShape,
        text_tokens: usize,
        #[serde(flatten)]
        frame: Frame,
    },
    /// Stable Diffusion 3.5's MMDiT, reading per caption `text_tokens` CLIP-L ‖ CLIP-G states
    /// (then T5's zero tokens) and the pooled vector.
    Mmdit {
        mmdit: MmditShape,
        text_tokens: usize,
        #[serde(flatten)]
        frame: Frame,
    },
}

/// The input of a hourglass-shaped model and how it is conditioned.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    pub conditioning: Conditioning,
    pub height: usize,
    pub width: usize,
}

impl DenoiserShape {
    pub fn conditioning(&self) -> Conditioning {
        match self {
            DenoiserShape::Dit(s) => s.conditioning,
            DenoiserShape::Hourglass { frame, .. }
            | DenoiserShape::LocalMamba { frame, .. }
            | DenoiserShape::Unet { frame, .. }
            | DenoiserShape::Mmdit { frame, .. } => frame.conditioning,
        }
    }

    /// (channels, height, width) of one sample.
    pub fn input(&self) -> (usize, usize, usize) {
        match self {
            DenoiserShape::Dit(s) => (s.in_channels, s.height, s.width),
            DenoiserShape::Hourglass { hourglass, frame } => {
                (hourglass.in_channels, frame.height, frame.width)
            }
            DenoiserShape::LocalMamba { localmamba, frame } => {
                (localmamba.in_channels, frame.height, frame.width)
            }
            DenoiserShape::Unet { unet, frame, .. } => {
                (unet.in_channels, frame.height, frame.width)
            }
            DenoiserShape::Mmdit { mmdit, frame, .. } => {
                (mmdit.in_channels, frame.height, frame.width)
            }
        }
    }

    /// Whether a training forward draws random numbers (dropout, drop-path).
    pub fn is_stochastic(&self) -> bool {
        match self {
            DenoiserShape::Dit(s) => s.dropout > 0.0,
            DenoiserShape::Hourglass { hourglass: h, .. } => {
                h.mapping_dropout > 0.0 || h.levels.iter().any(|l| l.dropout > 0.0)
            }
            DenoiserShape::LocalMamba { localmamba: m, .. } => {
                m.dropout > 0.0 || m.drop_path > 0.0 || m.level_dropout.iter().any(|p| *p > 0.0)
            }
            DenoiserShape::Unet { .. } | DenoiserShape::Mmdit { .. } => false,
        }
    }

    /// The file the final weights are written to (the reference's name for its `state_dict`,
    /// as safetensors; diffusers' for a DiT).
    pub fn weights_file(&self) -> &'static str {
        weight_files(self.model())[0]
    }

    /// The file the reference's training writes (a PyTorch pickle; diffusers' for a DiT).
    pub fn reference_file(&self) -> &'static str {
        weight_files(self.model())[2]
    }

    /// The config's name of this family.
    pub fn model(&self) -> DiffusionModel {
        match self {
            DenoiserShape::Dit(_) => DiffusionModel::Dit,
            DenoiserShape::Hourglass { .. } => DiffusionModel::Hourglass,
            DenoiserShape::LocalMamba { .. } => DiffusionModel::LocalMamba,
            DenoiserShape::Unet { .. } => DiffusionModel::StableDiffusion15,
            DenoiserShape::Mmdit { .. } => DiffusionModel::StableDiffusion35,
        }
    }

    /// The family's name (`sigdiff sample` and the logs say it).
    pub fn family(&self) -> &'static str {
        match self {
            DenoiserShape::Dit(_) => "dit",
            DenoiserShape::Hourglass { .. } => "hourglass",
            DenoiserShape::LocalMamba { .. } => "localmamba",
            DenoiserShape::Unet { .. } => "stable-diffusion",
            DenoiserShape::Mmdit { .. } => "stable-diffusion-35",
        }
    }

    /// What the model reads of each caption: a UNet its text states, an MMDiT CLIP-L's and
    /// CLIP-G's states and pooled vectors; the others the pooled embedding.
    pub fn caption_input(&self) -> CaptionInput {
        match self {
            DenoiserShape::Unet { .. } => CaptionInput::States,
            DenoiserShape::Mmdit { .. } => CaptionInput::Sd3,
            _ => CaptionInput::Pooled,
        }
    }

    /// The frozen text encoders that embed this model's captions: `first`, and for an MMDiT
    /// `second` (CLIP-G) beside it.
    pub fn caption_encoder(
        &self,
        (first, second): (&ClipText, Option<&ClipText>),
        device: &Device,
    ) -> anyhow::Result<CaptionEncoder> {
        let joint = match self {
            DenoiserShape::Mmdit { mmdit, .. } => mmdit.joint_attention_dim,
            _ => 0,
        };
        CaptionEncoder::load(self.caption_input(), (first, second), joint, device)
    }

    /// The values per caption a UNet or an MMDiT reads (`Condition::texts` rows, and the null
    /// caption's); 0 for the models that read the pooled embedding.
    pub fn caption_width(&self) -> usize {
        match self {
            DenoiserShape::Unet {
                text_tokens, frame, ..
            } => text_tokens * frame.conditioning.caption_dim(),
            DenoiserShape::Mmdit {
                mmdit,
                text_tokens,
                frame,
            } => text_tokens * frame.conditioning.caption_dim() + mmdit.pooled_projection_dim,
            _ => 0,
        }
    }
}

enum Net {
    Dit(Dit),
    Hourglass(Hourglass),
    LocalMamba(LocalMamba),
    Unet(Box<Unet>),
    Mmdit(Box<Mmdit>),
}

pub struct Denoiser {
    shape: DenoiserShape,
    net: Net,
    /// The age Fourier frequencies of a hourglass-shaped `gend_hlth_age` model.
    age_emb: Option<Tensor>,
    /// LoRA adapters with dropout on their inputs.
    lora_dropout: bool,
    /// A UNet's or an MMDiT's null caption: the empty caption's row (`caption_width` values),
    /// set by whoever holds the text encoders (`set_null_caption`).
    null_caption: Option<Tensor>,
}

impl Denoiser {
    /// The model of `shape`, its tensors drawn and named by `p`.
    pub fn new(shape: &DenoiserShape, p: &mut Params, device: &Device) -> Result<Self> {
        let (net, mapping_cond) = match shape {
            DenoiserShape::Dit(s) => (Net::Dit(Dit::new(s, p, device)?), 0),
            DenoiserShape::Hourglass { hourglass, .. } => (
                Net::Hourglass(Hourglass::new(hourglass, p)?),
                hourglass.mapping_cond_dim,
            ),
            DenoiserShape::LocalMamba { localmamba, .. } => (
                Net::LocalMamba(LocalMamba::new(localmamba, p)?),
                localmamba.mapping_cond_dim,
            ),
            DenoiserShape::Unet { unet, .. } => (Net::Unet(Box::new(Unet::new(unet, p)?)), 0),
            DenoiserShape::Mmdit { mmdit, .. } => {
                (Net::Mmdit(Box::new(Mmdit::new(mmdit, p, device)?)), 0)
            }
        };
        let age_emb = match (&net, shape.conditioning()) {
            (Net::Dit(_) | Net::Unet(_) | Net::Mmdit(_), _) => None,
            (_, Conditioning::GenderHealthAge) => {
                if mapping_cond == 0 || !mapping_cond.is_multiple_of(2) {
                    candle_core::bail!(
                        "gend_hlth_age needs an even mapping condition width for the age features, not {mapping_cond}"
                    );
                }
                Some(p.normal_buffer("age_emb.weight".into(), &[mapping_cond / 2, 1], 1.0)?)
            }
            _ => None,
        };
        Ok(Denoiser {
            shape: shape.clone(),
            net,
            age_emb,
            lora_dropout: p.lora().is_some_and(|l| l.dropout > 0.0),
            null_caption: None,
        })
    }

    /// A UNet's or an MMDiT's null caption (what CFG dropout and unconditional sampling feed):
    /// the empty caption's row, `caption_width` values. The other families ignore it.
    pub fn set_null_caption(&mut self, row: &[f32], device: &Device) -> Result<()> {
        let width = self.shape.caption_width();
        if width == 0 {
            return Ok(());
        }
        if row.len() != width {
            candle_core::bail!(
                "the null caption has {} values; the {} reads {width} per caption",
                row.len(),
                self.shape.family()
            );
        }
        self.null_caption = Some(Tensor::from_slice(row, width, device)?);
        Ok(())
    }

    /// Whether the model needs the null caption's row (`set_null_caption`).
    pub fn needs_null_caption(&self) -> bool {
        self.shape.caption_width() > 0
    }

    /// The caption rows of a batch (B, caption_width): row `label − 1` of `cond.texts` (each
    /// caption's, row-major), the null caption's for label 0.
    fn caption_rows(&self, cond: &Condition, device: &Device) -> Result<Tensor> {
        let null = self.null_caption.as_ref().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "the {}'s null caption was not set",
                self.shape.family()
            ))
        })?;
        let width = null.dim(0)?;
        let rows = cond
            .labels
            .iter()
            .map(|&label| match (&cond.texts, label) {
                (Some(texts), 1..) => {
                    let start = (label as usize - 1) * width;
                    match texts.get(start..start + width) {
                        Some(row) => Tensor::from_slice(row, width, device),
                        None => candle_core::bail!("caption {label} has no text states"),
                    }
                }
                _ => Ok(null.clone()),
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&rows, 0)
    }

    /// A UNet's text states (B, text_tokens, dim).
    fn unet_context(&self, cond: &Condition, device: &Device) -> Result<Tensor> {
        let (tokens, dim) = match &self.shape {
            DenoiserShape::Unet {
                text_tokens, frame, ..
            } => (*text_tokens, frame.conditioning.caption_dim()),
            _ => candle_core::bail!("not a UNet"),
        };
        self.caption_rows(cond, device)?
            .reshape((cond.len(), tokens, dim))
    }

    /// An MMDiT's text tokens (B, text_tokens + T5's, joint) and pooled vectors (B, pooled).
    fn mmdit_text(&self, cond: &Condition, device: &Device) -> Result<(Tensor, Tensor)> {
        let DenoiserShape::Mmdit {
            mmdit,
            text_tokens,
            frame,
        } = &self.shape
        else {
            candle_core::bail!("not an MMDiT")
        };
        let rows = self.caption_rows(cond, device)?;
        let (b, width) = rows.dims2()?;
        let states = text_tokens * frame.conditioning.caption_dim();
        let clip = rows.narrow(1, 0, states)?.reshape((b, *text_tokens, ()))?;
        let pooled = rows.narrow(1, states, width - states)?;
        let sequence = sd3_sequence(&clip, mmdit.joint_attention_dim, SD3_T5_TOKENS)?;
        Ok((sequence, pooled))
    }

    /// Whether a training forward draws random masks (dropout in the model or in its LoRA
    /// adapters), so a step needs a seed for them.
    pub fn is_stochastic(&self) -> bool {
        self.shape.is_stochastic() || self.lora_dropout
    }

    pub fn shape(&self) -> &DenoiserShape {
        &self.shape
    }

    /// The prediction for `x` (B, C, H, W) at `levels` (one per sample) under `cond`, in
    /// evaluation (no dropout).
    pub fn forward(&self, x: &Tensor, levels: &[Level], cond: &Condition) -> Result<Tensor> {
        self.forward_with_dropout(x, levels, cond, None)
    }

    /// `forward` in training: `seed` draws the dropout masks (`None`: none drawn).
    pub fn forward_with_dropout(
        &self,
        x: &Tensor,
        levels: &[Level],
        cond: &Condition,
        seed: Option<u64>,
    ) -> Result<Tensor> {
        let t: Vec<f32> = levels.iter().map(|l| l.t).collect();
        match &self.net {
            Net::Dit(dit) => return dit.forward_with_dropout(x, &t, cond, seed),
            Net::Unet(unet) => {
                // LoRA's dropout masks, drawn from the step's seed (none in evaluation).
                let _lora = LoraDropout::enter(seed);
                return unet.forward(x, &t, &self.unet_context(cond, x.device())?);
            }
            Net::Mmdit(mmdit) => {
                let _lora = LoraDropout::enter(seed);
                let (text, pooled) = self.mmdit_text(cond, x.device())?;
                return mmdit.forward(x, &t, &text, &pooled);
            }
            Net::Hourglass(_) | Net::LocalMamba(_) => {}
        }
        // The same draws as `loss_and_grads` with this seed.
        let mut tape = Tape::new(seed, false);
        let out = self.record(&mut tape, x, levels, cond)?;
        Ok(tape.value(out).clone())
    }

    /// `loss_of` the training forward and the gradients of every parameter. With
    /// `checkpointing`, the forward keeps only each block's input and the backward recomputes
    /// one block at a time (DiT: dit.rs; UNet: unet.rs; the hourglass-shaped models:
    /// models/tape.rs): the same
    /// gradients up to summation order, for one more forward of the blocks.
    pub fn loss_and_grads(
        &self,
        x: &Tensor,
        levels: &[Level],
        cond: &Condition,
        (seed, checkpointing): (Option<u64>, bool),
        loss_of: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, GradStore)> {
        let t: Vec<f32> = levels.iter().map(|l| l.t).collect();
        match (&self.net, checkpointing) {
            (Net::Dit(dit), true) => return dit.checkpointed_backward(x, &t, cond, seed, loss_of),
            (Net::Unet(unet), true) => {
                let _lora = LoraDropout::enter(seed);
                let context = self.unet_context(cond, x.device())?;
                return unet.checkpointed_backward(x, &t, &context, loss_of);
            }
            (Net::Mmdit(mmdit), true) => {
                let _lora = LoraDropout::enter(seed);
                let (text, pooled) = self.mmdit_text(cond, x.device())?;
                return mmdit.checkpointed_backward(x, &t, (&text, &pooled), loss_of);
            }
            (Net::Dit(_) | Net::Unet(_) | Net::Mmdit(_), false) => {
                let loss = loss_of(&self.forward_with_dropout(x, levels, cond, seed)?)?;
                let grads = loss.backward()?;
                return Ok((loss, grads));
            }
            (Net::Hourglass(_) | Net::LocalMamba(_), _) => {}
        }
        let mut tape = Tape::new(seed, checkpointing);
        let out = self.record(&mut tape, x, levels, cond)?;
        tape.backward(out, loss_of)
    }

    /// A hourglass-shaped model's forward on `tape`: σ, class rows and age features from the
    /// levels and the condition.
    fn record<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        x: &Tensor,
        levels: &[Level],
        cond: &Condition,
    ) -> Result<Node> {
        let device = x.device();
        let sigma: Vec<f32> = levels.iter().map(|l| l.s as f32).collect();
        let sigma = Tensor::from_vec(sigma, levels.len(), device)?;
        let class = match self.shape.conditioning() {
            Conditioning::None | Conditioning::Caption { .. } => None,
            _ => Some(Tensor::from_slice(&cond.labels, cond.len(), device)?),
        };
        let mapping_cond = match (&self.age_emb, self.shape.conditioning()) {
            (Some(freqs), _) => Some(age_features(&cond.ages, freqs)?),
            (None, Conditioning::Caption { dim }) => Some(caption_rows(cond, dim, device)?),
            (None, _) => None,
        };
        let conditions = (&sigma, class.as_ref(), mapping_cond.as_ref());
        match &self.net {
            Net::Hourglass(h) => h.record(tape, x, conditions),
            Net::LocalMamba(m) => m.record(tape, x, conditions),
            Net::Dit(_) | Net::Unet(_) | Net::Mmdit(_) => {
                candle_core::bail!("a DiT, UNet or MMDiT is not recorded on a tape")
            }
        }
    }
}

/// The pooled caption embeddings of a batch (B, dim) through `mapping_cond_in_proj`, as the
/// reference feeds them: the label's row of `cond.texts`, zeros for the null caption (label 0),
/// in training and sampling alike.
fn caption_rows(cond: &Condition, dim: usize, device: &Device) -> Result<Tensor> {
    let mut rows = vec![0f32; cond.len() * dim];
    for (k, &label) in cond.labels.iter().enumerate() {
        if let (Some(texts), 1..) = (&cond.texts, label) {
            let row = (label as usize - 1) * dim;
            rows[k * dim..(k + 1) * dim].copy_from_slice(&texts[row..row + dim]);
        }
    }
    Tensor::from_vec(rows, (cond.len(), dim), device)
}

/// The trainable parameters of a denoiser of this shape, counted without drawing them.
pub fn count_parameters(shape: &DenoiserShape) -> Result<usize> {
    let mut p = Params::counting();
    Denoiser::new(shape, &mut p, &Device::Cpu)?;
    Ok(p.count())
}
