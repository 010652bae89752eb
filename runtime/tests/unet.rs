//! The SD 1.5 UNet against diffusers' `UNet2DConditionModel` (fixtures/unet/generate.py: SD
//! 1.5's block types at tiny size, two levels with cross-attention, `layers_per_block` 2): the
//! same weights, loaded by diffusers name from its config.json's shape, give diffusers' output
//! with one timestep per sample, and one backward gives diffusers' gradient for every parameter,
//! the attention projections' included (what a fused softmax or norm without a backward drops).

use std::path::Path;

use crate::common::{
    assert_checkpointed_equals_plain, assert_gradients_equal_fixture, assert_trains_as_peft,
    lora_spec, max_abs, max_abs_diff, model_from_fixture,
};
use std::collections::HashMap;

use candle_core::{Device, Tensor};
use signal_diffusion_runtime::config::choice::LoraBias;
use signal_diffusion_runtime::config::pretrained::parse_unet;
use signal_diffusion_runtime::models::nn::Params;
use signal_diffusion_runtime::models::unet::{Unet, LORA_TARGETS};
use signal_diffusion_runtime::train::checkpoint::restore;

/// The fixture `file` (under tests/fixtures) loaded into `p`'s tensors by name and the tiny
/// UNet of fixtures/unet built into `p` run on its inputs: the output, checked within 1e-5 of
/// the fixture's largest value (f32, other summation orders through 17 ResNets and 7
/// transformers; measured 9.3e-7, the gradients 7.8e-6), and the fixture.
fn run(file: &str, p: &mut Params) -> (Tensor, HashMap<String, Tensor>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let config = std::fs::read_to_string(root.join("unet/config.json")).unwrap();
    let shape = parse_unet(&config, &root.join("unet")).unwrap();
    let saved = candle_core::safetensors::load(root.join(file), &Device::Cpu).unwrap();
    let model = Unet::new(&shape, p).unwrap();
    for vars in [&p.frozen, &p.trainable] {
        restore(vars, &saved).unwrap();
    }
    let t: Vec<f32> = saved["timestep"].to_vec1().unwrap();
    let out = model
        .forward(&saved["input"], &t, &saved["encoder_hidden_states"])
        .unwrap();
    let err = max_abs_diff(&out, &saved["output"]) / max_abs(&saved["output"]);
    assert!(err < 1e-5, "{file}: output off by {err} of the largest");
    (out, saved)
}

#[test]
fn unet_equals_diffusers_forward_and_backward() {
    let mut p = Params::new(0, &Device::Cpu);
    let (out, saved) = run("unet/unet.safetensors", &mut p);
    // Every gradient, q and k projections' included (a dropped one is off by 100 %).
    assert_gradients_equal_fixture(&out, &saved, &p.trainable, (1e-4, 1e-3));
}

/// LoRA on every self- and cross-attention projection (fixtures/lora/generate.py) equals PEFT's.
#[test]
fn lora_unet_equals_peft() {
    let spec = lora_spec(&LORA_TARGETS, LoraBias::None, 0.0);
    let mut p = Params::with_lora(0, &Device::Cpu, spec);
    let (out, saved) = run("lora/unet_lora.safetensors", &mut p);
    assert_trains_as_peft(&p, &out, &saved);
}

/// Targeting every linear layer the build lists for a UNet adapts exactly those layers, with 1×1
/// convolutions for `proj_in`/`proj_out` (SD 1.5's) and with linear ones (SD 2's): the build's
/// target check and the model cannot drift apart.
#[test]
fn the_builds_linear_layers_are_the_unets() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unet");
    let config = std::fs::read_to_string(root.join("config.json")).unwrap();
    for linear_projection in [false, true] {
        let mut json: serde_json::Value = serde_json::from_str(&config).unwrap();
        json["use_linear_projection"] = linear_projection.into();
        let shape = parse_unet(&json.to_string(), &root).unwrap();
        let layers = signal_diffusion_runtime::config::unet_linear_layers(&shape);
        let targets: Vec<&str> = layers.iter().map(String::as_str).collect();
        let mut p = Params::with_lora(0, &Device::Cpu, lora_spec(&targets, LoraBias::None, 0.0));
        Unet::new(&shape, &mut p).unwrap();
        let adapted: std::collections::BTreeSet<String> = p
            .trainable
            .iter()
            .filter_map(|(n, _)| n.strip_suffix(".lora_A.weight"))
            .map(String::from)
            .collect();
        assert_eq!(adapted, layers.iter().cloned().collect());
        assert_eq!(
            layers.iter().any(|l| l.ends_with("proj_in")),
            linear_projection
        );
    }
}

/// A model built on `Params::sharing` computes with the source's storage (its output is the
/// source model's, and follows a later load) but records no autograd graph: no gradient reaches
/// a parameter through it.
#[test]
fn a_sharing_twin_computes_the_same_without_a_graph() {
    let mut p = Params::new(0, &Device::Cpu);
    let (out, saved) = run("unet/unet.safetensors", &mut p);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let config = std::fs::read_to_string(root.join("unet/config.json")).unwrap();
    let shape = parse_unet(&config, &root.join("unet")).unwrap();
    let twin = Unet::new(&shape, &mut Params::sharing(&p)).unwrap();
    let t: Vec<f32> = saved["timestep"].to_vec1().unwrap();
    let forward = |m: &Unet| {
        m.forward(&saved["input"], &t, &saved["encoder_hidden_states"])
            .unwrap()
    };
    let twin_out = forward(&twin);
    assert_eq!(max_abs_diff(&out, &twin_out), 0.0);
    let grads = twin_out.sum_all().unwrap().backward().unwrap();
    assert!(p.trainable.iter().all(|(_, v)| grads.get(v).is_none()));
    // A later load is seen through the shared storage.
    let (name, conv_out) = p
        .trainable
        .iter()
        .find(|(n, _)| n == "conv_out.bias")
        .unwrap();
    conv_out
        .set(&(conv_out.as_tensor() + 1.0).unwrap())
        .unwrap();
    let shifted = (forward(&twin) - &twin_out).unwrap();
    let mean: f32 = shifted.mean_all().unwrap().to_scalar().unwrap();
    assert!((mean - 1.0).abs() < 1e-5, "{name}: shifted by {mean}");
}

/// Gradient checkpointing gives the loss and every gradient of the plain backward (the same
/// numbers up to summation order: the skips' gradients are summed in another order), full
/// fine-tune and LoRA (its B set non-zero, so every adapter's gradient is not trivial).
#[test]
fn checkpointed_gradients_equal_the_plain_backward() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let config = std::fs::read_to_string(root.join("unet/config.json")).unwrap();
    let shape = parse_unet(&config, &root.join("unet")).unwrap();
    let saved =
        candle_core::safetensors::load(root.join("unet/unet.safetensors"), &Device::Cpu).unwrap();
    for lora in [None, Some(&LORA_TARGETS[..])] {
        let (p, model) = model_from_fixture(lora, &saved, |p| Unet::new(&shape, p).unwrap());
        let t: Vec<f32> = saved["timestep"].to_vec1().unwrap();
        let (x, ctx, up) = (
            &saved["input"],
            &saved["encoder_hidden_states"],
            &saved["upstream"],
        );
        let loss_of = |out: &Tensor| (out * up).unwrap().sum_all();
        let plain_loss = loss_of(&model.forward(x, &t, ctx).unwrap()).unwrap();
        let plain = plain_loss.backward().unwrap();
        let (loss, grads) = model.checkpointed_backward(x, &t, ctx, loss_of).unwrap();
        let what = format!("lora {}", lora.is_some());
        assert_checkpointed_equals_plain(&p, (&plain_loss, &plain), (&loss, &grads), &what);
    }
}
