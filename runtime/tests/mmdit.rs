//! The SD 3.5 MMDiT against diffusers' `SD3Transformer2DModel` (fixtures/mmdit/generate.py: dual
//! attention in two of three blocks, QK RMSNorm, the last block context-pre-only, a non-square
//! grid cropped from the position table): the same weights, loaded by diffusers name from its
//! config.json's shape, give diffusers' output with one timestep per sample, and one backward
//! gives diffusers' gradient for every parameter (q/k projections and their norms included).

use std::collections::BTreeSet;
use std::path::Path;

use crate::common::{max_abs, max_abs_diff};
use candle_core::Device;
use signal_diffusion_runtime::config::pretrained::parse_mmdit;
use signal_diffusion_runtime::models::mmdit::Mmdit;
use signal_diffusion_runtime::models::nn::Params;
use signal_diffusion_runtime::train::checkpoint::restore;

#[test]
fn mmdit_equals_diffusers_forward_and_backward() {
    let dev = Device::Cpu;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mmdit");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let shape = parse_mmdit(&config, &dir).unwrap();
    let saved = candle_core::safetensors::load(dir.join("mmdit.safetensors"), &dev).unwrap();
    let mut p = Params::new(0, &dev);
    let model = Mmdit::new(&shape, &mut p, &dev).unwrap();
    let ours: BTreeSet<&str> = p.trainable.iter().map(|(n, _)| n.as_str()).collect();
    let theirs: BTreeSet<&str> = saved
        .keys()
        .filter_map(|k| k.strip_prefix("grad."))
        .collect();
    assert_eq!(ours, theirs);
    // Our drawn position table is diffusers' (saved with its weights).
    let (drawn, table) = (&p.buffers[0].1, &saved["pos_embed.pos_embed"]);
    assert!(max_abs_diff(drawn.as_tensor(), table) < 1e-6);
    restore(&p.trainable, &saved).unwrap();
    restore(&p.buffers, &saved).unwrap();
    let t: Vec<f32> = saved["timestep"].to_vec1().unwrap();
    let out = model
        .forward(
            &saved["input"],
            &t,
            &saved["encoder_hidden_states"],
            &saved["pooled_projections"],
        )
        .unwrap();
    // f32, other summation orders (measured 5.7e-7 of the largest value; gradients 2.2e-5).
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
        // The last block's text queries reach nothing (its text output is dropped): zero there.
        let Some(got) = grads.get(var) else {
            assert_eq!(max_abs(want), 0.0, "{name}: no gradient");
            continue;
        };
        let rel = max_abs_diff(got, want) / max_abs(want).max(1e-3);
        assert!(rel < 1e-4, "{name}: gradient off by {rel} relative");
        let qk = [
            "to_q.weight",
            "to_k.weight",
            "add_q_proj.weight",
            "add_k_proj.weight",
        ];
        if qk.iter().any(|s| name.ends_with(s)) && max_abs(want) > 0.0 {
            assert!(max_abs(got) > 1e-6, "{name}: a zero gradient");
        }
    }
}
