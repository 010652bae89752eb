//! The SD 1.5 UNet against diffusers' `UNet2DConditionModel` (fixtures/unet/generate.py: SD
//! 1.5's block types at tiny size, two levels with cross-attention, `layers_per_block` 2): the
//! same weights, loaded by diffusers name from its config.json's shape, give diffusers' output
//! with one timestep per sample, and one backward gives diffusers' gradient for every parameter,
//! the attention projections' included (what a fused softmax or norm without a backward drops).

use std::path::Path;

use crate::common::{
    assert_gradients_equal_fixture, assert_trains_as_peft, lora_spec, max_abs, max_abs_diff,
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
