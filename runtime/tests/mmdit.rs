//! The SD 3.5 MMDiT against diffusers' `SD3Transformer2DModel` (fixtures/mmdit/generate.py: dual
//! attention in two of three blocks, QK RMSNorm, the last block context-pre-only, a non-square
//! grid cropped from the position table): the same weights, loaded by diffusers name from its
//! config.json's shape, give diffusers' output with one timestep per sample, and one backward
//! gives diffusers' gradient for every parameter (q/k projections and their norms included).

use std::path::Path;

use crate::common::{
    assert_checkpointed_equals_plain, assert_gradients_equal_fixture, assert_trains_as_peft,
    lora_spec, max_abs, max_abs_diff, model_from_fixture,
};
use std::collections::HashMap;

use candle_core::{Device, Tensor};
use signal_diffusion_runtime::config::choice::LoraBias;
use signal_diffusion_runtime::config::pretrained::parse_mmdit;
use signal_diffusion_runtime::models::mmdit::{Mmdit, LORA_TARGETS};
use signal_diffusion_runtime::models::nn::Params;
use signal_diffusion_runtime::train::checkpoint::restore;

/// The fixture `file` (under tests/fixtures) loaded into `p`'s tensors by name and the tiny
/// MMDiT of fixtures/mmdit built into `p` run on its inputs: the output, checked within 1e-5 of
/// the fixture's largest value (f32, other summation orders; measured 5.7e-7, the gradients
/// 2.2e-5), and the fixture. Our drawn position table is checked against the saved one first.
fn run(file: &str, p: &mut Params) -> (Tensor, HashMap<String, Tensor>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let config = std::fs::read_to_string(root.join("mmdit/config.json")).unwrap();
    let shape = parse_mmdit(&config, &root.join("mmdit")).unwrap();
    let saved = candle_core::safetensors::load(root.join(file), &Device::Cpu).unwrap();
    let model = Mmdit::new(&shape, p, &Device::Cpu).unwrap();
    let (drawn, table) = (&p.buffers[0].1, &saved["pos_embed.pos_embed"]);
    assert!(max_abs_diff(drawn.as_tensor(), table) < 1e-6);
    for vars in [&p.frozen, &p.trainable, &p.buffers] {
        restore(vars, &saved).unwrap();
    }
    let t: Vec<f32> = saved["timestep"].to_vec1().unwrap();
    let out = model
        .forward(
            &saved["input"],
            &t,
            &saved["encoder_hidden_states"],
            &saved["pooled_projections"],
        )
        .unwrap();
    let err = max_abs_diff(&out, &saved["output"]) / max_abs(&saved["output"]);
    assert!(err < 1e-5, "{file}: output off by {err} of the largest");
    (out, saved)
}

#[test]
fn mmdit_equals_diffusers_forward_and_backward() {
    let mut p = Params::new(0, &Device::Cpu);
    let (out, saved) = run("mmdit/mmdit.safetensors", &mut p);
    // Every gradient, q and k projections' included (a dropped one is off by 100 %).
    assert_gradients_equal_fixture(&out, &saved, &p.trainable, (1e-4, 1e-3));
}

/// LoRA on the image and text attention projections, as diffusers' SD3 LoRA script targets
/// them (fixtures/lora/generate.py), equals PEFT's.
#[test]
fn lora_mmdit_equals_peft() {
    let spec = lora_spec(&LORA_TARGETS, LoraBias::None, 0.0);
    let mut p = Params::with_lora(0, &Device::Cpu, spec);
    let (out, saved) = run("lora/mmdit_lora.safetensors", &mut p);
    assert_trains_as_peft(&p, &out, &saved);
}

/// Targeting every linear layer the build lists for an MMDiT adapts exactly those layers: the
/// build's target check and the model cannot drift apart.
#[test]
fn the_builds_linear_layers_are_the_mmdits() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mmdit");
    let config = std::fs::read_to_string(root.join("config.json")).unwrap();
    let shape = parse_mmdit(&config, &root).unwrap();
    let layers = signal_diffusion_runtime::config::mmdit_linear_layers(&shape);
    let targets: Vec<&str> = layers.iter().map(String::as_str).collect();
    let mut p = Params::with_lora(0, &Device::Cpu, lora_spec(&targets, LoraBias::None, 0.0));
    Mmdit::new(&shape, &mut p, &Device::Cpu).unwrap();
    let adapted: std::collections::BTreeSet<String> = p
        .trainable
        .iter()
        .filter_map(|(n, _)| n.strip_suffix(".lora_A.weight"))
        .map(String::from)
        .collect();
    assert_eq!(adapted, layers.iter().cloned().collect());
}

/// Gradient checkpointing gives the loss and every gradient of the plain backward (the same
/// numbers up to summation order: the conditioning vector's gradient is summed over the blocks
/// in another order), full fine-tune and LoRA (its B set non-zero, so every adapter's gradient is
/// not trivial); q/k projections, their norms, and the last block's text-side layers included.
#[test]
fn checkpointed_gradients_equal_the_plain_backward() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let config = std::fs::read_to_string(root.join("mmdit/config.json")).unwrap();
    let shape = parse_mmdit(&config, &root.join("mmdit")).unwrap();
    let saved =
        candle_core::safetensors::load(root.join("mmdit/mmdit.safetensors"), &Device::Cpu).unwrap();
    for lora in [None, Some(&LORA_TARGETS[..])] {
        let (p, model) = model_from_fixture(lora, &saved, |p| {
            Mmdit::new(&shape, p, &Device::Cpu).unwrap()
        });
        let t: Vec<f32> = saved["timestep"].to_vec1().unwrap();
        let (x, text, pooled, up) = (
            &saved["input"],
            &saved["encoder_hidden_states"],
            &saved["pooled_projections"],
            &saved["upstream"],
        );
        let loss_of = |out: &Tensor| (out * up).unwrap().sum_all();
        let plain_loss = loss_of(&model.forward(x, &t, text, pooled).unwrap()).unwrap();
        let plain = plain_loss.backward().unwrap();
        let (loss, grads) = model
            .checkpointed_backward(x, &t, (text, pooled), loss_of)
            .unwrap();
        let what = format!("lora {}", lora.is_some());
        assert_checkpointed_equals_plain(&p, (&plain_loss, &plain), (&loss, &grads), &what);
    }
}
