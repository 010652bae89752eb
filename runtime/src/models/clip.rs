//! A frozen CLIP text encoder and its tokenizer, as transformers' `CLIPTextModel` /
//! `CLIPTextModelWithProjection` and `CLIPTokenizer` compute them: captions to token ids, ids
//! to the last hidden states and the pooled embedding (the end-of-text token's state, through
//! `text_projection` when the model has one). Loaded from the transformers layout
//! (`text_encoder/config.json` + `model.safetensors`, `tokenizer/vocab.json` + `merges.txt`).
//!
//! The tokenizer: whitespace runs become one space and the text is lowercased; it is split into
//! the special tokens, the contractions 's 't 're 've 'm 'll 'd, runs of letters, single digits
//! and runs of other non-space characters (CLIP's pattern); each piece's UTF-8 bytes are mapped
//! to GPT-2's printable characters, its last one marked `</w>`, and merged by the merge list's
//! ranks; the ids are framed by start and end of text and padded with the pad token to the
//! model's context (77), as the Stable Diffusion pipelines tokenise. Unicode normalisation (NFC)
//! is left out: text that is already composed (what keyboards type) is unchanged by it.
//!
//! The encoder: token plus position embeddings; per layer x + attention(LN(x)) under a causal
//! mask, then x + MLP(LN(x)) with quick-GELU (CLIP-L) or GELU (CLIP-G); a final LayerNorm.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use signal_diffusion_config::pretrained::ClipText;

use crate::ops::norm::standardize_last;

const START: &str = "<|startoftext|>";
const END: &str = "<|endoftext|>";

pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    /// GPT-2's map of bytes to printable characters.
    byte_chars: [char; 256],
    start: u32,
    end: u32,
    pad: u32,
    /// The pad token's text when it is a token of its own (SD 3's second tokenizer pads with
    /// "!"): transformers splits every occurrence out of a caption before BPE, as a special token.
    pad_text: Option<String>,
    /// Ids per caption, padded (the model's positions).
    context: usize,
}

impl ClipTokenizer {
    /// The tokenizer of `dir` (`vocab.json`, `merges.txt`; the pad token from
    /// `special_tokens_map.json` when it names one, else end of text) for `context` positions.
    pub fn load(dir: &Path, context: usize) -> Result<Self> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).with_context(|| {
                format!(
                    "cannot read {} (a CLIP tokenizer)",
                    dir.join(name).display()
                )
            })
        };
        let vocab: HashMap<String, u32> = serde_json::from_str(&read("vocab.json")?)
            .with_context(|| format!("{}: not a vocabulary", dir.join("vocab.json").display()))?;
        let ranks = read("merges.txt")?
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .enumerate()
            .map(|(rank, line)| {
                let (a, b) = line.split_once(' ').with_context(|| {
                    format!(
                        "{}: merge `{line}` is not two symbols",
                        dir.join("merges.txt").display()
                    )
                })?;
                Ok(((a.to_string(), b.to_string()), rank))
            })
            .collect::<Result<_>>()?;
        let pad_name = std::fs::read_to_string(dir.join("special_tokens_map.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| match &v["pad_token"] {
                serde_json::Value::String(s) => Some(s.clone()),
                other => other["content"].as_str().map(String::from),
            })
            .unwrap_or_else(|| END.to_string());
        let id = |token: &str| {
            vocab.get(token).copied().with_context(|| {
                format!(
                    "{}: no `{token}` in the vocabulary",
                    dir.join("vocab.json").display()
                )
            })
        };
        Ok(ClipTokenizer {
            start: id(START)?,
            end: id(END)?,
            pad: id(&pad_name)?,
            pad_text: (pad_name != START && pad_name != END).then_some(pad_name),
            vocab,
            ranks,
            byte_chars: byte_chars(),
            context,
        })
    }

    /// `text` as `context` ids: start, the text's tokens (cut to fit), end, then padding.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let normalised = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase();
        let mut ids = vec![self.start];
        let segments: Vec<&str> = match &self.pad_text {
            Some(pad) => normalised.split(pad.as_str()).collect(),
            None => vec![&normalised],
        };
        for (i, segment) in segments.iter().enumerate() {
            if i > 0 {
                ids.push(self.pad);
            }
            for piece in pieces(segment) {
                match piece {
                    START => ids.push(self.start),
                    END => ids.push(self.end),
                    word => {
                        let chars: String =
                            word.bytes().map(|b| self.byte_chars[b as usize]).collect();
                        ids.extend(
                            self.bpe(&chars)
                                .iter()
                                .map(|s| self.vocab.get(s).copied().unwrap_or(self.end)),
                        );
                    }
                }
            }
        }
        ids.truncate(self.context - 1);
        ids.push(self.end);
        ids.resize(self.context, self.pad);
        ids
    }

    /// The word's symbols after every merge: its characters, the last marked `</w>`, the pair of
    /// lowest rank merged everywhere until no pair has a rank.
    fn bpe(&self, word: &str) -> Vec<String> {
        let mut symbols: Vec<String> = word.chars().map(String::from).collect();
        if let Some(last) = symbols.last_mut() {
            last.push_str("</w>");
        }
        loop {
            let best = symbols
                .windows(2)
                .filter_map(|p| {
                    self.ranks
                        .get(&(p[0].clone(), p[1].clone()))
                        .map(|&r| (r, p))
                })
                .min_by_key(|(r, _)| *r)
                .map(|(_, p)| (p[0].clone(), p[1].clone()));
            let Some((a, b)) = best else {
                return symbols;
            };
            let mut merged = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == a && symbols[i + 1] == b {
                    merged.push(format!("{a}{b}"));
                    i += 2;
                } else {
                    merged.push(std::mem::take(&mut symbols[i]));
                    i += 1;
                }
            }
            symbols = merged;
        }
    }
}

/// CLIP's pre-tokenisation of normalised text: the special tokens, 's 't 're 've 'm 'll 'd,
/// letter runs, single digits, and runs of other non-space characters; spaces dropped.
fn pieces(text: &str) -> Vec<&str> {
    let letter = |c: char| c.is_alphabetic() && !c.is_numeric();
    let other = |c: char| !c.is_whitespace() && !c.is_alphabetic() && !c.is_numeric();
    let mut out = vec![];
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let len = if let Some(special) = [START, END].into_iter().find(|s| rest.starts_with(s)) {
            special.len()
        } else if let Some(n) = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
            .iter()
            .find(|s| rest.starts_with(*s))
            .map(|s| s.len())
        {
            n
        } else if letter(c) {
            rest.find(|c: char| !letter(c)).unwrap_or(rest.len())
        } else if c.is_numeric() {
            c.len_utf8()
        } else if other(c) {
            rest.find(|c: char| !other(c)).unwrap_or(rest.len())
        } else {
            rest = &rest[c.len_utf8()..]; // whitespace
            continue;
        };
        out.push(&rest[..len]);
        rest = &rest[len..];
    }
    out
}

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes map to themselves, the rest to 256 + n.
fn byte_chars() -> [char; 256] {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut out = ['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        out[b as usize] = if printable(b) {
            char::from_u32(b).expect("Latin-1")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("Latin Extended")
        };
    }
    out
}

struct Linear {
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.broadcast_matmul(&self.weight_t)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(standardize_last(x, self.eps)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }
}

struct Layer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct ClipTextEncoder {
    pub config: ClipText,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    projection: Option<Linear>,
}

/// What the encoder gives for a batch of captions.
pub struct TextEmbedding {
    /// (B, context, hidden): the last hidden states, after the final LayerNorm.
    pub sequence: Tensor,
    /// (B, pooled_dim): the end-of-text token's state, projected when the model projects.
    pub pooled: Tensor,
    /// (B, context, hidden): the states entering the last layer (transformers'
    /// `hidden_states[-2]`, what Stable Diffusion 3 reads).
    pub penultimate: Tensor,
}

impl ClipTextEncoder {
    /// The encoder `cfg` describes, from `model.safetensors` beside its config.json.
    pub fn load(cfg: &ClipText, device: &Device) -> Result<Self> {
        let file = cfg.dir.join("model.safetensors");
        let map = candle_core::safetensors::load(&file, device).with_context(|| {
            format!(
                "cannot read {} (the text encoder's weights)",
                file.display()
            )
        })?;
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = map.get(name).with_context(|| {
                format!("{}: no tensor `{name}` (is this the CLIP text encoder its config.json describes?)", file.display())
            })?;
            if t.dims() != shape {
                bail!(
                    "{}: `{name}` has shape {:?}, the config.json gives {shape:?}",
                    file.display(),
                    t.dims()
                );
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let linear = |name: &str, din: usize, dout: usize, bias: bool| -> Result<Linear> {
            Ok(Linear {
                weight_t: get(&format!("{name}.weight"), &[dout, din])?
                    .t()?
                    .contiguous()?,
                bias: bias
                    .then(|| get(&format!("{name}.bias"), &[dout]))
                    .transpose()?,
            })
        };
        let norm = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: get(&format!("{name}.weight"), &[h])?,
                bias: get(&format!("{name}.bias"), &[h])?,
                eps: cfg.layer_norm_eps,
            })
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("text_model.encoder.layers.{i}");
                Ok(Layer {
                    norm1: norm(&format!("{p}.layer_norm1"))?,
                    q: linear(&format!("{p}.self_attn.q_proj"), h, h, true)?,
                    k: linear(&format!("{p}.self_attn.k_proj"), h, h, true)?,
                    v: linear(&format!("{p}.self_attn.v_proj"), h, h, true)?,
                    out: linear(&format!("{p}.self_attn.out_proj"), h, h, true)?,
                    norm2: norm(&format!("{p}.layer_norm2"))?,
                    fc1: linear(&format!("{p}.mlp.fc1"), h, f, true)?,
                    fc2: linear(&format!("{p}.mlp.fc2"), f, h, true)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(ClipTextEncoder {
            token_embedding: get(
                "text_model.embeddings.token_embedding.weight",
                &[cfg.vocab_size, h],
            )?,
            position_embedding: get(
                "text_model.embeddings.position_embedding.weight",
                &[cfg.max_position_embeddings, h],
            )?,
            layers,
            final_norm: norm("text_model.final_layer_norm")?,
            projection: cfg
                .projection_dim
                .map(|p| linear("text_projection", h, p, false))
                .transpose()?,
            config: cfg.clone(),
        })
    }

    /// The embeddings of a batch of id rows (each as long, at most the model's positions).
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<TextEmbedding> {
        let (b, l) = (ids.len(), ids.first().map_or(0, Vec::len));
        let (h, heads) = (self.config.hidden_size, self.config.num_attention_heads);
        let d = h / heads;
        let device = self.token_embedding.device();
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let tokens = Tensor::from_vec(flat, b * l, device)?;
        let mut x = self
            .token_embedding
            .index_select(&tokens, 0)?
            .reshape((b, l, h))?
            .broadcast_add(&self.position_embedding.narrow(0, 0, l)?)?;
        // Position j may attend to positions up to j.
        let mask: Vec<f32> = (0..l * l)
            .map(|k| {
                if k % l > k / l {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, l, l), device)?;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous()?)
        };
        let mut penultimate = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = x.clone();
            }
            let n = layer.norm1.forward(&x)?;
            let q = split((layer.q.forward(&n)? * (d as f64).powf(-0.5))?)?;
            let (k, v) = (split(layer.k.forward(&n)?)?, split(layer.v.forward(&n)?)?);
            let scores = q.matmul(&k.t()?)?.broadcast_add(&mask)?;
            let a = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
            let a = a.transpose(1, 2)?.reshape((b, l, h))?;
            x = (x + layer.out.forward(&a)?)?;
            let n = layer.norm2.forward(&x)?;
            let m = layer.fc1.forward(&n)?;
            let m = match self.config.hidden_act.as_str() {
                "gelu" => m.gelu_erf()?,
                _ => (&m * candle_nn::ops::sigmoid(&(&m * 1.702)?)?)?,
            };
            x = (x + layer.fc2.forward(&m)?)?;
        }
        let sequence = self.final_norm.forward(&x)?;
        let rows = ids
            .iter()
            .enumerate()
            .map(|(i, row)| sequence.i((i, self.pooled_position(row)))?.unsqueeze(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut pooled = Tensor::cat(&rows, 0)?;
        if let Some(p) = &self.projection {
            pooled = p.forward(&pooled)?;
        }
        Ok(TextEmbedding {
            sequence,
            pooled,
            penultimate,
        })
    }

    /// The end-of-text token's position: its first occurrence; with the legacy id 2 (the
    /// original CLIP configs), the highest id's first position, as transformers reads them.
    fn pooled_position(&self, ids: &[u32]) -> usize {
        let eos = self.config.eos_token_id as u32;
        match eos {
            2 => {
                let max = ids.iter().copied().max().unwrap_or(0);
                ids.iter().position(|&t| t == max).unwrap_or(0)
            }
            _ => ids.iter().position(|&t| t == eos).unwrap_or(ids.len() - 1),
        }
    }
}

/// A text encoder with its tokenizer: captions to pooled embeddings, what caption conditioning
/// feeds the denoiser.
pub struct Captioner {
    tokenizer: ClipTokenizer,
    encoder: ClipTextEncoder,
}

impl Captioner {
    pub fn load(cfg: &ClipText, device: &Device) -> Result<Self> {
        Ok(Captioner {
            tokenizer: ClipTokenizer::load(&cfg.tokenizer_dir, cfg.max_position_embeddings)?,
            encoder: ClipTextEncoder::load(cfg, device)?,
        })
    }

    /// The embeddings of a batch of `texts`.
    pub fn encode(&self, texts: &[String]) -> Result<TextEmbedding> {
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| self.tokenizer.encode(t)).collect();
        self.encoder.forward(&ids)
    }

    /// The pooled embeddings of `texts`, row-major (one row of `pooled_dim` per text).
    pub fn pooled(&self, texts: &[String]) -> Result<Vec<f32>> {
        self.rows(texts, |e| &e.pooled)
    }

    /// The last hidden states of `texts` (what a Stable Diffusion 1.5 UNet attends to),
    /// row-major: one row of context × hidden values per text.
    pub fn states(&self, texts: &[String]) -> Result<Vec<f32>> {
        self.rows(texts, |e| &e.sequence)
    }

    /// `part` of the embeddings of `texts`, flattened, encoded 32 at a time.
    fn rows(&self, texts: &[String], part: impl Fn(&TextEmbedding) -> &Tensor) -> Result<Vec<f32>> {
        let mut out = vec![];
        for chunk in texts.chunks(32) {
            out.extend(part(&self.encode(chunk)?).flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}

/// Stable Diffusion 3's text conditioning without T5, as diffusers' `StableDiffusion3Pipeline`
/// builds it when `text_encoder_3` is absent: the two CLIP encoders' states entering their last
/// layers side by side (CLIP-L's 768 ‖ CLIP-G's 1280), zero-padded to the transformer's joint
/// width, then `t5_tokens` zero tokens where T5's would be (`sd3_sequence`); and their pooled
/// embeddings side by side (768 ‖ 1280 = 2048). The reference feeds an all-zero sequence
/// instead: fixed here.
pub struct Sd3Text {
    l: Captioner,
    g: Captioner,
    joint: usize,
    t5_tokens: usize,
}

/// SD 3's token sequence and pooled vector for a batch of captions.
pub struct Sd3Embedding {
    /// (B, context + t5_tokens, joint).
    pub tokens: Tensor,
    /// (B, pooled L + pooled G).
    pub pooled: Tensor,
}

/// SD 3's token sequence from the CLIP states (B, context, L ‖ G): zero-padded to `joint` wide,
/// then `t5_tokens` zero tokens.
pub fn sd3_sequence(clip: &Tensor, joint: usize, t5_tokens: usize) -> candle_core::Result<Tensor> {
    let (b, _, width) = clip.dims3()?;
    let clip = clip.pad_with_zeros(2, 0, joint - width)?;
    let t5 = Tensor::zeros((b, t5_tokens, joint), clip.dtype(), clip.device())?;
    Tensor::cat(&[&clip, &t5], 1)
}

impl Sd3Text {
    pub fn load(
        (l, g): (&ClipText, &ClipText),
        joint: usize,
        t5_tokens: usize,
        device: &Device,
    ) -> Result<Self> {
        let width = l.hidden_size + g.hidden_size;
        if width > joint {
            bail!(
                "the two text encoders' states are {} + {} = {width} wide, more than the transformer's joint_attention_dim ({joint})",
                l.hidden_size,
                g.hidden_size
            );
        }
        Ok(Sd3Text {
            l: Captioner::load(l, device)?,
            g: Captioner::load(g, device)?,
            joint,
            t5_tokens,
        })
    }

    /// The CLIP states side by side (B, context, L ‖ G) and the pooled vectors (B, L ‖ G).
    fn encode(&self, texts: &[String]) -> Result<(Tensor, Tensor)> {
        let (l, g) = (self.l.encode(texts)?, self.g.encode(texts)?);
        Ok((
            Tensor::cat(&[&l.penultimate, &g.penultimate], 2)?,
            Tensor::cat(&[&l.pooled, &g.pooled], 1)?,
        ))
    }

    pub fn embed(&self, texts: &[String]) -> Result<Sd3Embedding> {
        let (clip, pooled) = self.encode(texts)?;
        Ok(Sd3Embedding {
            tokens: sd3_sequence(&clip, self.joint, self.t5_tokens)?,
            pooled,
        })
    }

    /// Each caption's row as the denoiser keeps it (`Denoiser::caption_width` values): its CLIP
    /// states (context × (L ‖ G)), then its pooled vector; the padding and T5's zeros are added
    /// per batch, not stored.
    pub fn rows(&self, texts: &[String]) -> Result<Vec<f32>> {
        let mut out = vec![];
        for chunk in texts.chunks(32) {
            let (clip, pooled) = self.encode(chunk)?;
            let row = Tensor::cat(&[&clip.flatten_from(1)?, &pooled], 1)?;
            out.extend(row.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}

/// What a denoiser reads of each caption (`DenoiserShape::caption_input`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptionInput {
    /// The pooled embedding (DiT, hourglass, LocalMamba).
    Pooled,
    /// The last hidden states (SD 1.5's UNet).
    States,
    /// CLIP-L's and CLIP-G's penultimate states and pooled vectors (SD 3.5's MMDiT).
    Sd3,
}

/// A run's frozen caption encoders, giving each caption's row as its denoiser reads it.
pub enum CaptionEncoder {
    Pooled(Captioner),
    States(Captioner),
    Sd3(Box<Sd3Text>),
}

impl CaptionEncoder {
    /// The encoder `input` needs: for SD 3 `second` (CLIP-G) beside `first`, `joint` wide.
    pub fn load(
        input: CaptionInput,
        (first, second): (&ClipText, Option<&ClipText>),
        joint: usize,
        device: &Device,
    ) -> Result<Self> {
        Ok(match (input, second) {
            (CaptionInput::Sd3, Some(g)) => CaptionEncoder::Sd3(Box::new(Sd3Text::load(
                (first, g),
                joint,
                signal_diffusion_config::pretrained::SD3_T5_TOKENS,
                device,
            )?)),
            (CaptionInput::Sd3, None) => {
                bail!("Stable Diffusion 3 needs its second text encoder (text_encoder_2)")
            }
            (CaptionInput::States, _) => CaptionEncoder::States(Captioner::load(first, device)?),
            (CaptionInput::Pooled, _) => CaptionEncoder::Pooled(Captioner::load(first, device)?),
        })
    }

    /// The rows of `texts`, row-major, one per text.
    pub fn rows(&self, texts: &[String]) -> Result<Vec<f32>> {
        match self {
            CaptionEncoder::Pooled(c) => c.pooled(texts),
            CaptionEncoder::States(c) => c.states(texts),
            CaptionEncoder::Sd3(t) => t.rows(texts),
        }
    }
}
