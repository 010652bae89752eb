//! The hourglass transformer (models/hourglass.rs): the reference's exact parameter counts and
//! optimizer groups for its presets (spec/reference/hourglass-localmamba.md, computed from the
//! reference's own model code), its state-dict names, an untrained model's zero output, and a
//! finite, non-zero gradient for every parameter.

use candle_core::{DType, Device, Result, Tensor};
use signal_diffusion_runtime::models::hourglass::{
    count_parameters, param_group, Hourglass, HourglassShape, LevelShape, ParamGroup, SelfAttention,
};
use signal_diffusion_runtime::models::nn::{Mode, Params};
use signal_diffusion_runtime::models::tape::Tape;

use crate::common::{
    assert_checkpointing_keeps_gradients, assert_equals_fixture, assert_every_gradient, perturb,
};

fn level(depth: usize, width: usize, d_ff: usize, global: bool) -> LevelShape {
    LevelShape {
        depth,
        width,
        d_ff,
        attention: if global {
            SelfAttention::Global { d_head: 64 }
        } else {
            SelfAttention::Neighborhood {
                d_head: 64,
                kernel: 7,
            }
        },
        dropout: 0.05,
    }
}

/// The reference's presets as its adapter builds them (hourglass-localmamba.md, "Architecture
/// numbers the adapter uses").
fn preset(name: &str) -> HourglassShape {
    let (channels, widths, depths, d_ff, patch, mapping, class_rows, cond) = match name {
        "db" => (3, [64, 128, 256], [2, 2, 3], 512, [2, 2], 256, 5, 256),
        "timeseries" => (1, [128, 256, 512], [3, 3, 4], 768, [1, 8], 256, 5, 256),
        "flowers" => (3, [128, 256, 512], [2, 2, 8], 768, [2, 2], 512, 103, 0),
        _ => unreachable!(),
    };
    HourglassShape {
        in_channels: channels,
        out_channels: channels,
        patch,
        levels: (0..3)
            .map(|i| level(depths[i], widths[i], d_ff, i == 2))
            .collect(),
        mapping_width: mapping,
        mapping_depth: 2,
        mapping_d_ff: 768,
        class_rows,
        mapping_cond_dim: cond,
        mapping_dropout: 0.0,
    }
}

#[test]
fn parameter_counts_equal_the_references_presets() -> Result<()> {
    assert_eq!(count_parameters(&preset("db"))?, 5_967_706);
    assert_eq!(count_parameters(&preset("timeseries"))?, 21_107_142);
    assert_eq!(count_parameters(&preset("flowers"))?, 32_695_002);
    Ok(())
}

/// hourglass-db-only: 98 parameter tensors, 111 state-dict entries (the Fourier weights and
/// the RoPE frequencies are buffers), and the four optimizer groups of `param_groups`.
#[test]
fn names_and_optimizer_groups_equal_the_references() -> Result<()> {
    let mut p = Params::counting();
    Hourglass::new(&preset("db"), &mut p)?;
    assert_eq!(
        (p.trainable.len(), p.trainable.len() + p.buffers.len()),
        (98, 111)
    );
    let mut groups = [0usize; 4];
    for (name, var) in &p.trainable {
        let ParamGroup {
            weight_decay,
            mapping,
        } = param_group(name);
        groups[usize::from(!weight_decay) + 2 * usize::from(mapping)] += var.elem_count();
    }
    assert_eq!(groups, [3_802_624, 197_978, 1_966_080, 1_024]);
    let names: Vec<&str> = p.trainable.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "patch_in.proj.weight",
        "mapping.blocks.1.up_proj.weight",
        "down_levels.0.1.self_attn.qkv_proj.weight",
        "down_levels.1.0.self_attn.scale",
        "mid_level.2.ff.norm.linear.weight",
        "up_levels.0.0.ff.down_proj.weight",
        "splits.1.fac",
        "patch_out.proj.weight",
    ] {
        assert!(names.contains(&want), "{want} missing");
    }
    let buffers: Vec<&str> = p.buffers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        buffers.contains(&"time_emb.weight")
            && buffers.contains(&"mid_level.0.self_attn.pos_emb.freqs")
    );
    Ok(())
}

/// A small model: 16×16 inputs with 2×2 patches, neighbourhood attention (kernel 7) on the
/// 8×8 outer level, global attention in the 4×4 middle.
fn tiny() -> HourglassShape {
    let attention = |global: bool| {
        if global {
            SelfAttention::Global { d_head: 8 }
        } else {
            SelfAttention::Neighborhood {
                d_head: 8,
                kernel: 7,
            }
        }
    };
    HourglassShape {
        in_channels: 3,
        out_channels: 3,
        patch: [2, 2],
        levels: vec![
            LevelShape {
                depth: 1,
                width: 16,
                d_ff: 32,
                attention: attention(false),
                dropout: 0.1,
            },
            LevelShape {
                depth: 1,
                width: 32,
                d_ff: 48,
                attention: attention(true),
                dropout: 0.1,
            },
        ],
        mapping_width: 16,
        mapping_depth: 1,
        mapping_d_ff: 24,
        class_rows: 5,
        mapping_cond_dim: 16,
        mapping_dropout: 0.1,
    }
}

fn inputs(dev: &Device) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let x = Tensor::randn(0f32, 1.0, (2, 3, 16, 16), dev)?;
    let sigma = Tensor::new(&[0.3f32, 0.9], dev)?;
    let class = Tensor::new(&[1u32, 4], dev)?;
    let cond = Tensor::randn(0f32, 1.0, (2, 16), dev)?;
    Ok((x, sigma, class, cond))
}

#[test]
fn an_untrained_model_predicts_zeros_of_the_input_shape() -> Result<()> {
    let dev = Device::Cpu;
    let mut p = Params::new(1, &dev);
    let model = Hourglass::new(&tiny(), &mut p)?;
    let (x, sigma, class, cond) = inputs(&dev)?;
    let y = model.forward(&x, &sigma, Some(&class), Some(&cond), &mut Mode::eval())?;
    assert_eq!(y.dims(), x.dims());
    assert_eq!(y.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    // Its inputs are checked: a class-conditional model without classes is an error.
    assert!(model
        .forward(&x, &sigma, None, Some(&cond), &mut Mode::eval())
        .is_err());
    Ok(())
}

/// With the zero-initialised projections moved off zero (as training does after one step),
/// every parameter gets a finite, non-zero gradient: none is cut off by an op without a
/// backward, in training mode (dropout on) and with both attention kinds.
#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() -> Result<()> {
    let dev = Device::Cpu;
    let mut p = Params::new(2, &dev);
    let model = Hourglass::new(&tiny(), &mut p)?;
    perturb(&p);
    let (x, sigma, class, cond) = inputs(&dev)?;
    let y = model.forward(&x, &sigma, Some(&class), Some(&cond), &mut Mode::train(3))?;
    let r = Tensor::randn(0f32, 1.0, y.shape(), &dev)?;
    assert_every_gradient(&p, &(y * r)?.sum_all()?.backward()?);
    Ok(())
}

/// The tiny two-level shape both k-diffusion fixtures are written for (generate.py).
fn fixture_shape(attention: [(SelfAttention, usize); 2]) -> HourglassShape {
    let level = |(attention, depth): (SelfAttention, usize), width, d_ff| LevelShape {
        depth,
        width,
        d_ff,
        attention,
        dropout: 0.0,
    };
    HourglassShape {
        in_channels: 3,
        out_channels: 3,
        patch: [2, 2],
        levels: vec![level(attention[0], 16, 32), level(attention[1], 32, 48)],
        mapping_width: 16,
        mapping_depth: 1,
        mapping_d_ff: 24,
        class_rows: 5,
        mapping_cond_dim: 16,
        mapping_dropout: 0.0,
    }
}

/// k-diffusion's own `ImageTransformerDenoiserModelV2` in `file` (fixtures/hourglass/generate.py:
/// every weight random) loaded by name into ours of `shape`: the same state-dict names one to
/// one, the same output and the same gradient for every parameter and for x, within 1e-4 of the
/// largest value (common.rs).
fn equals_k_diffusion(file: &str, shape: &HourglassShape) -> Result<()> {
    let mut p = Params::new(0, &Device::Cpu);
    let model = Hourglass::new(shape, &mut p)?;
    let forward = |x: &Tensor, sigma: &Tensor, class: &Tensor, cond: &Tensor| {
        model.forward(x, sigma, Some(class), Some(cond), &mut Mode::eval())
    };
    assert_equals_fixture(&format!("hourglass/{file}"), &p, forward, 1e-4)?;
    Ok(())
}

/// Global attention on both levels, a non-square 8×4 token grid (measured: 1.8e-5 at worst, f32
/// through a dozen layers summed in another order).
#[test]
fn equals_k_diffusion_on_the_same_weights() -> Result<()> {
    let global = SelfAttention::Global { d_head: 8 };
    equals_k_diffusion(
        "hourglass.safetensors",
        &fixture_shape([(global, 1), (global, 2)]),
    )
}

/// Shifted windows of 4 on an 8×16 grid (layers 1 and 3 of the level rolled by 2, the wrap
/// masked), then a level without attention.
#[test]
fn shifted_windows_and_no_attention_equal_k_diffusion() -> Result<()> {
    let windows = SelfAttention::ShiftedWindow {
        d_head: 8,
        window: 4,
    };
    equals_k_diffusion(
        "hourglass_windows.safetensors",
        &fixture_shape([(windows, 2), (SelfAttention::None, 1)]),
    )
}

/// Gradient checkpointing (one tape segment per layer, recomputed in the backward) gives every
/// parameter the plain backward's gradient, dropout on: within 1e-5 of its largest value.
#[test]
fn checkpointing_keeps_every_gradient() -> Result<()> {
    let dev = Device::Cpu;
    let mut p = Params::new(4, &dev);
    let model = Hourglass::new(&tiny(), &mut p)?;
    perturb(&p);
    let (x, sigma, class, cond) = inputs(&dev)?;
    let r = Tensor::randn(0f32, 1.0, x.shape(), &dev)?;
    let run = |checkpoint| {
        let mut tape = Tape::new(Some(9), checkpoint);
        let out = model.record(&mut tape, &x, (&sigma, Some(&class), Some(&cond)))?;
        tape.backward(out, |y| (y * &r)?.sum_all())
    };
    assert_checkpointing_keeps_gradients(&p, run, 1e-5);
    Ok(())
}

/// The reference's checkpoint as it saves it (`torch.save` of the bf16 state dict, a PyTorch
/// pickle) reads directly, widened to f32: every tensor of k-diffusion's state dict, each equal
/// to the f32 weights within bf16's rounding (2⁻⁸ of its magnitude), so `model.pretrained`
/// takes a `hourglass_model.pt` as it is.
#[test]
fn the_references_pickled_checkpoint_reads_as_its_state_dict() -> Result<()> {
    let dev = Device::Cpu;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hourglass");
    let pt = signal_diffusion_runtime::train::export::read_state_dict(
        std::path::Path::new(&format!("{dir}/hourglass_model.pt")),
        &dev,
    )
    .unwrap();
    let f32 = candle_core::safetensors::load(format!("{dir}/hourglass.safetensors"), &dev)?;
    let mut p = Params::new(0, &dev);
    Hourglass::new(
        &fixture_shape([
            (SelfAttention::Global { d_head: 8 }, 1),
            (SelfAttention::Global { d_head: 8 }, 2),
        ]),
        &mut p,
    )?;
    assert_eq!(pt.len(), p.trainable.len() + p.buffers.len());
    for (name, var) in p.trainable.iter().chain(&p.buffers) {
        let t = &pt[name];
        assert_eq!((t.dtype(), t.dims()), (DType::F32, var.dims()), "{name}");
        let want = &f32[name];
        let err = (t - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err <= scale / 256.0, "{name}: {err} against {scale}");
    }
    Ok(())
}

/// Captions reach the hourglass through `mapping_cond_in_proj`: two captions give two
/// predictions, and the null caption (label 0) is the zero embedding.
#[test]
fn captions_condition_the_hourglass_through_its_mapping() -> Result<()> {
    use signal_diffusion_runtime::diffusion::path::Level;
    use signal_diffusion_runtime::models::dit::{Condition, Conditioning};
    use signal_diffusion_runtime::{Denoiser, DenoiserShape, Frame};
    let dev = Device::Cpu;
    let shape = DenoiserShape::Hourglass {
        hourglass: HourglassShape {
            class_rows: 0,
            mapping_cond_dim: 4,
            ..tiny()
        },
        frame: Frame {
            conditioning: Conditioning::Caption { dim: 4 },
            height: 16,
            width: 16,
        },
    };
    let mut p = Params::new(1, &dev);
    let model = Denoiser::new(&shape, &mut p, &dev)?;
    crate::common::perturb(&p);
    let x = Tensor::randn(0f32, 1.0, (2, 3, 16, 16), &dev)?;
    let levels = [Level {
        t: 500.0,
        a: 0.5,
        s: 0.5,
    }; 2];
    let texts = std::sync::Arc::new(vec![1f32, 0., 0., 0., 0., 0., 0., 1.]);
    let with = |labels: Vec<u32>, texts: Option<std::sync::Arc<Vec<f32>>>| {
        let cond = Condition {
            ages: vec![f32::NAN; 2],
            labels,
            texts,
        };
        model.forward(&x, &levels, &cond)
    };
    let a = with(vec![1, 2], Some(texts.clone()))?;
    let b = with(vec![2, 1], Some(texts.clone()))?;
    let null = with(vec![0, 0], Some(texts))?;
    let zeros = with(vec![0, 0], None)?;
    let diff =
        |u: &Tensor, v: &Tensor| -> Result<f32> { (u - v)?.abs()?.max_all()?.to_scalar::<f32>() };
    assert!(diff(&a, &b)? > 1e-3, "the captions change nothing");
    assert_eq!(diff(&null, &zeros)?, 0.0);
    Ok(())
}
