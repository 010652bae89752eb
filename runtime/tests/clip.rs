//! Our CLIP tokenizer and text encoder against transformers' (fixtures/clip/generate.py): the
//! same ids for captions with punctuation, digits, contractions, repeated spaces, an empty
//! caption and one too long for the 77 positions; the same last hidden states and pooled
//! (projected) embeddings within 1e-5 (f32).

use std::path::Path;

use candle_core::{Device, Tensor};
use signal_diffusion_runtime::config::pretrained::parse_clip_text;
use signal_diffusion_runtime::models::clip::{ClipTextEncoder, ClipTokenizer, Sd3Text};

use crate::common::max_abs_diff;

#[test]
fn tokens_and_embeddings_equal_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip");
    let captions: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("captions.json")).unwrap()).unwrap();
    let expected =
        candle_core::safetensors::load(dir.join("tiny.expected.safetensors"), &Device::Cpu)
            .unwrap();
    let encoder_dir = dir.join("tiny/text_encoder");
    let text = std::fs::read_to_string(encoder_dir.join("config.json")).unwrap();
    let cfg = parse_clip_text(&text, &encoder_dir, &dir.join("tiny/tokenizer")).unwrap();
    assert_eq!(cfg.pooled_dim(), 24);
    let tokenizer = ClipTokenizer::load(&cfg.tokenizer_dir, cfg.max_position_embeddings).unwrap();
    let encoder = ClipTextEncoder::load(&cfg, &Device::Cpu).unwrap();
    let ids: Vec<Vec<u32>> = captions.iter().map(|c| tokenizer.encode(c)).collect();
    for (k, row) in ids.iter().enumerate() {
        let want: Vec<u32> = expected[&format!("ids.{k}")]
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&i| i as u32)
            .collect();
        assert_eq!(row, &want, "caption {k}: {:?}", captions[k]);
    }
    let out = encoder.forward(&ids).unwrap();
    for k in 0..captions.len() {
        let hidden = out.sequence.get(k).unwrap();
        let pooled = out.pooled.get(k).unwrap();
        for (what, ours, theirs) in [
            ("hidden", &hidden, &expected[&format!("hidden.{k}")]),
            ("pooled", &pooled, &expected[&format!("pooled.{k}")]),
        ] {
            let d = max_abs_diff(ours, theirs);
            assert!(
                d < 1e-5,
                "caption {k} {what}: max |ours − transformers| = {d}"
            );
        }
    }
    // The captions give different pooled embeddings (the fixture is not degenerate).
    let p: Vec<Tensor> = (0..2).map(|k| out.pooled.get(k).unwrap()).collect();
    assert!(max_abs_diff(&p[0], &p[1]) > 1e-2);
}

/// CLIP ViT-L/14's own 49,408-token vocabulary (the fake hub's `tokenizer/`, written from
/// OpenAI's published BPE file by tests/fixtures/hub/write_clip_tokenizer.py): the same ids as
/// transformers' `CLIPTokenizer` for the meta-dataset's captions, punctuation, accents, CJK and
/// a caption longer than the 77 positions.
#[test]
fn clip_l_vocabulary_tokenises_as_transformers() {
    let hub = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hub");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hub.join("clip-l.expected.json")).unwrap())
            .unwrap();
    let snapshot = hub.join(
        "models--stabilityai--stable-diffusion-3.5-medium/snapshots/b940f670f0eda2d07fbb75229e779da1ad11eb80",
    );
    let tokenizer = ClipTokenizer::load(&snapshot.join("tokenizer"), 77).unwrap();
    let captions = expected["captions"].as_array().unwrap();
    assert_eq!(captions.len(), 7);
    for (caption, want) in captions.iter().zip(expected["ids"].as_array().unwrap()) {
        let caption = caption.as_str().unwrap();
        let want: Vec<u32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tokenizer.encode(caption), want, "{caption:?}");
    }
}

/// Stable Diffusion 3's text conditioning without T5 (fixtures/sd3_text/generate.py): the tiny
/// CLIP above in CLIP-L's place and a second one (3 layers, gelu, padded with "!") in CLIP-G's
/// give what diffusers' `StableDiffusion3Pipeline.encode_prompt` gives with `text_encoder_3 =
/// None`: both encoders' penultimate states side by side, zero-padded to the joint width, then
/// zero T5 tokens; the pooled embeddings side by side. Within 1e-5 (f32). One caption ends in
/// "!", which the second tokenizer (pad token "!") splits out as a special token, as
/// transformers does.
#[test]
fn sd3_text_conditioning_equals_diffusers_without_t5() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let clip = |encoder: std::path::PathBuf, tokenizer: std::path::PathBuf| {
        let text = std::fs::read_to_string(encoder.join("config.json")).unwrap();
        parse_clip_text(&text, &encoder, &tokenizer).unwrap()
    };
    let l = clip(
        root.join("clip/tiny/text_encoder"),
        root.join("clip/tiny/tokenizer"),
    );
    let g = clip(
        root.join("sd3_text/text_encoder_2"),
        root.join("sd3_text/tokenizer_2"),
    );
    let text = Sd3Text::load((&l, &g), 96, 8, &Device::Cpu).unwrap();
    let captions: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(root.join("clip/captions.json")).unwrap())
            .unwrap();
    let expected =
        candle_core::safetensors::load(root.join("sd3_text/expected.safetensors"), &Device::Cpu)
            .unwrap();
    let ours = text.embed(&captions).unwrap();
    for (what, ours, theirs) in [
        ("tokens", &ours.tokens, &expected["prompt_embeds"]),
        ("pooled", &ours.pooled, &expected["pooled_prompt_embeds"]),
    ] {
        assert_eq!(ours.dims(), theirs.dims(), "{what}");
        let d = max_abs_diff(ours, theirs);
        assert!(d < 1e-5, "{what}: max |ours − diffusers| = {d}");
    }
}
