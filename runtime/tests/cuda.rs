//! Parity of our CUDA kernels with the plain Candle path, and of a short training run on the GPU
//! with the same run on the CPU. They need a GPU, so they are `#[ignore]`d: a `--features cuda`
//! test run lists them as ignored (never a silent pass); on a GPU machine run
//! `cargo test --release --features cuda -p signal-diffusion-runtime --test runtime -- cuda::
//! --include-ignored`, where a missing GPU fails.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor, Var, D};
use signal_diffusion_config::schema;
use signal_diffusion_runtime::models::classifier::{Classifier, CnnLight, CnnLightShape};
use signal_diffusion_runtime::models::nn::{Activation, Mode, Params};
use signal_diffusion_runtime::ops::cuda;
use signal_diffusion_runtime::ops::norm::group_norm;
use signal_diffusion_runtime::ops::precision::Autocast;
use signal_diffusion_runtime::tasks::{TaskKind, TaskSpec};
use signal_diffusion_runtime::train::optim::Optimizer;
use signal_diffusion_runtime::KernelSizes;

/// The GPU, with our kernels compiled by NVRTC for it: GroupNorm kernels specialised to 8·32·32
/// values per sample (the first shape below, and the stem of the training test's model), DiT
/// rows to width 384, attention rows to 1024, selective scans to state 16 and neighbourhood
/// attention to heads of 8 with kernel 3 (one of each pair of sizes the DiT, scan and
/// neighbourhood tests use; the other goes through the `_any` kernels).
fn gpu() -> Device {
    let dev = Device::new_cuda(0).expect("these tests need a GPU (run them on a GPU machine)");
    let Device::Cuda(cu) = &dev else {
        unreachable!()
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let sizes = KernelSizes {
        norm: &[8 * 32 * 32],
        widths: &[384],
        tokens: &[1024],
        scan_states: &[16],
        neighborhoods: &[(8, 3)],
    };
    let listed = signal_diffusion_config::cuda::KernelSizes {
        norm: sizes.norm.to_vec(),
        widths: sizes.widths.to_vec(),
        tokens: sizes.tokens.to_vec(),
        scan_states: sizes.scan_states.to_vec(),
        neighborhoods: sizes.neighborhoods.to_vec(),
    };
    let source = signal_diffusion_config::cuda::translation_unit(&dir, &listed).unwrap();
    let origin = cuda::install(cu, sizes, &[], &source).unwrap();
    assert!(matches!(origin, cuda::Origin::Nvrtc(_)), "{origin}");
    dev
}

/// max |a − b| / max(max |b|, 1e-12)
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let b = b
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let s = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f64>().unwrap() / s.to_scalar::<f64>().unwrap().max(1e-12)
}

/// The composite of Candle ops GroupNorm1 was built from before the fused op.
fn composite(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let flat = x.flatten_from(1)?;
    let centered = flat.broadcast_sub(&flat.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered
        .broadcast_div(&(var + 1e-5)?.sqrt()?)?
        .reshape(dims)?;
    normed
        .broadcast_mul(&w.reshape((1, (), 1, 1))?)?
        .broadcast_add(&b.reshape((1, (), 1, 1))?)
}

/// The GroupNorm kernels (specialised to one size, and the run-time-size one) against the CPU
/// op and the Candle composite on the GPU: forward and the gradients of x, w and b within 1e-5
/// relative (f32; the kernels accumulate in f64, the composite in f32).
#[test]
#[ignore = "needs a GPU"]
fn group_norm_kernels_match_the_cpu_and_the_composite() -> Result<()> {
    let dev = gpu();
    // 8·32·32 = 8192 values per sample are specialised; 3·17·11 = 561 are not.
    for shape in [(6, 8, 32, 32), (5, 3, 17, 11)] {
        let c = shape.1;
        let cpu = ((Tensor::randn(0f32, 1.0, shape, &Device::Cpu)? * 2.5)? + 0.7)?;
        let wc = (Tensor::randn(0f32, 0.3, c, &Device::Cpu)? + 1.0)?;
        let bc = Tensor::randn(0f32, 0.3, c, &Device::Cpu)?;
        let r = Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?;
        let vars = |d: &Device| -> Result<[Var; 3]> {
            Ok([
                Var::from_tensor(&cpu.to_device(d)?)?,
                Var::from_tensor(&wc.to_device(d)?)?,
                Var::from_tensor(&bc.to_device(d)?)?,
            ])
        };
        let run = |vs: &[Var; 3], fused: bool| -> Result<(Tensor, Vec<Tensor>)> {
            let (x, w, b) = (vs[0].as_tensor(), vs[1].as_tensor(), vs[2].as_tensor());
            let y = match fused {
                true => group_norm(x, w, b)?,
                false => composite(x, w, b)?,
            };
            let g = (&y * &r.to_device(x.device())?)?.sum_all()?.backward()?;
            Ok((y, vs.iter().map(|v| g.get(v).unwrap().clone()).collect()))
        };
        let (y, g) = run(&vars(&dev)?, true)?;
        let (y_cpu, g_cpu) = run(&vars(&Device::Cpu)?, true)?;
        let (y_comp, g_comp) = run(&vars(&dev)?, false)?;
        let mut checks = vec![
            ("forward vs CPU", rel_diff(&y, &y_cpu)),
            ("forward vs composite", rel_diff(&y, &y_comp)),
        ];
        for (i, name) in ["dx", "dw", "db"].iter().enumerate() {
            checks.push((name, rel_diff(&g[i], &g_cpu[i])));
            checks.push((name, rel_diff(&g[i], &g_comp[i])));
        }
        for (what, d) in checks {
            println!("{shape:?} {what}: {d:.2e}");
            assert!(d < 1e-5, "{shape:?}: {what} differs by {d:.2e}");
        }
    }
    Ok(())
}

/// cuDNN convolution with and without its bias (forward, and every gradient) against Candle's
/// CPU convolution + broadcast bias, 2-D and 1-D, TF32 off: within 1e-5 relative.
#[test]
#[ignore = "needs a GPU"]
fn cudnn_convolution_matches_candle_on_the_cpu() -> Result<()> {
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(false);
    let dev = gpu();
    let cases: [(&[usize], &[usize], usize, bool); 4] = [
        (&[4, 3, 19, 23], &[8, 3, 3, 3], 1, true),
        (&[2, 5, 16, 16], &[6, 5, 5, 5], 2, false),
        (&[3, 4, 50], &[7, 4, 7], 3, true),
        (&[3, 4, 50], &[7, 4, 7], 3, false),
    ];
    for (xs, ws, pad, with_bias) in cases {
        let x = Tensor::randn(0f32, 1.0, xs, &Device::Cpu)?;
        let w = Tensor::randn(0f32, 0.3, ws, &Device::Cpu)?;
        let b = Tensor::randn(0f32, 0.3, ws[0], &Device::Cpu)?;
        let (xc, wc, bc) = (
            Var::from_tensor(&x)?,
            Var::from_tensor(&w)?,
            Var::from_tensor(&b)?,
        );
        // 1-D as 2-D with height 1: Candle's padded conv1d has a wrong kernel gradient.
        let yc = match xs.len() {
            4 => xc.as_tensor().conv2d(wc.as_tensor(), pad, 1, 1, 1)?,
            _ => xc
                .as_tensor()
                .unsqueeze(2)?
                .pad_with_zeros(3, pad, pad)?
                .conv2d(&wc.as_tensor().unsqueeze(2)?, 0, 1, 1, 1)?
                .squeeze(2)?,
        };
        let mut bias_shape = vec![1, ws[0]];
        bias_shape.resize(xs.len(), 1);
        let yc = match with_bias {
            true => yc.broadcast_add(&bc.as_tensor().reshape(bias_shape)?)?,
            false => yc,
        };
        let r = Tensor::randn(0f32, 1.0, yc.shape(), &Device::Cpu)?;
        let gc = (&yc * &r)?.sum_all()?.backward()?;
        let (xg, wg, bg) = (
            Var::from_tensor(&x.to_device(&dev)?)?,
            Var::from_tensor(&w.to_device(&dev)?)?,
            Var::from_tensor(&b.to_device(&dev)?)?,
        );
        let bias = with_bias.then(|| bg.as_tensor());
        let yg =
            signal_diffusion_runtime::ops::conv::conv(xg.as_tensor(), wg.as_tensor(), bias, pad)?;
        let gg = (&yg * &r.to_device(&dev)?)?.sum_all()?.backward()?;
        let mut checks = vec![
            ("forward", rel_diff(&yg, &yc)),
            ("dx", rel_diff(gg.get(&xg).unwrap(), gc.get(&xc).unwrap())),
            ("dw", rel_diff(gg.get(&wg).unwrap(), gc.get(&wc).unwrap())),
        ];
        if with_bias {
            checks.push(("db", rel_diff(gg.get(&bg).unwrap(), gc.get(&bc).unwrap())));
        }
        for (what, d) in checks {
            println!("conv {xs:?}*{ws:?} bias {with_bias} {what}: {d:.2e}");
            assert!(d < 1e-5, "conv {xs:?}*{ws:?}: {what} differs by {d:.2e}");
        }
    }
    Ok(())
}

/// Under autocast cuDNN convolves in bf16 and fp16 (tensor cores, f32 accumulation), where the
/// CPU op rounds the operands and computes in f32: forward and every gradient within 1e-2
/// (bf16) and 2e-3 (fp16) of the CPU, 2-D and 1-D, with a bias (added on the GPU to the rounded
/// result, one more rounding) and without.
#[test]
#[ignore = "needs a GPU"]
fn cudnn_convolution_in_16_bits_matches_the_cpu() -> Result<()> {
    use signal_diffusion_runtime::ops::conv::conv;
    let cases: [(&[usize], &[usize], usize); 2] = [
        (&[4, 3, 19, 23], &[8, 3, 3, 3], 1),
        (&[3, 4, 50], &[7, 4, 7], 3),
    ];
    for (low, tolerance) in [(DType::BF16, 1e-2), (DType::F16, 2e-3)] {
        for (x, w, pad) in cases {
            let name = format!("{low:?} convolution {x:?}*{w:?}");
            cpu_gpu_parity(&name, &[x, w, &[w[0]]], tolerance, |t| {
                let _amp = Autocast::enter(Some(low));
                conv(&t[0], &(&t[1] * 0.3)?, Some(&t[2]), pad)
            })?;
            cpu_gpu_parity(&format!("{name}, no bias"), &[x, w], tolerance, |t| {
                let _amp = Autocast::enter(Some(low));
                conv(&t[0], &(&t[1] * 0.3)?, None, pad)
            })?;
        }
    }
    Ok(())
}

/// The GELU kernels against Candle's gelu_erf on the CPU: forward and gradient within 1e-6.
#[test]
#[ignore = "needs a GPU"]
fn gelu_kernels_match_candle_on_the_cpu() -> Result<()> {
    let dev = gpu();
    let x = (Tensor::randn(0f32, 1.0, (7, 1000), &Device::Cpu)? * 3.0)?;
    let r = Tensor::randn(0f32, 1.0, (7, 1000), &Device::Cpu)?;
    let xc = Var::from_tensor(&x)?;
    let yc = xc.as_tensor().gelu_erf()?;
    let gc = (&yc * &r)?.sum_all()?.backward()?;
    let xg = Var::from_tensor(&x.to_device(&dev)?)?;
    let yg = signal_diffusion_runtime::ops::gelu::gelu(xg.as_tensor())?;
    let gg = (&yg * &r.to_device(&dev)?)?.sum_all()?.backward()?;
    let (fwd, grad) = (
        rel_diff(&yg, &yc),
        rel_diff(gg.get(&xg).unwrap(), gc.get(&xc).unwrap()),
    );
    println!("gelu forward {fwd:.2e}, gradient {grad:.2e}");
    assert!(
        fwd < 1e-6 && grad < 1e-6,
        "gelu: forward {fwd:.2e}, gradient {grad:.2e}"
    );
    Ok(())
}

/// The CNN blocks' fused tails on the GPU (pool.cu, with the GroupNorm and GELU kernels) against
/// the same ops on the CPU: average pooling, dropout + pooling, GELU + dropout + pooling, and
/// GroupNorm + dropout + pooling with and without a GELU before it; forward and every gradient
/// within 1e-5 (the same masks on both devices; the window sums in f64 on both). An odd height
/// and width check the rows and columns the pooling drops.
#[test]
#[ignore = "needs a GPU"]
fn fused_pooling_tails_match_the_cpu() -> Result<()> {
    use signal_diffusion_runtime::ops::pool as op;
    let x: &[usize] = &[3, 4, 9, 11];
    let (p, seed) = (0.3, 77);
    cpu_gpu_parity("avg pool", &[x], 1e-5, |t| op::avg_pool(&t[0], 2, 2))?;
    cpu_gpu_parity("dropout + avg pool, 1×2", &[x], 1e-5, |t| {
        op::dropout_avg_pool(&t[0], p, seed, 1, 2)
    })?;
    cpu_gpu_parity("gelu + dropout + avg pool", &[x], 1e-5, |t| {
        op::gelu_dropout_avg_pool(&t[0], p, seed, 2, 2)
    })?;
    for gelu_first in [false, true] {
        let name = format!("group norm + dropout + avg pool, GELU first {gelu_first}");
        cpu_gpu_parity(&name, &[x, &[4], &[4]], 1e-5, |t| {
            let params = (&t[1], &t[2]);
            op::group_norm_dropout_avg_pool(&t[0], gelu_first, params, (p, seed), (2, 2))
        })?;
    }
    Ok(())
}

fn adamw(name: &str) -> schema::Optimizer {
    schema::Optimizer {
        name: signal_diffusion_config::choice::from_toml(name).unwrap(),
        learning_rate: 1e-2,
        weight_decay: 0.05,
        betas: [0.9, 0.995],
        eps: 1e-8,
        momentum: 0.9,
    }
}

/// Twenty fused Adam/AdamW steps with clipping (the norm above the limit on some steps, below on
/// others) equal the Candle-op optimizer on the CPU: norms within 1e-5 relative, parameters within
/// 1e-4 (measured 1e-7 to 2e-5 on an H100: Adam divides by √v, so an f32 rounding difference in a
/// near-zero gradient moves a weight by up to lr).
#[test]
#[ignore = "needs a GPU"]
fn fused_adam_matches_the_cpu_optimizer() -> Result<()> {
    let dev = gpu();
    for kind in ["adamw", "adam"] {
        let shapes: [&[usize]; 3] = [&[300, 257], &[70_000], &[3]];
        let init: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(0f32, 1.0, *s, &Device::Cpu))
            .collect::<Result<_>>()?;
        let make = |d: &Device| -> Result<Vec<(String, Var)>> {
            init.iter()
                .enumerate()
                .map(|(i, t)| Ok((format!("p{i}"), Var::from_tensor(&t.to_device(d)?)?)))
                .collect()
        };
        let (pg, pc) = (make(&dev)?, make(&Device::Cpu)?);
        let mut og = Optimizer::new(&adamw(kind), pg.clone())?;
        let mut oc = Optimizer::new(&adamw(kind), pc.clone())?;
        for step in 0..20 {
            // Gradients of Σ r ⊙ p², with r scaled so the norm crosses the clip limit of 50.
            let scale = if step % 2 == 0 { 0.01 } else { 1.0 };
            let r: Vec<Tensor> = shapes
                .iter()
                .map(|s| Tensor::randn(0f32, scale, *s, &Device::Cpu))
                .collect::<Result<_>>()?;
            let loss = |ps: &[(String, Var)], d: &Device| -> Result<Tensor> {
                let mut l = Tensor::new(0f32, d)?;
                for ((_, p), r) in ps.iter().zip(&r) {
                    l = (l + (p.as_tensor().sqr()? * r.to_device(d)?)?.sum_all()?)?;
                }
                Ok(l)
            };
            let mut gg = loss(&pg, &dev)?.backward()?;
            let mut gc = loss(&pc, &Device::Cpu)?.backward()?;
            let ng = og.step(&mut gg, 1e-2, Some(50.0))?.value()?;
            let nc = oc.step(&mut gc, 1e-2, Some(50.0))?.value()?;
            assert!(
                (ng - nc).abs() <= 1e-5 * nc,
                "{kind} step {step}: norm {ng} vs {nc}"
            );
        }
        for ((name, a), (_, b)) in pg.iter().zip(&pc) {
            let d = rel_diff(a.as_tensor(), b.as_tensor());
            println!("{kind} {name}: {d:.2e}");
            assert!(d < 1e-4, "{kind} {name} differs by {d:.2e}");
        }
    }
    Ok(())
}

const TASKS: [TaskSpec; 1] = [TaskSpec {
    name: "gender",
    kind: TaskKind::Classification,
    outputs: 2,
    column: "gender",
    encoder: "gender",
}];

/// Losses of `steps` AdamW steps of a small cnn_light on fixed random data.
fn train_losses(dev: &Device, steps: usize) -> Result<Vec<f32>> {
    let shape = CnnLightShape {
        in_channels: 1,
        resolution: 32,
        stem: 8,
        channels: &[16, 32],
        layer_repeats: 2,
        embedding_dim: 32,
        activation: Activation::Gelu,
        // Dropout masks are a function of the seed, the same on both devices.
        dropout: 0.1,
    };
    let mut p = Params::new(7, dev);
    let model = Classifier::<CnnLight>::new(&shape, &TASKS, &mut p)?;
    let mut opt = Optimizer::new(&adamw("adamw"), p.trainable.clone())?;
    // The same data on both devices (Candle's randn is not seeded).
    let x: Vec<f32> = (0..16 * 32 * 32)
        .map(|i| ((i as f32 * 0.7548776).fract() - 0.5) * 3.0 + (i % 97) as f32 / 97.0 - 0.5)
        .collect();
    let x = Tensor::from_vec(x, (16, 1, 32, 32), &Device::Cpu)?;
    // The label is the sign of the mean of the top half: learnable.
    let labels: Vec<u32> = (0..16)
        .map(|i| {
            let row = x.get(i)?.narrow(1, 0, 16)?.mean_all()?.to_scalar::<f32>()?;
            Ok(u32::from(row > 0.0))
        })
        .collect::<Result<_>>()?;
    let (x, y) = (x.to_device(dev)?, Tensor::new(labels.as_slice(), dev)?);
    let mut losses = vec![];
    for step in 0..steps {
        let mut mode = Mode::train(step as u64);
        let out = &model.forward(&x, &mut mode)?[0];
        let logp = candle_nn::ops::log_softmax(out, D::Minus1)?;
        let loss = logp.gather(&y.unsqueeze(1)?, 1)?.neg()?.mean_all()?;
        let mut grads = loss.backward()?;
        opt.step(&mut grads, 3e-3, Some(1.0))?;
        losses.push(loss.to_scalar::<f32>()?);
    }
    Ok(losses)
}

/// 50 training steps (dropout 0.1) on the GPU (cuDNN convolutions, fused kernels, TF32 off) and
/// on the CPU follow the same trajectory, and the loss falls.
#[test]
#[ignore = "needs a GPU"]
fn fifty_training_steps_match_the_cpu() -> Result<()> {
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(false);
    let gpu_losses = train_losses(&gpu(), 50)?;
    let cpu_losses = train_losses(&Device::Cpu, 50)?;
    // Identical until the trajectories drift: the first 10 steps to 1e-3 relative, then every
    // loss within 1% of the initial loss (f32 sums in different orders, amplified by Adam's
    // normalisation: 2.5e-3 apart at loss 0.075 after 34 steps, measured on an H100).
    let start = cpu_losses[0];
    for (i, (g, c)) in gpu_losses.iter().zip(&cpu_losses).enumerate() {
        let tol = if i < 10 { 1e-3 * c.abs() } else { 1e-2 * start };
        assert!((g - c).abs() <= tol, "step {i}: GPU loss {g} vs CPU {c}");
    }
    println!("first {:?} last {:?}", &gpu_losses[..3], &gpu_losses[47..]);
    assert!(gpu_losses[49] < 0.5 * gpu_losses[0], "{gpu_losses:?}");
    Ok(())
}

/// A DiT of 2 blocks, 4 heads of 16, class conditioning, 64 tokens of 16×16×3 images.
fn small_dit() -> signal_diffusion_runtime::models::dit::DitShape {
    use signal_diffusion_runtime::models::dit::{Conditioning, DitShape};
    DitShape {
        in_channels: 3,
        out_channels: 3,
        height: 16,
        width: 16,
        patch: [2, 2],
        heads: 4,
        head_dim: 16,
        layers: 2,
        num_embeds: 5,
        conditioning: Conditioning::Classes { num_classes: 4 },
        norm_eps: 1e-5,
        dropout: 0.0,
        attention_bias: true,
        feed_forward: signal_diffusion_runtime::config::choice::FeedForward::GeluApproximate,
        norm_affine: false,
        upcast_attention: false,
    }
}

/// The losses of `updates` DiT training updates on `dev` under autocast `amp`: rectified flow
/// with soft-min-SNR weights (noise levels and noise from a seeded host RNG, the same on every
/// device), AdamW with clipping, and the fused EMA after each update.
fn dit_losses(dev: &Device, amp: Option<DType>, updates: u64) -> Result<Vec<f64>> {
    use rand::SeedableRng;
    use signal_diffusion_config::choice::Objective;
    use signal_diffusion_runtime::diffusion::denoiser::{Denoiser, DenoiserShape};
    use signal_diffusion_runtime::diffusion::ema::Ema;
    use signal_diffusion_runtime::diffusion::loss::{diffusion_grads, StepSpec};
    use signal_diffusion_runtime::diffusion::path::Path;
    use signal_diffusion_runtime::models::dit::Condition;
    let shape = small_dit();
    let mut p = Params::new(3, dev);
    let denoiser = Denoiser::new(&DenoiserShape::Dit(shape), &mut p, dev)?;
    let mut opt = Optimizer::new(&adamw("adamw"), p.trainable.clone())?;
    let params: Vec<Tensor> = p
        .trainable
        .iter()
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    let mut ema = Ema::new(&params, 0.999, 2.0 / 3.0, 1.0, 0, true)?;
    // Four images with a learnable structure, the same on both devices.
    let x: Vec<f32> = (0..4 * 3 * 16 * 16)
        .map(|i| ((i % 16) as f32 / 8.0 - 1.0) * if i % 768 < 384 { 1.0 } else { -1.0 })
        .collect();
    let x = Tensor::from_vec(x, (4, 3, 16, 16), dev)?;
    let cond = Condition {
        labels: vec![0, 1, 2, 3],
        ages: vec![f32::NAN; 4],
        texts: None,
    };
    let path = Path::flow(1000);
    let spec = StepSpec {
        path: &path,
        objective: Objective::VectorField,
        snr_gamma: Some(5.0),
        amp,
        checkpointing: false,
    };
    let mut losses = vec![];
    for update in 0..updates {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(update);
        let (loss, mut grads) = diffusion_grads(&denoiser, &x, &cond, &spec, (1.0, 1.0), &mut rng)
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        opt.step(&mut grads, 1e-3, Some(1.0))?;
        ema.update(&params, update + 1)?;
        losses.push(loss);
    }
    Ok(losses)
}

/// Thirty DiT training updates on the GPU (cuBLAS, our DiT kernels, the fused AdamW and EMA,
/// TF32 off) follow the CPU's: the first 10 losses within 1e-3 relative, then within 2 % of the
/// first five's mean (Adam amplifies summation-order differences, as in the classification run
/// above); under bf16 the GPU's first 10 losses stay within 5e-3 of its f32 ones (this run on
/// the CPU: 1.5e-4); and the loss falls (the last five's mean is 0.62 of the first five's on the
/// CPU; each update draws its own noise levels, so single losses vary twofold).
#[test]
#[ignore = "needs a GPU"]
fn dit_training_on_the_gpu_follows_the_cpu() -> Result<()> {
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(false);
    let dev = gpu();
    let cpu = dit_losses(&Device::Cpu, None, 30)?;
    let f32_gpu = dit_losses(&dev, None, 30)?;
    let bf16_gpu = dit_losses(&dev, Some(DType::BF16), 10)?;
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
    for (i, (g, c)) in f32_gpu.iter().zip(&cpu).enumerate() {
        let tol = if i < 10 {
            1e-3 * c
        } else {
            2e-2 * mean(&cpu[..5])
        };
        assert!((g - c).abs() <= tol, "update {i}: GPU loss {g} vs CPU {c}");
    }
    for (i, (b, g)) in bf16_gpu.iter().zip(&f32_gpu).enumerate() {
        assert!(
            (b - g).abs() <= 5e-3 * g,
            "update {i}: bf16 loss {b} vs f32 {g}"
        );
    }
    println!("DiT losses: CPU {cpu:?}\nGPU {f32_gpu:?}\nGPU bf16 {bf16_gpu:?}");
    assert!(
        mean(&f32_gpu[25..]) < 0.8 * mean(&f32_gpu[..5]),
        "the loss does not fall: {f32_gpu:?}"
    );
    Ok(())
}

/// Not a check: times each op of the classification baseline's stem and first block on the GPU
/// (batch 64), forward and backward, to show where a training step goes. Run with --nocapture.
#[test]
#[ignore = "needs a GPU; prints timings"]
fn op_timings() -> Result<()> {
    use std::time::Instant;
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(true);
    let dev = gpu();
    let time = |name: &str, f: &dyn Fn() -> Result<Tensor>| -> Result<()> {
        f()?;
        dev.synchronize()?;
        let t = Instant::now();
        for _ in 0..5 {
            f()?;
        }
        dev.synchronize()?;
        println!("{name:40} {:8.2} ms", t.elapsed().as_secs_f64() * 200.0);
        Ok(())
    };
    for (c_in, c, side) in [(1usize, 48usize, 256usize), (48, 96, 128), (96, 96, 128)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (64, c_in, side, side), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (c, c_in, 3, 3), &dev)?)?;
        let b = Tensor::randn(0f32, 0.1, c, &dev)?;
        let y = Tensor::randn(0f32, 1.0, (64, c, side, side), &dev)?;
        let tag = format!("{c_in}->{c} @{side}");
        let bv = Var::from_tensor(&b)?;
        time(&format!("conv+bias fwd {tag}"), &|| {
            signal_diffusion_runtime::ops::conv::conv(x.as_tensor(), w.as_tensor(), Some(&b), 1)
        })?;
        time(&format!("conv+bias fwd+bwd {tag}"), &|| {
            let out = signal_diffusion_runtime::ops::conv::conv(
                x.as_tensor(),
                w.as_tensor(),
                Some(bv.as_tensor()),
                1,
            )?;
            let g = out.backward()?; // ∂/∂out = 1, no reduction
            Ok(g.get(&w).unwrap().clone())
        })?;
        time(&format!("bias add {tag}"), &|| {
            y.broadcast_add(&b.reshape((1, c, 1, 1))?)
        })?;
        time(&format!("gelu (ours) {tag}"), &|| {
            signal_diffusion_runtime::ops::gelu::gelu(&y)
        })?;
        time(&format!("gelu fwd+bwd (ours) {tag}"), &|| {
            let yv = Var::from_tensor(&y)?;
            let g = signal_diffusion_runtime::ops::gelu::gelu(yv.as_tensor())?.backward()?;
            Ok(g.get(&yv).unwrap().clone())
        })?;
        time(&format!("gelu fwd+bwd (Candle) {tag}"), &|| {
            let yv = Var::from_tensor(&y)?;
            let g = yv.as_tensor().gelu_erf()?.backward()?;
            Ok(g.get(&yv).unwrap().clone())
        })?;
        let (gw, gb) = (
            Tensor::ones(c, DType::F32, &dev)?,
            Tensor::zeros(c, DType::F32, &dev)?,
        );
        time(&format!("group norm {tag}"), &|| group_norm(&y, &gw, &gb))?;
        time(&format!("group norm fwd+bwd {tag}"), &|| {
            let yv = Var::from_tensor(&y)?;
            let g = group_norm(yv.as_tensor(), &gw, &gb)?.backward()?;
            Ok(g.get(&yv).unwrap().clone())
        })?;
        time(&format!("avg_pool2d (Candle) {tag}"), &|| y.avg_pool2d(2))?;
        time(&format!("avg pool (ours) {tag}"), &|| {
            signal_diffusion_runtime::ops::pool::avg_pool(&y, 2, 2)
        })?;
        // A CNN block's tail, fwd+bwd: one pooling kernel each way (plus GELU's backward),
        // against our GELU and dropout kernels and Candle's pooling as separate ops.
        let tail = |fused: bool| -> Result<Tensor> {
            use signal_diffusion_runtime::ops;
            let yv = Var::from_tensor(&y)?;
            let out = match fused {
                true => ops::pool::gelu_dropout_avg_pool(yv.as_tensor(), 0.43, 7, 2, 2)?,
                false => ops::dropout::dropout(&ops::gelu::gelu(yv.as_tensor())?, 0.43, 7)?
                    .avg_pool2d(2)?,
            };
            let g = out.backward()?; // ∂/∂out = 1, no reduction
            Ok(g.get(&yv).unwrap().clone())
        };
        time(&format!("gelu+drop+pool fwd+bwd fused {tag}"), &|| {
            tail(true)
        })?;
        time(&format!("gelu+drop+pool fwd+bwd apart {tag}"), &|| {
            tail(false)
        })?;
        time(&format!("dropout {tag}"), &|| {
            signal_diffusion_runtime::models::nn::dropout(&y, 0.43, &mut Mode::train(1))
        })?;
        let yv = Var::from_tensor(&y)?;
        time(&format!("dropout fwd+bwd {tag}"), &|| {
            let out = signal_diffusion_runtime::models::nn::dropout(
                yv.as_tensor(),
                0.43,
                &mut Mode::train(1),
            )?;
            let g = out.backward()?; // ∂/∂out = 1, no reduction
            Ok(g.get(&yv).unwrap().clone())
        })?;
        time(&format!("copy {tag}"), &|| y.copy())?;
    }
    Ok(())
}

/// `op` of the same random inputs (`shapes`) on the CPU (our CPU ops) and the GPU (the kernels):
/// the outputs and the gradients of every input, from Σ out·r, within `tolerance` relative.
fn cpu_gpu_parity(
    name: &str,
    shapes: &[&[usize]],
    tolerance: f64,
    op: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    let dev = gpu();
    let host: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(0f32, 1.0, *s, &Device::Cpu))
        .collect::<Result<_>>()?;
    let run = |d: &Device, r: Option<&Tensor>| -> Result<(Tensor, Vec<Option<Tensor>>, Tensor)> {
        let vars: Vec<Var> = host
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(d)?))
            .collect::<Result<_>>()?;
        let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = op(&inputs)?;
        let r = match r {
            Some(r) => r.to_device(d)?,
            None => Tensor::randn(0f32, 1.0, out.shape(), d)?,
        };
        let grads = (&out * &r)?.sum_all()?.backward()?;
        let grads = vars.iter().map(|v| grads.get(v).cloned()).collect();
        Ok((out, grads, r))
    };
    let (out_c, grads_c, r) = run(&Device::Cpu, None)?;
    let (out_g, grads_g, _) = run(&dev, Some(&r))?;
    let mut worst = rel_diff(&out_g, &out_c);
    println!("{name}: forward {worst:.2e}");
    for (i, (g, c)) in grads_g.iter().zip(&grads_c).enumerate() {
        let (g, c) = match (g, c) {
            (Some(g), Some(c)) => (g, c),
            (None, None) => continue, // an input the op gives no gradient (a loss target)
            _ => panic!("{name}: input {i} has a gradient on one device only"),
        };
        let e = rel_diff(g, c);
        println!("{name}: gradient of input {i} {e:.2e}");
        worst = worst.max(e);
    }
    assert!(worst < tolerance, "{name}: {worst:.2e} ≥ {tolerance:.0e}");
    Ok(())
}

/// The DiT kernels (runtime/kernels/dit.cu) against our CPU ops, forward and every input's
/// gradient within 1e-5 relative (f32 both; the token sums run in another order): adaLN
/// modulate and the gated residual at DiT-S width 384 and at 24, over 37 tokens (not a multiple
/// of the kernels' 16-token blocks); GELU-tanh, plain and with a fused bias under each
/// autocast; softmax over rows of 257 and 1024; the weighted loss. And the bf16 product op
/// within 1e-2 (one bf16 ulp), attention in f32 (1e-4) and bf16 (3e-2).
#[test]
#[ignore = "needs a GPU"]
fn dit_kernels_match_the_cpu_ops() -> Result<()> {
    use signal_diffusion_runtime::ops::adaln::{gated_residual, modulate};
    for d in [384, 24] {
        cpu_gpu_parity("modulate", &[&[3, 37, d], &[3, d], &[3, d]], 1e-5, |t| {
            modulate(&t[0], 1e-6, &t[1], &t[2])
        })?;
        cpu_gpu_parity(
            "gated residual",
            &[&[3, 37, d], &[3, 37, d], &[3, d]],
            1e-5,
            |t| gated_residual(&t[0], &t[1], &t[2]),
        )?;
    }
    cpu_gpu_parity("gelu-tanh", &[&[7, 1000]], 1e-5, |t| {
        signal_diffusion_runtime::ops::gelu::gelu_tanh(&(&t[0] * 3.0)?)
    })?;
    for round in [None, Some(DType::BF16), Some(DType::F16)] {
        let name = format!("bias + gelu-tanh, autocast {round:?}");
        cpu_gpu_parity(&name, &[&[7, 1000], &[1000]], 1e-5, |t| {
            let _amp = Autocast::enter(round);
            signal_diffusion_runtime::ops::gelu::bias_gelu_tanh(&(&t[0] * 3.0)?, &t[1])
        })?;
    }
    // Attention: the CPU's fused op against the GPU's products around the softmax, recomputed
    // in the backward (300 tokens: the `_any` softmax), in f32 and bf16 (where the CPU's op
    // rounds only q, k, v and the output, the GPU's the scores and probabilities too).
    for (round, tolerance) in [(None, 1e-4), (Some(DType::BF16), 3e-2)] {
        let name = format!("attention, autocast {round:?}");
        cpu_gpu_parity(
            &name,
            &[&[2, 300, 96], &[2, 300, 96], &[2, 300, 96]],
            tolerance,
            |t| {
                let _amp = Autocast::enter(round);
                signal_diffusion_runtime::ops::attention::attention(&t[0], &t[1], &t[2], 4)
            },
        )?;
    }
    // The autocast product with a bias: cuBLAS in bf16 on the GPU, Candle's exact widening on
    // the CPU; the sums run in another order, so a result may round to the next bf16 value.
    cpu_gpu_parity(
        "bf16 product + bias",
        &[&[3, 37, 64], &[3, 64, 48], &[48]],
        1e-2,
        |t| {
            let _amp = Autocast::enter(Some(DType::BF16));
            signal_diffusion_runtime::ops::precision::matmul_add(&t[0], &t[1], &t[2])
        },
    )?;
    for n in [257, 1024] {
        cpu_gpu_parity("softmax", &[&[4, n]], 1e-5, |t| {
            signal_diffusion_runtime::ops::attention::softmax_last(&(&t[0] * 4.0)?)
        })?;
    }
    cpu_gpu_parity(
        "weighted MSE",
        &[&[3, 3, 16, 16], &[3, 3, 16, 16], &[3]],
        1e-5,
        |t| signal_diffusion_runtime::ops::loss::weighted_mse(&t[0], &t[1], &t[2].abs()?),
    )?;
    Ok(())
}

/// The fused EMA kernel (one launch, in place) against the CPU's tensor ops over 5 updates with
/// warm-up decays: within 1e-6 relative.
#[test]
#[ignore = "needs a GPU"]
fn fused_ema_matches_the_cpu() -> Result<()> {
    use signal_diffusion_runtime::diffusion::ema::Ema;
    let dev = gpu();
    let shapes: [&[usize]; 3] = [&[300, 70], &[70000], &[5]];
    let params: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(0f32, 1.0, *s, &Device::Cpu))
        .collect::<Result<_>>()?;
    let run = |d: &Device| -> Result<Vec<Tensor>> {
        let mut p: Vec<Tensor> = params
            .iter()
            .map(|t| t.to_device(d))
            .collect::<Result<_>>()?;
        let mut ema = Ema::new(&p, 0.999, 0.75, 1.0, 0, true)?;
        for step in 1..=5u64 {
            p = p
                .iter()
                .map(|t| t + 0.1 * step as f64)
                .collect::<Result<_>>()?;
            ema.update(&p, step)?;
        }
        Ok(ema.tensors)
    };
    let (cpu, gpu_ema) = (run(&Device::Cpu)?, run(&dev)?);
    for (g, c) in gpu_ema.iter().zip(&cpu) {
        let e = rel_diff(g, c);
        assert!(e < 1e-6, "EMA: {e:.2e}");
    }
    Ok(())
}

/// A whole DiT (classes, 2 blocks, 64 tokens) on the GPU against the CPU: the output and every
/// parameter's gradient within 1e-4 relative with TF32 off; and under bf16 autocast (real bf16
/// cuBLAS GEMMs) within 3e-2 of the f32 GPU run, as on the CPU (runtime/tests/dit.rs).
#[test]
#[ignore = "needs a GPU"]
fn dit_on_the_gpu_matches_the_cpu_and_bf16_stays_close() -> Result<()> {
    use signal_diffusion_runtime::models::dit::{Condition, Dit};
    use signal_diffusion_runtime::ops::precision::Autocast;
    let dev = gpu();
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(false);
    let s = small_dit();
    let x = Tensor::randn(0f32, 1.0, (3, 3, 16, 16), &Device::Cpu)?;
    let cond = Condition {
        labels: vec![0, 3, 4],
        ages: vec![f32::NAN; 3],
        texts: None,
    };
    let r = Tensor::randn(0f32, 1.0, (3, 3, 16, 16), &Device::Cpu)?;
    let run = |d: &Device, amp: Option<DType>| -> Result<(Tensor, Vec<Tensor>)> {
        let mut p = Params::new(3, d);
        let model = Dit::new(&s, &mut p, d)?;
        let _amp = Autocast::enter(amp);
        let out = model.forward(&x.to_device(d)?, &[5.0, 500.0, 999.0], &cond)?;
        let grads = (&out * r.to_device(d)?)?.sum_all()?.backward()?;
        let grads = p
            .trainable
            .iter()
            .filter(|(n, _)| !n.ends_with("to_k.bias")) // zero but for rounding (softmax shift)
            .map(|(_, v)| grads.get(v).unwrap().clone())
            .collect();
        Ok((out, grads))
    };
    let (out_c, grads_c) = run(&Device::Cpu, None)?;
    let (out_g, grads_g) = run(&dev, None)?;
    let (out_b, grads_b) = run(&dev, Some(DType::BF16))?;
    let mut worst = [rel_diff(&out_g, &out_c), rel_diff(&out_b, &out_g)];
    for ((c, g), b) in grads_c.iter().zip(&grads_g).zip(&grads_b) {
        worst[0] = worst[0].max(rel_diff(g, c));
        worst[1] = worst[1].max(rel_diff(b, g));
    }
    println!(
        "DiT: GPU vs CPU {:.2e}, bf16 vs f32 {:.2e}",
        worst[0], worst[1]
    );
    assert!(worst[0] < 1e-4, "GPU vs CPU {:.2e}", worst[0]);
    assert!(
        worst[1] > 0.0 && worst[1] < 3e-2,
        "bf16 vs f32 {:.2e}",
        worst[1]
    );
    Ok(())
}

/// The selective scan's kernels (scan.cu, state 16 specialised and 5 through `_any`) against the
/// CPU op: y and every input's gradient within 1e-5 relative, with and without the softplus, 40
/// channels per group (a full and a part-filled warp), 75 steps (across the 32-step tiles).
#[test]
#[ignore = "needs a GPU"]
fn selective_scan_kernels_equal_the_cpu_op() -> Result<()> {
    use signal_diffusion_runtime::ops::selective_scan::selective_scan;
    let dev = gpu();
    let (b, g, per_group, l) = (2usize, 3usize, 40usize, 75usize);
    let ch = g * per_group;
    let randn =
        |dims: &[usize], s: f64| Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?.affine(s, 0.0);
    for (n, softplus) in [(16usize, true), (5, true), (16, false)] {
        let (delta, bias) = match softplus {
            true => (randn(&[b, ch, l], 0.5)?, randn(&[ch], 0.2)?),
            false => (
                randn(&[b, ch, l], 1.0)?.abs()?.affine(0.1, 0.01)?,
                randn(&[ch], 0.05)?.abs()?,
            ),
        };
        let inputs = [
            randn(&[b, ch, l], 1.0)?,
            delta,
            randn(&[ch, n], 0.5)?.exp()?.neg()?,
            randn(&[b, g, n, l], 1.0)?,
            randn(&[b, g, n, l], 1.0)?,
            randn(&[ch], 1.0)?,
            bias,
        ];
        let r = randn(&[b, ch, l], 1.0)?;
        let run = |device: &Device| -> Result<(Tensor, Vec<Tensor>)> {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(&t.to_device(device)?))
                .collect::<Result<_>>()?;
            let t = |i: usize| vars[i].as_tensor();
            let y = selective_scan(t(0), t(1), t(2), t(3), t(4), t(5), t(6), softplus)?;
            let grads = (&y * r.to_device(device)?)?.sum_all()?.backward()?;
            let g = vars
                .iter()
                .map(|v| grads.get(v.as_tensor()).unwrap().clone())
                .collect();
            Ok((y, g))
        };
        let (want, want_grads) = run(&Device::Cpu)?;
        let (got, got_grads) = run(&dev)?;
        let mut errs = vec![rel_diff(&got, &want)];
        errs.extend(
            got_grads
                .iter()
                .zip(&want_grads)
                .map(|(a, b)| rel_diff(a, b)),
        );
        assert!(
            errs.iter().all(|e| *e < 1e-5),
            "N {n}, softplus {softplus}: y, ∂u, ∂Δ, ∂A, ∂B, ∂C, ∂D, ∂bias {errs:?}"
        );
    }
    Ok(())
}

/// LocalMamba on the GPU (the scan kernels, Candle's ops for the rest) equals the PyTorch port
/// of the reference on the same weights, as the CPU does (localmamba.rs): output, ∂x and every
/// parameter's gradient within 1e-4 of the largest value.
#[test]
#[ignore = "needs a GPU"]
fn localmamba_on_the_gpu_equals_the_reference_port() -> Result<()> {
    crate::localmamba::equals_the_reference_port(&gpu())
}

/// The neighbourhood-attention kernels (neighborhood.cu: heads of 8 with kernel 3 specialised,
/// 6 with kernel 5 through `_any`) against the CPU op on a 9×11 grid: the output and ∂q, ∂k, ∂v
/// within 1e-5 relative in f32, 1e-2 under bf16 autocast (both round the same f32 values).
#[test]
#[ignore = "needs a GPU"]
fn neighborhood_kernels_equal_the_cpu_op() -> Result<()> {
    use signal_diffusion_runtime::ops::neighborhood::neighborhood_attention;
    let dev = gpu();
    let (b, h, w, heads) = (2usize, 9usize, 11usize, 2usize);
    for (d, kernel, round, tol) in [
        (8usize, 3usize, None, 1e-5),
        (6, 5, None, 1e-5),
        (8, 3, Some(DType::BF16), 1e-2),
    ] {
        let shape = (b, h, w, heads * d);
        let inputs: Vec<Tensor> = (0..3)
            .map(|_| Tensor::randn(0f32, 1.0, shape, &Device::Cpu))
            .collect::<Result<_>>()?;
        let r = Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?;
        let run = |device: &Device| -> Result<Vec<Tensor>> {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(&t.to_device(device)?))
                .collect::<Result<_>>()?;
            let _amp = Autocast::enter(round);
            let (q, k, v) = (
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            );
            let o = neighborhood_attention(q, k, v, heads, kernel, 0.4)?;
            let grads = (&o * r.to_device(device)?)?.sum_all()?.backward()?;
            let mut out = vec![o];
            out.extend(
                vars.iter()
                    .map(|v| grads.get(v.as_tensor()).unwrap().clone()),
            );
            Ok(out)
        };
        let (want, got) = (run(&Device::Cpu)?, run(&dev)?);
        let errs: Vec<f64> = got.iter().zip(&want).map(|(a, b)| rel_diff(a, b)).collect();
        assert!(
            errs.iter().all(|e| *e < tol),
            "d {d}, kernel {kernel}, {round:?}: o, dq, dk, dv {errs:?}"
        );
    }
    Ok(())
}
