//! Every trainable parameter of every model gets a finite, non-zero gradient (Candle's fused
//! norms would silently drop them; ours are composites).
//! And the accumulation rules of our patched candle-core (vendor/README.md) give the closed-form
//! gradients where a tensor has several consumers, is subtracted, or is upsampled.

use candle_core::{DType, Device, Tensor, Var};
use signal_diffusion_runtime::models::classifier::{
    Backbone, Classifier, Cnn, Cnn1d, Cnn1dShape, CnnLight, CnnLightShape, CnnShape, Transformer,
    TransformerShape,
};
use signal_diffusion_runtime::models::nn::{Activation, Mode, Params};
use signal_diffusion_runtime::ops::precision::Autocast;
use signal_diffusion_runtime::tasks::{TaskKind, TaskSpec};

const TASKS: [TaskSpec; 2] = [
    TaskSpec {
        name: "gender",
        kind: TaskKind::Classification,
        outputs: 2,
        column: "gender",
        encoder: "gender",
    },
    TaskSpec {
        name: "age",
        kind: TaskKind::Regression,
        outputs: 1,
        column: "age",
        encoder: "float",
    },
];

/// In f32 and under `use_amp`'s bf16 autocast (the gradient reaches the f32 master through the
/// casts).
fn check<B: Backbone>(shape: &B::Shape, input: &[usize]) {
    for autocast in [None, Some(DType::BF16)] {
        check_under::<B>(shape, input, autocast);
    }
}

fn check_under<B: Backbone>(shape: &B::Shape, input: &[usize], autocast: Option<DType>) {
    let dev = Device::Cpu;
    let mut p = Params::new(3, &dev);
    let model = Classifier::<B>::new(shape, &TASKS, &mut p).unwrap();
    let x = Tensor::randn(0f32, 1.0, input, &dev).unwrap();
    let mut mode = Mode::train(1);
    let outs = {
        let _amp = Autocast::enter(autocast);
        model.forward(&x, &mut mode).unwrap()
    };
    let mut loss = Tensor::new(0f32, &dev).unwrap();
    for o in &outs {
        let r = Tensor::randn(0f32, 1.0, o.shape(), &dev).unwrap();
        loss = (loss + (o * r).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    assert!(!p.trainable.is_empty());
    for (name, var) in &p.trainable {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name} ({autocast:?})"));
        let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "non-finite gradient for {name} ({autocast:?})"
        );
        assert!(
            v.iter().any(|x| *x != 0.0),
            "zero gradient for {name} ({autocast:?})"
        );
    }
}

#[test]
fn cnn_light_parameters_all_receive_gradients() {
    for act in [Activation::Gelu, Activation::PRelu] {
        let shape = CnnLightShape {
            in_channels: 1,
            resolution: 32,
            stem: 4,
            channels: &[8, 16],
            layer_repeats: 2,
            embedding_dim: 16,
            activation: act,
            dropout: 0.1,
        };
        check::<CnnLight>(&shape, &[4, 1, 32, 32]);
    }
}

#[test]
fn cnn_1d_parameters_all_receive_gradients() {
    let shape = Cnn1dShape {
        in_channels: 3,
        length: 64,
        stem: 8,
        channels: &[16, 32],
        kernels: &[5, 3],
        layer_repeats: 2,
        embedding_dim: 16,
        activation: Activation::Relu,
        dropout: 0.1,
    };
    check::<Cnn1d>(&shape, &[4, 3, 64]);
}

#[test]
fn cnn_parameters_all_receive_gradients() {
    for act in [Activation::Silu, Activation::PRelu] {
        let shape = CnnShape {
            in_channels: 3,
            resolution: 32,
            stem: 4,
            channels: &[8, 16],
            layer_repeats: 2,
            embedding_dim: 16,
            activation: act,
            dropout: 0.1,
        };
        check::<Cnn>(&shape, &[4, 3, 32, 32]);
    }
}

#[test]
fn transformer_parameters_all_receive_gradients() {
    // Images as 8×8 patches with a CLS token; time series as channel tokens with mean pooling.
    let image = TransformerShape {
        patch: 8,
        tokens: 16,
        token_dim: 64,
        hidden: 32,
        layers: 2,
        heads: 4,
        ff: 64,
        cls: true,
        embedding_dim: 16,
        activation: Activation::Gelu,
        dropout: 0.1,
    };
    check::<Transformer>(&image, &[4, 1, 32, 32]);
    let series = TransformerShape {
        patch: 0,
        tokens: 6,
        token_dim: 40,
        hidden: 16,
        layers: 1,
        heads: 2,
        ff: 32,
        cls: false,
        embedding_dim: 8,
        activation: Activation::PRelu,
        dropout: 0.0,
    };
    check::<Transformer>(&series, &[4, 6, 40]);
}

#[test]
fn gradients_accumulate_over_every_consumer() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, 3, 3), &dev)?)?;
    let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, 3, 3), &dev)?)?;
    let c = Tensor::randn(0f32, 1.0, (1, 2, 3, 3), &dev)?;
    let w = Tensor::randn(0f32, 1.0, (1, 2, 6, 6), &dev)?;
    let (a_t, b_t) = (a.as_tensor(), b.as_tensor());
    // `b` is only ever subtracted (its first gradient is a negation); `a` has three consumers,
    // one of them an upsampling, whose backward Candle 0.11.1 wrote over the others' gradients:
    // leftmost, so that it runs last (the backward walks the graph depth-first, right to left).
    let loss = ((a_t.upsample_nearest2d(6, 6)? * &w)?.sum_all()?
        + (&c * (a_t - b_t)?)?.sum_all()?
        + a_t.sqr()?.sum_all()?)?;
    let grads = loss.backward()?;
    // ∂/∂a = c + 2a + the sum of w over each 2×2 block; ∂/∂b = −c.
    let w_blocks = (w.avg_pool2d(2)? * 4.0)?;
    let expected_a = ((&c + (a_t * 2.0)?)? + w_blocks)?;
    let expected_b = c.neg()?;
    for (name, var, expected) in [("a", &a, expected_a), ("b", &b, expected_b)] {
        let grad = grads.get(var).expect("a gradient");
        let worst = (grad - expected)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(worst < 1e-5, "∂loss/∂{name} off its closed form by {worst}");
    }
    Ok(())
}
