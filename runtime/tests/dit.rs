//! DiT against diffusers' DiTTransformer2DModel (fixtures/dit/generate.py): the same weights,
//! loaded by diffusers name, give the same output, with every `activation_fn`, without q/k/v
//! biases and with an affine norm3; and every parameter gets a gradient.

use std::path::Path;

use crate::common::max_abs;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use signal_diffusion_runtime::config::choice::FeedForward;
use signal_diffusion_runtime::models::dit::{Condition, Conditioning, Dit, DitShape};
use signal_diffusion_runtime::models::nn::Params;
use signal_diffusion_runtime::ops::precision::Autocast;
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
        dropout: 0.0,
        attention_bias: true,
        feed_forward: FeedForward::GeluApproximate,
        norm_affine: false,
        upcast_attention: false,
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
        texts: None,
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

/// diffusers' other block options: GEGLU without q/k/v biases, with an affine norm3 and dropout
/// (off in evaluation), then each other feed-forward activation.
#[test]
fn dit_block_options_equal_diffusers() {
    let classes = Conditioning::Classes { num_classes: 4 };
    parity(
        "ff_geglu",
        DitShape {
            feed_forward: FeedForward::Geglu,
            attention_bias: false,
            norm_affine: true,
            dropout: 0.1,
            ..shape(8, 8, 5, classes)
        },
    );
    for (name, feed_forward) in [
        ("ff_gelu", FeedForward::Gelu),
        ("ff_geglu_approximate", FeedForward::GegluApproximate),
        ("ff_swiglu", FeedForward::Swiglu),
        ("ff_linear_silu", FeedForward::LinearSilu),
    ] {
        parity(
            name,
            DitShape {
                feed_forward,
                ..shape(8, 8, 5, classes)
            },
        );
    }
}

/// A gend_hlth_age DiT (the largest parameter set: label tables, age embedders) on a fixed
/// input, and the gradients of a random projection of its output, computed under `autocast`.
fn output_and_gradients(autocast: Option<DType>) -> (Params, Tensor, GradStore) {
    output_and_gradients_of(shape(8, 16, 5, Conditioning::GenderHealthAge), autocast)
}

fn output_and_gradients_of(s: DitShape, autocast: Option<DType>) -> (Params, Tensor, GradStore) {
    let dev = Device::Cpu;
    let mut p = Params::new(3, &dev);
    let model = Dit::new(&s, &mut p, &dev).unwrap();
    let mut rng = Params::new(4, &dev);
    let x = rng.normal_buffer("x".into(), &[3, 3, 8, 16], 1.0).unwrap();
    let cond = Condition {
        labels: vec![0, 3, 4],
        ages: vec![0.31, f32::NAN, 0.7],
        texts: None,
    };
    let _amp = Autocast::enter(autocast);
    let out = model.forward(&x, &[5.0, 500.0, 999.0], &cond).unwrap();
    let r = rng.normal_buffer("r".into(), out.dims(), 1.0).unwrap();
    let grads = (&out * r).unwrap().sum_all().unwrap().backward().unwrap();
    (p, out, grads)
}

/// Every trainable tensor gets a finite, non-zero gradient from one loss, in f32 and under
/// bf16/fp16 autocast (where the gradient reaches the f32 master through the casts), with the
/// default block and with each other feed-forward (no q/k/v biases, an affine norm3).
#[test]
fn every_dit_parameter_gets_a_gradient() {
    let default = shape(8, 16, 5, Conditioning::GenderHealthAge);
    let variants = [
        FeedForward::Gelu,
        FeedForward::Geglu,
        FeedForward::GegluApproximate,
        FeedForward::Swiglu,
        FeedForward::LinearSilu,
    ]
    .map(|feed_forward| DitShape {
        feed_forward,
        attention_bias: false,
        norm_affine: true,
        ..default
    });
    let cases = [None, Some(DType::BF16), Some(DType::F16)]
        .map(|a| (default, a))
        .into_iter()
        .chain(variants.map(|s| (s, None)));
    for (s, autocast) in cases {
        let (p, _, grads) = output_and_gradients_of(s, autocast);
        let autocast = (autocast, s.feed_forward);
        for (name, var) in &p.trainable {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{name} ({autocast:?}): no gradient"));
            assert_eq!(g.dtype(), DType::F32, "{name}: the master's gradient");
            let n = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                n.is_finite() && n > 0.0,
                "{name} ({autocast:?}): gradient norm² {n}"
            );
        }
        assert_eq!(
            p.buffers.len(),
            1,
            "the age Fourier frequencies are a saved buffer"
        );
    }
}

/// Under autocast the output and every gradient stay within 16-bit rounding of the f32 model's:
/// relative to the largest entry, bf16 (8 significant bits) within 3 %, fp16 (11 bits) closer
/// than bf16 by at least 4× (2³ = 8× finer rounding) — and neither equals f32, so the products
/// really were rounded.
#[test]
fn autocast_dit_follows_the_f32_dit_within_16_bit_rounding() {
    let (p, reference, want) = output_and_gradients(None);
    let mut worst = [0f32; 2];
    for (i, dtype) in [DType::BF16, DType::F16].into_iter().enumerate() {
        let (q, out, got) = output_and_gradients(Some(dtype));
        let rel = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap()) / max_abs(b);
        let out_err = rel(&out, &reference);
        assert!(out_err > 0.0, "{dtype:?}: the output equals f32's");
        worst[i] = out_err;
        for ((name, v), (_, w)) in q.trainable.iter().zip(&p.trainable) {
            // A key bias shifts each query's scores by one constant, which softmax removes: its
            // gradient is zero but for rounding, in f32 as in 16 bits.
            if name.ends_with("to_k.bias") {
                continue;
            }
            let e = rel(got.get(v).unwrap(), want.get(w).unwrap());
            worst[i] = worst[i].max(e);
            eprintln!("{dtype:?} {name}: {e:.2e}");
        }
    }
    let [bf16, fp16] = worst;
    eprintln!("largest relative deviation: bf16 {bf16:.2e}, fp16 {fp16:.2e}");
    assert!(bf16 < 3e-2, "bf16 deviates {bf16:.2e} from f32");
    assert!(fp16 * 4.0 < bf16, "fp16 {fp16:.2e} vs bf16 {bf16:.2e}");
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
        texts: None,
    };
    let t = [10.0, 400.0, 900.0];
    let loss_of = |out: &Tensor| (out - &target)?.sqr()?.mean_all();
    let plain_loss = loss_of(&model.forward(&x, &t, &cond).unwrap()).unwrap();
    let plain = plain_loss.backward().unwrap();
    let (loss, grads) = model
        .checkpointed_backward(&x, &t, &cond, None, loss_of)
        .unwrap();
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

/// Dropout (diffusers' `dropout`) in training: a seed gives the same output every time and
/// another seed another output, evaluation has none, and the checkpointed recompute drops the
/// same elements (its gradients equal the plain backward's).
#[test]
fn dit_dropout_is_seeded_and_survives_checkpointing() {
    let dev = Device::Cpu;
    let s = DitShape {
        dropout: 0.2,
        ..shape(8, 8, 5, Conditioning::Classes { num_classes: 4 })
    };
    let mut p = Params::new(6, &dev);
    let model = Dit::new(&s, &mut p, &dev).unwrap();
    let mut rng = Params::new(7, &dev);
    let x = rng.normal_buffer("x".into(), &[2, 3, 8, 8], 1.0).unwrap();
    let target = rng.normal_buffer("y".into(), &[2, 3, 8, 8], 1.0).unwrap();
    let cond = Condition {
        labels: vec![1, 4],
        ages: vec![f32::NAN; 2],
        texts: None,
    };
    let t = [50.0, 600.0];
    let run = |seed| model.forward_with_dropout(&x, &t, &cond, seed).unwrap();
    let eval = model.forward(&x, &t, &cond).unwrap();
    let diff = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap());
    assert_eq!(diff(&run(None), &eval), 0.0);
    assert_eq!(diff(&run(Some(1)), &run(Some(1))), 0.0);
    assert!(diff(&run(Some(1)), &eval) > 1e-3);
    assert!(diff(&run(Some(1)), &run(Some(2))) > 1e-3);

    let loss_of = |out: &Tensor| (out - &target)?.sqr()?.mean_all();
    let plain = loss_of(&run(Some(3))).unwrap().backward().unwrap();
    let (_, grads) = model
        .checkpointed_backward(&x, &t, &cond, Some(3), loss_of)
        .unwrap();
    for (name, var) in &p.trainable {
        let want = plain.get(var).unwrap();
        let got = grads.get(var).unwrap();
        let scale = max_abs(want);
        assert!(
            scale > 0.0 && diff(got, want) <= 1e-5 * scale,
            "{name}: |Δ| {} vs max |g| {scale}",
            diff(got, want)
        );
    }
}

/// `upcast_attention` under bf16 autocast takes the attention op out of the autocast. On the
/// CPU that op already computes the scores and the softmax in f32 from 16-bit q, k, v (what
/// diffusers' upcast asks) and its roundings of q, k, v and of the output coincide with those of
/// the linear layers around it: outputs and gradients stay bit for bit those of the plain bf16
/// model. (On a GPU it turns the op's two 16-bit products into f32 ones; the op itself is checked
/// without autocast by `attention_by_products_equals_the_composite`.)
#[test]
fn upcast_attention_leaves_the_cpu_numbers_as_they_are() {
    let default = shape(8, 16, 5, Conditioning::GenderHealthAge);
    let upcast = DitShape {
        upcast_attention: true,
        ..default
    };
    for autocast in [None, Some(DType::BF16), Some(DType::F16)] {
        let (p0, out0, g0) = output_and_gradients_of(default, autocast);
        let (p1, out1, g1) = output_and_gradients_of(upcast, autocast);
        assert_eq!(max_abs(&(&out0 - &out1).unwrap()), 0.0, "{autocast:?}");
        for ((name, a), (_, b)) in p0.trainable.iter().zip(&p1.trainable) {
            let d = max_abs(&(g0.get(a).unwrap() - g1.get(b).unwrap()).unwrap());
            assert_eq!(d, 0.0, "{name} ({autocast:?})");
        }
    }
}
