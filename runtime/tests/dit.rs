//! DiT against diffusers' DiTTransformer2DModel (fixtures/dit/generate.py): the same weights,
//! loaded by diffusers name, give the same output; and every parameter gets a gradient.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use signal_diffusion_runtime::dit::{Condition, Conditioning, Dit, DitShape};
use signal_diffusion_runtime::nn::Params;
use signal_diffusion_runtime::train::checkpoint::restore;

fn shape(height: usize, width: usize, num_embeds: usize, conditioning: Conditioning) -> DitShape {
    DitShape {
        in_channels: 3,
        out_channels: 3,
        height,
        width,
        patch: [2, 2],
        heads: 2,
        head_dim: 8,
        layers: 2,
        num_embeds,
        conditioning,
        norm_eps: 1e-5,
    }
}

fn parity(name: &str, s: DitShape) {
    let dev = Device::Cpu;
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/dit/{name}.safetensors"));
    let saved = candle_core::safetensors::load(&path, &dev).unwrap();
    let mut p = Params::new(0, &dev);
    let model = Dit::new(&s, &mut p, &dev).unwrap();
    // Every diffusers tensor is one of ours and the other way round.
    let ours: std::collections::BTreeSet<&str> =
        p.trainable.iter().map(|(n, _)| n.as_str()).collect();
    let theirs: std::collections::BTreeSet<&str> = saved
        .keys()
        .map(String::as_str)
        .filter(|k| !["input", "timestep", "labels", "output"].contains(k))
        .collect();
    assert_eq!(ours, theirs);
    restore(&p.trainable, &saved).unwrap();
    let x = &saved["input"];
    let t: Vec<f32> = saved["timestep"].to_vec1().unwrap();
    let labels: Vec<u32> = saved["labels"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let cond = Condition {
        ages: vec![f32::NAN; labels.len()],
        labels,
    };
    let got = model.forward(x, &t, &cond).unwrap();
    let want = &saved["output"];
    assert_eq!(got.dims(), want.dims());
    let err = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // f32 with different summation orders (GEMM blocking, SDPA): agreement to ~1e-6 of values ~1.
    assert!(err < 2e-5, "{name}: max |ours - diffusers| = {err}");
}

#[test]
fn class_conditional_dit_equals_diffusers() {
    parity(
        "classes",
        shape(8, 8, 5, Conditioning::Classes { num_classes: 4 }),
    );
}

#[test]
fn non_square_dit_equals_diffusers_on_the_real_grid() {
    parity("nonsquare", shape(4, 16, 1000, Conditioning::None));
}

/// Every trainable tensor of a gend_hlth_age DiT (the largest set: label tables, age embedders)
/// gets a finite, non-zero gradient from one loss.
#[test]
fn every_dit_parameter_gets_a_gradient() {
    let dev = Device::Cpu;
    let s = shape(8, 16, 5, Conditioning::GenderHealthAge);
    let mut p = Params::new(3, &dev);
    let model = Dit::new(&s, &mut p, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 3, 8, 16), &dev).unwrap();
    let cond = Condition {
        labels: vec![0, 3, 4],
        ages: vec![0.31, f32::NAN, 0.7],
    };
    let out = model.forward(&x, &[5.0, 500.0, 999.0], &cond).unwrap();
    let r = Tensor::randn(0f32, 1.0, out.shape(), &dev).unwrap();
    let grads = (out * r).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in &p.trainable {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n.is_finite() && n > 0.0, "{name}: gradient norm² {n}");
    }
    assert_eq!(
        p.buffers.len(),
        1,
        "the age Fourier frequencies are a saved buffer"
    );
}

/// Gradient checkpointing recomputes each block in the backward: the loss and every parameter's
/// gradient equal those of the plain backward (to 1e-5 of the gradient's largest entry: the
/// first block's embedder sums its head and block contributions in another order).
#[test]
fn checkpointed_backward_equals_the_plain_backward() {
    let dev = Device::Cpu;
    let mut s = shape(8, 16, 5, Conditioning::GenderHealthAge);
    s.layers = 3;
    let mut p = Params::new(5, &dev);
    let model = Dit::new(&s, &mut p, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 3, 8, 16), &dev).unwrap();
    let target = Tensor::randn(0f32, 1.0, (3, 3, 8, 16), &dev).unwrap();
    let cond = Condition {
        labels: vec![1, 2, 4],
        ages: vec![0.5, 0.25, f32::NAN],
    };
    let t = [10.0, 400.0, 900.0];
    let loss_of = |out: &Tensor| (out - &target)?.sqr()?.mean_all();
    let plain_loss = loss_of(&model.forward(&x, &t, &cond).unwrap()).unwrap();
    let plain = plain_loss.backward().unwrap();
    let (loss, grads) = model.checkpointed_backward(&x, &t, &cond, loss_of).unwrap();
    let value = |t: &Tensor| t.to_scalar::<f32>().unwrap();
    assert_eq!(value(&loss), value(&plain_loss));
    for (name, var) in &p.trainable {
        let want = plain.get(var).unwrap().flatten_all().unwrap();
        let got = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .flatten_all()
            .unwrap();
        let scale = value(&want.abs().unwrap().max(0).unwrap());
        let diff = value(&(got - &want).unwrap().abs().unwrap().max(0).unwrap());
        assert!(
            scale > 0.0 && diff <= 1e-5 * scale,
            "{name}: |Δ| {diff} vs max |g| {scale}"
        );
    }
}
