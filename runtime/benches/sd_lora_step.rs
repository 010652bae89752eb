//! One training step of Stable Diffusion's denoisers on the CPU, for benches/sd_lora_step.py,
//! which times the same step in diffusers + PEFT: the SD 1.5 UNet or the SD 3.5 MMDiT built from
//! a diffusers config.json with random weights, through rank-R LoRA adapters on the attention
//! projections (R 0: a full fine-tune), on one random batch: forward, MSE against a random
//! target, backward, clipped AdamW (lr 1e-4) on what trains. One warm-up step, then `steps`
//! timed. Prints one JSON line: images/s, parameters, trained parameters.
//! `cargo bench -p signal-diffusion-runtime --bench sd_lora_step -- <unet|mmdit> <config.json>
//! <batch> <rank> <steps> [text tokens] [--checkpointing]` (the UNet's per-block gradient
//! checkpointing).

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor};
use signal_diffusion_runtime::config::choice::{LoraBias, OptimizerName};
use signal_diffusion_runtime::config::pretrained::{parse_mmdit, parse_unet};
use signal_diffusion_runtime::config::schema;
use signal_diffusion_runtime::models::lora::LoraSpec;
use signal_diffusion_runtime::models::mmdit::Mmdit;
use signal_diffusion_runtime::models::nn::Params;
use signal_diffusion_runtime::models::unet::Unet;
use signal_diffusion_runtime::train::optim::Optimizer;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let [kind, config, batch, rank, steps, ..] = args.as_slice() else {
        panic!(
            "usage: sd_lora_step <unet|mmdit> <config.json> <batch> <rank> <steps> [text tokens]"
        );
    };
    let (batch, rank, steps): (usize, usize, usize) = (
        batch.parse().unwrap(),
        rank.parse().unwrap(),
        steps.parse().unwrap(),
    );
    let text_tokens: usize = args.get(5).map_or(77, |t| t.parse().unwrap());
    let text = std::fs::read_to_string(config).expect("the config.json");
    let dir = std::path::Path::new(config).parent().unwrap();
    let dev = Device::Cpu;
    // What diffusers' SD LoRA training scripts adapt: every attention projection.
    let targets: &[&str] = match kind.as_str() {
        "unet" => &signal_diffusion_runtime::models::unet::LORA_TARGETS,
        _ => &signal_diffusion_runtime::models::mmdit::LORA_TARGETS,
    };
    let mut p = match rank {
        0 => Params::new(0, &dev),
        r => Params::with_lora(
            0,
            &dev,
            LoraSpec {
                rank: r,
                alpha: r as f64,
                scale: 1.0,
                dropout: 0.0,
                target_modules: targets.iter().map(|t| t.to_string()).collect(),
                bias: LoraBias::None,
            },
        ),
    };
    let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev);
    let t: Vec<f32> = (0..batch).map(|i| (37 + 311 * i % 1000) as f32).collect();
    let checkpointing = std::env::args().any(|a| a == "--checkpointing");
    // The loss of the forward against a target, and its gradients.
    type LossAndGrads<'a> = Box<dyn Fn(&Tensor) -> Result<(Tensor, GradStore)> + 'a>;
    let mse = |out: &Tensor, target: &Tensor| (out - target)?.sqr()?.mean_all();
    let forward: Box<dyn Fn() -> Result<Tensor>>;
    let step_grads: LossAndGrads;
    match kind.as_str() {
        "unet" => {
            let s = parse_unet(&text, dir).expect("a UNet config");
            let model = std::rc::Rc::new(Unet::new(&s, &mut p)?);
            let x = randn(&[batch, s.in_channels, s.sample_size, s.sample_size])?;
            let context = randn(&[batch, text_tokens, s.cross_attention_dim])?;
            let (m, x2, c2, t2) = (model.clone(), x.clone(), context.clone(), t.clone());
            forward = Box::new(move || m.forward(&x2, &t2, &c2));
            step_grads = Box::new(move |target: &Tensor| match checkpointing {
                true => model.checkpointed_backward(&x, &t, &context, |out| mse(out, target)),
                false => {
                    let loss = mse(&model.forward(&x, &t, &context)?, target)?;
                    let grads = loss.backward()?;
                    Ok((loss, grads))
                }
            });
        }
        _ => {
            let s = parse_mmdit(&text, dir).expect("an SD3 transformer config");
            let model = Mmdit::new(&s, &mut p, &dev)?;
            let x = randn(&[batch, s.in_channels, s.sample_size, s.sample_size])?;
            let context = randn(&[batch, text_tokens, s.joint_attention_dim])?;
            let pooled = randn(&[batch, s.pooled_projection_dim])?;
            let f: std::rc::Rc<dyn Fn() -> Result<Tensor>> =
                std::rc::Rc::new(move || model.forward(&x, &t, &context, &pooled));
            let g = f.clone();
            forward = Box::new(move || f());
            step_grads = Box::new(move |target: &Tensor| {
                let loss = mse(&g()?, target)?;
                let grads = loss.backward()?;
                Ok((loss, grads))
            });
        }
    }
    let params = p.count();
    let trained = p.trainable_count();
    let cfg = schema::Optimizer {
        name: OptimizerName::AdamW,
        learning_rate: 1e-4,
        weight_decay: 0.0,
        betas: [0.9, 0.999],
        eps: 1e-8,
        momentum: 0.0,
    };
    let mut opt = Optimizer::new(&cfg, p.trainable.clone())?;
    let target = forward()?.randn_like(0.0, 1.0)?;
    let mut step = || -> Result<()> {
        let (_, mut grads) = step_grads(&target)?;
        opt.step(&mut grads, 1e-4, Some(1.0))?;
        Ok(())
    };
    step()?;
    let start = Instant::now();
    for _ in 0..steps {
        step()?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"images_per_s\": {:.4}, \"params\": {params}, \"trained\": {trained}}}",
        (steps * batch) as f64 / secs
    );
    Ok(())
}
