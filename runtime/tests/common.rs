//! What several test files share.

use candle_core::{Device, Tensor};

/// Normal values from a seeded stream: each test (its own thread) draws the same inputs on
/// every run, its k-th call from seed k, so a tolerance that holds once holds always.
pub fn randn(shape: &[usize], std: f64) -> Tensor {
    use rand::SeedableRng;
    thread_local!(static CALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });
    let k = CALLS.with(|c| c.replace(c.get() + 1));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed_0000 + k);
    let n = shape.iter().product();
    let v: Vec<f32> = signal_diffusion_runtime::diffusion::path::normals(&mut rng, n)
        .into_iter()
        .map(|x| x * std as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The rows of a CSV file, split at commas (the preprocessed metadata has no quoted fields).
pub fn rows(path: &std::path::Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(String::from).collect())
        .collect()
}

/// Moves every trainable parameter off its initial value (N(0, 0.05²) added), as a first
/// training step does: a zero-initialised projection would otherwise block the gradient of
/// everything before it.
pub fn perturb(p: &signal_diffusion_runtime::models::nn::Params) {
    for (_, var) in &p.trainable {
        var.set(&(var.as_tensor() + randn(var.dims(), 0.05)).unwrap())
            .unwrap();
    }
}

/// Every trainable parameter of `p` has a finite, non-zero gradient in `grads` (Candle's fused
/// norms and softmax would drop some silently).
pub fn assert_every_gradient(
    p: &signal_diffusion_runtime::models::nn::Params,
    grads: &candle_core::backprop::GradStore,
) {
    assert!(!p.trainable.is_empty());
    for (name, var) in &p.trainable {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .and_then(|g| g.sum_all())
            .and_then(|g| g.to_dtype(candle_core::DType::F64))
            .and_then(|g| g.to_scalar::<f64>())
            .unwrap();
        assert!(norm.is_finite() && norm > 0.0, "{name}: |g|² = {norm}");
    }
}

/// Gradient checkpointing changes no gradient: `run(checkpoint)` gives (loss, gradients) of the
/// same forward (the same dropout draws) recorded with and without it; every trainable
/// parameter's gradient agrees within `tol` of its largest magnitude (the recompute sums in
/// another order), and so do the losses.
pub fn assert_checkpointing_keeps_gradients(
    p: &signal_diffusion_runtime::models::nn::Params,
    run: impl Fn(bool) -> candle_core::Result<(Tensor, candle_core::backprop::GradStore)>,
    tol: f32,
) {
    let (plain_loss, plain) = run(false).unwrap();
    let (loss, checkpointed) = run(true).unwrap();
    let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap();
    assert!((scalar(&plain_loss) - scalar(&loss)).abs() <= tol * scalar(&plain_loss).abs());
    for (name, var) in &p.trainable {
        let a = plain.get(var.as_tensor()).unwrap();
        let b = checkpointed
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no checkpointed gradient for {name}"));
        let scale = scalar(&a.abs().unwrap().max_all().unwrap()).max(1e-12);
        let diff = scalar(&(a - b).unwrap().abs().unwrap().max_all().unwrap());
        assert!(
            diff <= tol * scale,
            "{name}: differs by {diff} (largest {scale})"
        );
    }
}

/// The largest |value| of an f32 tensor.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The largest |a − b| of two f32 tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap())
}

/// A PyTorch model's fixture (`fixtures/<path>`, as fixtures/hourglass/generate.py writes one:
/// its state dict under its own names, the inputs x, sigma, class_cond, mapping_cond and r, the
/// output, and `grad.<name>` of sum(output · r) for every parameter and for x) against ours,
/// built into `p` and run by `forward(x, sigma, class, mapping_cond)`: the same state-dict names
/// one to one, loaded by name, then the same output, ∂x and gradient of every parameter, each
/// within `tol` of the fixture's largest |value|, on the device `p` holds its tensors on. Returns
/// the worst of those relative errors.
pub fn assert_equals_fixture(
    path: &str,
    p: &signal_diffusion_runtime::models::nn::Params,
    forward: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
    tol: f32,
) -> candle_core::Result<f32> {
    let full = format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    let device = match p.trainable.first() {
        Some((_, v)) => v.device().clone(),
        None => Device::Cpu,
    };
    let fixture = candle_core::safetensors::load(full, &device)?;
    let inputs = ["x", "sigma", "class_cond", "mapping_cond", "r", "output"];
    let state = fixture
        .keys()
        .filter(|k| !k.starts_with("grad.") && !inputs.contains(&k.as_str()))
        .count();
    assert_eq!(
        state,
        p.trainable.len() + p.buffers.len(),
        "{path}: state-dict sizes differ"
    );
    for (name, var) in p.trainable.iter().chain(&p.buffers) {
        let t = fixture
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not in {path}'s state dict"));
        var.set(t)?;
    }
    let x = candle_core::Var::from_tensor(&fixture["x"])?;
    let class = fixture["class_cond"].to_dtype(candle_core::DType::U32)?;
    let y = forward(
        x.as_tensor(),
        &fixture["sigma"],
        &class,
        &fixture["mapping_cond"],
    )?;
    let mut worst = 0f32;
    let mut close = |ours: &Tensor, theirs: &Tensor, what: &str| {
        let err = max_abs_diff(ours, theirs) / max_abs(theirs).max(1e-6);
        assert!(err < tol, "{path}, {what}: relative error {err}");
        worst = worst.max(err);
    };
    close(&y, &fixture["output"], "output");
    let grads = (y * &fixture["r"])?.sum_all()?.backward()?;
    close(
        grads.get(x.as_tensor()).expect("∂x"),
        &fixture["grad.x"],
        "∂x",
    );
    for (name, var) in &p.trainable {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        close(g, &fixture[&format!("grad.{name}")], name);
    }
    eprintln!("{path}: worst relative error {worst:e}");
    Ok(worst)
}

/// One backward of sum(out · fixture["upstream"]) against the fixture's `grad.<name>`: exactly
/// the tensors of `trained` have one there (no more, no fewer), and each gradient is within `tol`
/// of the larger of the fixture's largest |value| and `floor` (a parameter whose true gradient is
/// zero, as a key bias's, holds rounding noise on both sides); a tensor without a gradient passes
/// only where the fixture's is zero (a query no output reads). Returns the gradients.
pub fn assert_gradients_equal_fixture(
    out: &Tensor,
    fixture: &std::collections::HashMap<String, Tensor>,
    trained: &[(String, candle_core::Var)],
    (tol, floor): (f32, f32),
) -> candle_core::backprop::GradStore {
    let ours: std::collections::BTreeSet<&str> = trained.iter().map(|(n, _)| n.as_str()).collect();
    let theirs: std::collections::BTreeSet<&str> = fixture
        .keys()
        .filter_map(|k| k.strip_prefix("grad."))
        .collect();
    assert_eq!(ours, theirs, "the trained tensors differ");
    let grads = (out * &fixture["upstream"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in trained {
        let want = &fixture[&format!("grad.{name}")];
        let Some(got) = grads.get(var) else {
            assert_eq!(max_abs(want), 0.0, "{name}: no gradient");
            continue;
        };
        let rel = max_abs_diff(got, want) / max_abs(want).max(floor);
        assert!(rel < tol, "{name}: gradient off by {rel} relative");
    }
    grads
}

/// A `[model.lora]` of rank 2, α 3 (scale 1.5), as the PEFT fixtures are written.
pub fn lora_spec(
    targets: &[&str],
    bias: signal_diffusion_runtime::config::choice::LoraBias,
    dropout: f64,
) -> signal_diffusion_runtime::models::lora::LoraSpec {
    signal_diffusion_runtime::models::lora::LoraSpec {
        rank: 2,
        alpha: 3.0,
        scale: 1.5,
        dropout,
        target_modules: targets.iter().map(|t| t.to_string()).collect(),
        bias,
    }
}

/// PEFT trains exactly what we train, and one backward of sum(out · upstream) gives every trained
/// tensor PEFT's gradient within 1e-4 relative (to at least 1e-2: the key bias's true gradient is
/// zero, softmax ignoring a shift common to all keys, so both sides hold rounding noise there);
/// the frozen weights get no gradient at all; and the adapters save under the keys PEFT writes.
pub fn assert_trains_as_peft(
    p: &signal_diffusion_runtime::models::nn::Params,
    out: &Tensor,
    saved: &std::collections::HashMap<String, Tensor>,
) {
    let grads = assert_gradients_equal_fixture(out, saved, &p.trainable, (1e-4, 1e-2));
    for (name, var) in &p.frozen {
        assert!(grads.get(var).is_none(), "frozen {name} got a gradient");
    }
    let trained = trained_values(p);
    let keys: std::collections::BTreeSet<String> =
        signal_diffusion_runtime::models::lora::peft_state(p.lora().unwrap(), &trained)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
    let bytes: Vec<u8> = saved["peft_keys"].to_vec1().unwrap();
    let want: std::collections::BTreeSet<String> = String::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(keys, want);
}

/// The trainable tensors by name, as they are now.
pub fn trained_values(p: &signal_diffusion_runtime::models::nn::Params) -> Vec<(String, Tensor)> {
    p.trainable
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

/// A model built into fresh parameters by `build`, its weights (and buffers) loaded from the
/// fixture `saved`: plain, or with LoRA on `lora_targets`, each B set to 0.01 so that every
/// adapter's gradient is not trivial. For the checkpointing tests.
pub fn model_from_fixture<M>(
    lora_targets: Option<&[&str]>,
    saved: &std::collections::HashMap<String, Tensor>,
    build: impl FnOnce(&mut signal_diffusion_runtime::models::nn::Params) -> M,
) -> (signal_diffusion_runtime::models::nn::Params, M) {
    use signal_diffusion_runtime::models::nn::Params;
    let mut p = match lora_targets {
        Some(targets) => Params::with_lora(
            0,
            &Device::Cpu,
            lora_spec(
                targets,
                signal_diffusion_runtime::config::choice::LoraBias::None,
                0.0,
            ),
        ),
        None => Params::new(0, &Device::Cpu),
    };
    let model = build(&mut p);
    for vars in [&p.frozen, &p.trainable, &p.buffers] {
        let base: Vec<_> = vars
            .iter()
            .filter(|(n, _)| !n.contains(".lora_") && saved.contains_key(n))
            .cloned()
            .collect();
        signal_diffusion_runtime::train::checkpoint::restore(&base, saved).unwrap();
    }
    for (n, v) in &p.trainable {
        if n.contains(".lora_B") {
            v.set(&(v.as_tensor() + 0.01).unwrap()).unwrap();
        }
    }
    (p, model)
}

/// A checkpointed backward's (loss, gradients) against the plain one's: the loss within 1e-5
/// relative, every trainable tensor's gradient within 1e-4 of its largest (the same numbers up to
/// summation order).
pub fn assert_checkpointed_equals_plain(
    p: &signal_diffusion_runtime::models::nn::Params,
    plain: (&Tensor, &candle_core::backprop::GradStore),
    checkpointed: (&Tensor, &candle_core::backprop::GradStore),
    what: &str,
) {
    let (a, b): (f32, f32) = (
        checkpointed.0.to_scalar().unwrap(),
        plain.0.to_scalar().unwrap(),
    );
    assert!(
        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
        "{what}: loss {a} vs {b}"
    );
    for (name, var) in &p.trainable {
        let (g, want) = (checkpointed.1.get(var).unwrap(), plain.1.get(var).unwrap());
        let rel = max_abs_diff(g, want) / max_abs(want).max(1e-12);
        assert!(
            rel < 1e-4,
            "{what}, {name}: checkpointed gradient off by {rel}"
        );
    }
}
