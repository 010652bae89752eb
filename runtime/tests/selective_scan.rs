//! The selective scan (ops/selective_scan.rs) against mamba-ssm's own `selective_scan_ref`
//! (fixtures/selective_scan/generate.py): output and the gradient of every input, with and
//! without the softplus, over a length that crosses the backward's chunks.

use candle_core::{Device, Result, Tensor, Var};
use signal_diffusion_runtime::ops::selective_scan::selective_scan;

const INPUTS: [&str; 7] = ["u", "delta", "A", "B", "C", "D", "delta_bias"];

/// Within 2e-6 of the largest value (measured: 4.6e-7 at worst; both are f32, the reference's
/// einsums summing in another order).
#[test]
fn equals_mamba_ssms_reference_forward_and_backward() -> Result<()> {
    let dev = Device::Cpu;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/selective_scan/selective_scan.safetensors"
    );
    let fixture = candle_core::safetensors::load(path, &dev)?;
    for (case, softplus) in [("softplus", true), ("raw", false)] {
        let get = |name: &str| fixture[&format!("{case}.{name}")].clone();
        let vars: Vec<Var> = INPUTS
            .iter()
            .map(|n| Var::from_tensor(&get(n)))
            .collect::<Result<_>>()?;
        let t = |i: usize| vars[i].as_tensor();
        let y = selective_scan(t(0), t(1), t(2), t(3), t(4), t(5), t(6), softplus)?;
        let close = |ours: &Tensor, theirs: &Tensor, what: &str| -> Result<()> {
            let scale = theirs.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
            let err = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
            assert!(err < 2e-6, "{case} {what}: relative error {err}");
            Ok(())
        };
        close(&y, &get("output"), "output")?;
        let grads = (y * get("r"))?.sum_all()?.backward()?;
        for (name, var) in INPUTS.iter().zip(&vars) {
            let g = grads.get(var.as_tensor()).expect("a gradient");
            close(g, &get(&format!("grad.{name}")), &format!("∂{name}"))?;
        }
    }
    Ok(())
}

/// Inputs of the wrong shape are errors naming the input, not panics.
#[test]
fn mismatched_shapes_are_refused_by_name() -> Result<()> {
    let dev = Device::Cpu;
    let z = |dims: &[usize]| Tensor::zeros(dims, candle_core::DType::F32, &dev);
    let (u, a, bc, d) = (z(&[1, 4, 8])?, z(&[4, 3])?, z(&[1, 2, 3, 8])?, z(&[4])?);
    let err = selective_scan(&u, &z(&[1, 4, 7])?, &a, &bc, &bc, &d, &d, true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("delta is [1, 4, 7], expected [1, 4, 8]"),
        "{err}"
    );
    let err = selective_scan(
        &u,
        &u,
        &a,
        &z(&[1, 3, 3, 8])?,
        &z(&[1, 3, 3, 8])?,
        &d,
        &d,
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("4 channels in 3 groups"), "{err}");
    Ok(())
}
