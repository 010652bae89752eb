//! LoRA on a DiT against PEFT's (fixtures/lora/generate.py; the UNet's and MMDiT's are in
//! unet.rs and mmdit.rs): the same base weights and adapters give diffusers + PEFT's output and
//! the gradients of every tensor PEFT trains; nothing else gets a gradient; the adapters save
//! under PEFT's keys; merging them into the weights gives a plain DiT the adapted model's output;
//! dropout is seeded; and the layers LoRA can target are the ones the build checks targets
//! against.

use std::collections::BTreeSet;
use std::path::Path;

use crate::common::{assert_trains_as_peft, lora_spec, max_abs, max_abs_diff, trained_values};
use candle_core::{DType, Device};
use signal_diffusion_runtime::config::choice::{FeedForward, LoraBias};
use signal_diffusion_runtime::models::dit::{Condition, Conditioning, Dit, DitShape};
use signal_diffusion_runtime::models::lora::{merge, LoraDropout};
use signal_diffusion_runtime::models::nn::Params;
use signal_diffusion_runtime::train::checkpoint::restore;

fn shape(conditioning: Conditioning) -> DitShape {
    DitShape {
        in_channels: 3,
        out_channels: 3,
        height: 8,
        width: 8,
        patch: [2, 2],
        heads: 2,
        head_dim: 8,
        layers: 2,
        num_embeds: 5,
        conditioning,
        norm_eps: 1e-5,
        dropout: 0.0,
        attention_bias: true,
        feed_forward: FeedForward::GeluApproximate,
        norm_affine: false,
        upcast_attention: false,
    }
}

const FIXTURE_TARGETS: [&str; 6] = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "linear_1"];

/// Output within 2e-5 of PEFT's, and its gradients (f32, different summation orders).
#[test]
fn lora_dit_equals_peft() {
    let dev = Device::Cpu;
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora/dit_lora.safetensors");
    let saved = candle_core::safetensors::load(&path, &dev).unwrap();
    let mut p = Params::with_lora(
        0,
        &dev,
        lora_spec(&FIXTURE_TARGETS, LoraBias::LoraOnly, 0.0),
    );
    let model = Dit::new(
        &shape(Conditioning::Classes { num_classes: 4 }),
        &mut p,
        &dev,
    )
    .unwrap();
    restore(&p.frozen, &saved).unwrap();
    restore(&p.trainable, &saved).unwrap();
    let x = &saved["input"];
    let t: Vec<f32> = saved["timestep"].to_vec1().unwrap();
    let labels: Vec<u32> = saved["labels"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let cond = Condition {
        ages: vec![f32::NAN; 2],
        labels,
        texts: None,
    };
    let out = model.forward_with_dropout(x, &t, &cond, Some(7)).unwrap();
    let err = max_abs_diff(&out, &saved["output"]);
    assert!(err < 2e-5, "output: max |ours - PEFT| = {err}");
    assert_trains_as_peft(&p, &out, &saved);
    let trained = trained_values(&p);

    // Merged into the weights, a plain DiT gives the adapted output.
    let merged = merge(p.lora().unwrap(), &trained, &p.frozen).unwrap();
    let mut plain = Params::new(1, &dev);
    let plain_model = Dit::new(
        &shape(Conditioning::Classes { num_classes: 4 }),
        &mut plain,
        &dev,
    )
    .unwrap();
    restore(&plain.trainable, &merged.into_iter().collect()).unwrap();
    let err = max_abs_diff(&plain_model.forward(x, &t, &cond).unwrap(), &out);
    assert!(err < 1e-5, "merged: max |plain - adapted| = {err}");
}

/// Dropout on the adapters' inputs: seeded (the same masks for the same seed, including in a
/// checkpointed recompute), off in evaluation, and it changes the output in training.
#[test]
fn lora_dropout_is_seeded_and_off_in_evaluation() {
    let dev = Device::Cpu;
    let mut p = Params::with_lora(
        0,
        &dev,
        lora_spec(&["to_q", "to_v", "ff.net.2"], LoraBias::None, 0.5),
    );
    let model = Dit::new(
        &shape(Conditioning::Classes { num_classes: 4 }),
        &mut p,
        &dev,
    )
    .unwrap();
    crate::common::perturb(&p); // B non-zero, so the branch counts
    let x = crate::common::randn(&[2, 3, 8, 8], 1.0);
    let cond = Condition {
        ages: vec![f32::NAN; 2],
        labels: vec![0, 3],
        texts: None,
    };
    let run = |seed| {
        model
            .forward_with_dropout(&x, &[5.0, 600.0], &cond, seed)
            .unwrap()
    };
    assert_eq!(max_abs_diff(&run(Some(1)), &run(Some(1))), 0.0);
    assert!(max_abs_diff(&run(Some(1)), &run(Some(2))) > 1e-4);
    assert!(max_abs_diff(&run(Some(1)), &run(None)) > 1e-4);
    assert_eq!(
        max_abs_diff(
            &run(None),
            &model.forward(&x, &[5.0, 600.0], &cond).unwrap()
        ),
        0.0
    );
    // The guard only lives through a forward.
    let _outer = LoraDropout::enter(None);
    let plain = model.forward(&x, &[5.0, 600.0], &cond).unwrap();
    let (loss, grads) = model
        .checkpointed_backward(&x, &[5.0, 600.0], &cond, Some(1), |o| o.sqr()?.sum_all())
        .unwrap();
    let direct = run(Some(1)).sqr().unwrap().sum_all().unwrap();
    let rel = max_abs_diff(&loss, &direct) / max_abs(&direct);
    assert!(rel < 1e-6, "checkpointed loss differs by {rel}");
    let direct_grads = direct.backward().unwrap();
    for (name, var) in &p.trainable {
        let (a, b) = (grads.get(var).unwrap(), direct_grads.get(var).unwrap());
        let rel = max_abs_diff(a, b) / max_abs(b).max(1e-12);
        assert!(rel < 1e-4, "{name}: checkpointed gradient off by {rel}");
    }
    assert_eq!(max_abs_diff(&plain, &run(None)), 0.0);
}

/// Targeting every linear layer the build knows adapts exactly those layers (per block, and the
/// head), for each conditioning: the build's target check and the model cannot drift apart.
#[test]
fn the_builds_linear_layers_are_the_dits() {
    let dev = Device::Cpu;
    for (c, conditioning) in [
        (
            Conditioning::None,
            signal_diffusion_runtime::config::choice::Conditioning::None,
        ),
        (
            Conditioning::Classes { num_classes: 4 },
            signal_diffusion_runtime::config::choice::Conditioning::Classes,
        ),
        (
            Conditioning::GenderHealthAge,
            signal_diffusion_runtime::config::choice::Conditioning::GenderHealthAge,
        ),
        (
            Conditioning::Caption { dim: 12 },
            signal_diffusion_runtime::config::choice::Conditioning::Caption,
        ),
    ] {
        let layers = signal_diffusion_runtime::config::dit_linear_layers(conditioning);
        let targets: Vec<&str> = layers.iter().map(String::as_str).collect();
        let mut p = Params::with_lora(0, &dev, lora_spec(&targets, LoraBias::None, 0.0));
        Dit::new(&shape(c), &mut p, &dev).unwrap();
        let adapted: BTreeSet<String> = p
            .trainable
            .iter()
            .filter_map(|(n, _)| n.strip_suffix(".lora_A.weight"))
            .map(String::from)
            .collect();
        assert_eq!(adapted, layers.iter().cloned().collect(), "{c:?}");
        // Their suffixes adapt the same layers in every block.
        let endings: Vec<String> = layers
            .iter()
            .map(|l| {
                l.rsplit_once("transformer_blocks.0.")
                    .map_or(l.clone(), |(_, e)| e.to_string())
            })
            .collect();
        let targets: Vec<&str> = endings.iter().map(String::as_str).collect();
        let mut p = Params::with_lora(0, &dev, lora_spec(&targets, LoraBias::None, 0.0));
        Dit::new(&shape(c), &mut p, &dev).unwrap();
        let per_block = layers.len() - 2;
        assert_eq!(p.trainable.len(), 2 * (2 * per_block + 2), "{c:?}");
        // Every parameter of the model is frozen but the adapters.
        assert!(p.trainable.iter().all(|(n, _)| n.contains(".lora_")));
    }
}
