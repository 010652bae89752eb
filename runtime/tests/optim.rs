//! 8-bit AdamW: its quantisation against bitsandbytes' (fixtures/adamw_8bit, written by its
//! generate.py), its state size, its exact resume, and its steps against f32 AdamW's.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Result, Tensor, Var};
use signal_diffusion_config::choice::OptimizerName;
use signal_diffusion_config::schema;
use signal_diffusion_runtime::train::adamw_8bit::{
    quantize_block, BLOCK, MIN_8BIT_SIZE, SIGNED, UNSIGNED,
};
use signal_diffusion_runtime::train::optim::Optimizer;

use crate::common::randn;

fn fixture() -> HashMap<String, Tensor> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adamw_8bit/bnb.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn f32s(f: &HashMap<String, Tensor>, key: &str) -> Vec<f32> {
    f[key].to_vec1().unwrap()
}

/// The codes are bitsandbytes' `create_dynamic_map`, to the bit.
#[test]
fn dynamic_maps_equal_bitsandbytes() {
    let f = fixture();
    assert_eq!(f32s(&f, "signed_map"), SIGNED.codes.to_vec());
    assert_eq!(f32s(&f, "unsigned_map"), UNSIGNED.codes.to_vec());
}

/// Block-wise quantisation scales each block of 256 values by its largest magnitude, as
/// bitsandbytes' `quantize_blockwise`, and picks its codes, except that ours is always the
/// nearest code: bitsandbytes' CPU search (BinSearch's `Direct2`, a lookup grid) may return a
/// farther one where codes are closer than its grid (near zero) or a value is within rounding of
/// a midpoint. Where the two differ, ours is never farther from the value, and bitsandbytes'
/// error exceeds ours by less than 10⁻⁴ of the block's largest value; away from zero (at least
/// 1 % of the block's largest) nine codes in ten or more are the same.
#[test]
fn blockwise_quantisation_matches_bitsandbytes() {
    let f = fixture();
    let x = f32s(&f, "x");
    let squares: Vec<f32> = x.iter().map(|v| v * v).collect();
    for (values, map, name) in [
        (&x, &*SIGNED, "x_signed"),
        (&squares, &*UNSIGNED, "x_unsigned"),
    ] {
        let theirs: Vec<u8> = f[name].to_vec1().unwrap();
        let mut ours = vec![0u8; values.len()];
        let absmax: Vec<f32> = values
            .chunks(BLOCK)
            .zip(ours.chunks_mut(BLOCK))
            .map(|(v, q)| quantize_block(map, v, q))
            .collect();
        assert_eq!(
            absmax,
            f32s(&f, &format!("{name}_absmax")),
            "{name}: block scales"
        );
        let (mut large, mut large_same) = (0, 0);
        for (i, (&a, &b)) in ours.iter().zip(&theirs).enumerate() {
            let v = values[i] / absmax[i / BLOCK];
            let (ea, eb) = (
                (map.codes[a as usize] - v).abs(),
                (map.codes[b as usize] - v).abs(),
            );
            assert!(
                ea <= eb,
                "{name}[{i}] = {v}: our code {a} is farther than {b}"
            );
            assert!(
                eb - ea < 1e-4,
                "{name}[{i}] = {v}: code {a}, bitsandbytes {b}"
            );
            if v.abs() >= 0.01 {
                large += 1;
                large_same += usize::from(a == b);
            }
        }
        // Away from zero the grid resolves the codes: nearly all agree.
        assert!(
            large_same * 10 >= large * 9,
            "{name}: {large_same} of {large} codes agree"
        );
    }
}

fn config(name: OptimizerName) -> schema::Optimizer {
    schema::Optimizer {
        name,
        learning_rate: 1e-2,
        weight_decay: 1e-2,
        betas: [0.9, 0.999],
        eps: 1e-8,
        momentum: 0.9,
    }
}

/// A large weight (8-bit moments) and a small bias (f32 moments), with a fixed random init.
fn params() -> Result<Vec<(String, Var)>> {
    let (w, b) = (randn(&[64, 300], 1.0), randn(&[100], 1.0));
    Ok(vec![
        ("w".into(), Var::from_tensor(&w)?),
        ("b".into(), Var::from_tensor(&b)?),
    ])
}

/// A least-squares loss whose gradients differ in scale from value to value.
fn step(opt: &mut Optimizer, target: &[Tensor]) -> Result<f32> {
    let mut loss = Tensor::new(0f32, &Device::Cpu)?;
    for ((_, p), t) in opt.params().iter().zip(target) {
        loss = (loss + (p.as_tensor() - t)?.sqr()?.mean_all()?)?;
    }
    let grads = loss.backward()?;
    opt.update(&grads, 1e-2)?;
    loss.to_scalar()
}

fn values(opt: &Optimizer) -> Vec<Vec<f32>> {
    values_of(opt.params())
}

fn values_of(params: &[(String, Var)]) -> Vec<Vec<f32>> {
    params
        .iter()
        .map(|(_, p)| p.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn adamw_8bit_keeps_two_bytes_per_parameter_resumes_exactly_and_follows_f32_adamw() -> Result<()> {
    let dev = Device::Cpu;
    let target = [
        (randn(&[64, 300], 1.0)
            * Tensor::arange(0f32, 300.0, &dev)?
                .broadcast_as((64, 300))?
                .affine(1.0 / 300.0, 0.01)?)?,
        randn(&[100], 1.0),
    ];
    let init = params()?;
    let copy = |ps: &[(String, Var)]| -> Result<Vec<(String, Var)>> {
        ps.iter()
            .map(|(n, v)| Ok((n.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
            .collect()
    };

    // State: 2 bytes per weight value plus two f32 scales per 256, and f32 moments for the bias.
    let mut q = Optimizer::new(&config(OptimizerName::AdamW8bit), copy(&init)?)?;
    let weights: usize = 64 * 300;
    let want = 2 * weights + 8 * weights.div_ceil(256) + 8 * 100;
    assert_eq!(q.state_bytes(), want);
    let per_param = want as f64 / (weights + 100) as f64;
    assert!(per_param <= 2.1, "{per_param:.3} bytes per parameter");
    let f = Optimizer::new(&config(OptimizerName::AdamW), copy(&init)?)?;
    assert_eq!(f.state_bytes(), 8 * (weights + 100));

    // Against f32 AdamW from the same start: the loss falls as fast, the weights stay close.
    let mut f = f;
    let (mut loss_q, mut loss_f) = (0f32, 0f32);
    let first = step(&mut q, &target)?;
    step(&mut f, &target)?;
    for _ in 0..49 {
        loss_q = step(&mut q, &target)?;
        loss_f = step(&mut f, &target)?;
    }
    assert!(
        loss_q < 0.7 * first,
        "8-bit AdamW's loss {first} -> {loss_q}"
    );
    assert!(
        (loss_q - loss_f).abs() < 0.02 * loss_f,
        "loss after 50 steps: 8-bit {loss_q}, f32 {loss_f}"
    );
    // The distance between the two runs' weights, against how far f32 AdamW moved them.
    let start = values_of(&init);
    for ((a, b), s) in values(&q).iter().zip(values(&f)).zip(start) {
        let norm = |x: &[f32], y: &[f32]| {
            x.iter()
                .zip(y)
                .map(|(x, y)| (x - y).powi(2))
                .sum::<f32>()
                .sqrt()
        };
        let (apart, moved) = (norm(a, &b), norm(&b, &s));
        if s.len() < MIN_8BIT_SIZE {
            // A small tensor keeps f32 moments: it follows AdamW exactly.
            assert_eq!(a, &b);
        }
        assert!(
            apart < 0.05 * moved,
            "8-bit weights {apart} from f32 ones, which moved {moved}"
        );
    }

    // Resume: a fresh optimizer loaded with the saved state (through safetensors, as a
    // checkpoint) continues bit for bit.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("optimizer.safetensors");
    candle_core::safetensors::save(&q.state()?, &file)?;
    let mut resumed = Optimizer::new(&config(OptimizerName::AdamW8bit), copy(q.params())?)?;
    let loaded = candle_core::safetensors::load(&file, &dev)?;
    resumed.load_state(&loaded, q.step).unwrap();
    for _ in 0..5 {
        step(&mut q, &target)?;
        step(&mut resumed, &target)?;
    }
    assert_eq!(values(&q), values(&resumed));

    // The state of another optimizer is refused, naming the tensor.
    let mut plain = Optimizer::new(&config(OptimizerName::AdamW), copy(&init)?)?;
    let err = plain.load_state(&loaded, 50).unwrap_err().to_string();
    assert!(
        err.contains("optimizer state `m.w`") && err.contains("U8"),
        "{err}"
    );
    Ok(())
}

/// The hourglass models' four groups (models::hourglass::param_group): one AdamW step from
/// gradient g moves θ to θ(1 − lr_g·wd_g) − lr_g·g/(|g| + ε), with lr_g a third of the
/// learning rate for mapping parameters and wd_g zero off the tagged weights: checked against
/// that closed form for one parameter of each group.
#[test]
fn parameter_groups_scale_the_learning_rate_and_switch_decay() -> Result<()> {
    use signal_diffusion_runtime::models::hourglass::param_group;
    use signal_diffusion_runtime::train::optim::Group;
    let names = [
        ("down_levels.0.0.self_attn.qkv_proj.weight", 1.0, 1e-2), // decayed
        ("down_levels.0.0.self_attn.scale", 1.0, 0.0),            // not decayed
        ("mapping.blocks.0.up_proj.weight", 1.0 / 3.0, 1e-2),     // mapping, decayed
        ("mapping.in_norm.scale", 1.0 / 3.0, 0.0),                // mapping, not decayed
    ];
    let params: Vec<(String, Var)> = names
        .iter()
        .map(|(n, _, _)| Ok((n.to_string(), Var::from_tensor(&randn(&[8], 1.0))?)))
        .collect::<Result<_>>()?;
    let before = values_of(&params);
    let mut opt = Optimizer::new(&config(OptimizerName::AdamW), params)?
        .with_groups(|name| Group::from(param_group(name)));
    let grads_of: Vec<Tensor> = (0..names.len()).map(|_| randn(&[8], 1.0)).collect();
    let mut loss = Tensor::new(0f32, &Device::Cpu)?;
    for ((_, p), g) in opt.params().iter().zip(&grads_of) {
        loss = (loss + (p.as_tensor() * g)?.sum_all()?)?;
    }
    opt.update(&loss.backward()?, 1e-2)?;
    for (i, (name, scale, wd)) in names.iter().enumerate() {
        let lr = 1e-2 * scale;
        let g = grads_of[i].to_vec1::<f32>()?;
        let after = &values(&opt)[i];
        for j in 0..8 {
            let want = before[i][j] as f64 * (1.0 - lr * wd)
                - lr * g[j] as f64 / ((g[j] as f64).abs() + 1e-8);
            assert!(
                (after[j] as f64 - want).abs() < 1e-6,
                "{name}[{j}]: {} vs {want}",
                after[j]
            );
        }
    }
    Ok(())
}
