//! The SD 1.5 UNet against diffusers' `UNet2DConditionModel` (fixtures/unet/generate.py: SD
//! 1.5's block types at tiny size, two levels with cross-attention, `layers_per_block` 2): the
//! same weights, loaded by diffusers name from its config.json's shape, give diffusers' output
//! with one timestep per sample, and one backward gives diffusers' gradient for every parameter,
//! the attention projections' included (what a fused softmax or norm without a backward drops).

use std::collections::BTreeSet;
use std::path::Path;

use crate::common::{max_abs, max_abs_diff};
use candle_core::Device;
use signal_diffusion_runtime::config::pretrained::parse_unet;
use signal_diffusion_runtime::models::nn::Params;
use signal_diffusion_runtime::models::unet::Unet;
use signal_diffusion_runtime::train::checkpoint::restore;

#[test]
fn unet_equals_diffusers_forward_and_backward() {
    let dev = Device::Cpu;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unet");
    let shape = parse_unet(
        &std::fs::read_to_string(dir.join("config.json")).unwrap(),
        &dir,
    )
    .unwrap();
    let saved = candle_core::safetensors::load(dir.join("unet.safetensors"), &dev).unwrap();
    let mut p = Params::new(0, &dev);
    let model = Unet::new(&shape, &mut p).unwrap();
    let ours: BTreeSet<&str> = p.trainable.iter().map(|(n, _)| n.as_str()).collect();
    let theirs: BTreeSet<&str> = saved
        .keys()
        .filter_map(|k| k.strip_prefix("grad."))
        .collect();
    assert_eq!(ours, theirs);
    restore(&p.trainable, &saved).unwrap();
    let t: Vec<f32> = saved["timestep"].to_vec1().unwrap();
    let out = model
        .forward(&saved["input"], &t, &saved["encoder_hidden_states"])
        .unwrap();
    // f32 with other summation orders through 17 ResNets and 7 transformers (measured 9.3e-7;
    // the gradients 7.8e-6).
    let err = max_abs_diff(&out, &saved["output"]) / max_abs(&saved["output"]);
    assert!(
        err < 1e-5,
        "output: max |ours - diffusers| = {err} of the largest"
    );
    let grads = (&out * &saved["upstream"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in &p.trainable {
        let want = &saved[&format!("grad.{name}")];
        let got = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let rel = max_abs_diff(got, want) / max_abs(want).max(1e-3);
        assert!(rel < 1e-4, "{name}: gradient off by {rel} relative");
        if name.ends_with("to_q.weight") || name.ends_with("to_k.weight") {
            assert!(max_abs(got) > 1e-6, "{name}: a zero gradient");
        }
    }
}
