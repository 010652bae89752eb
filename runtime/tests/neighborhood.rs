//! Neighbourhood attention (ops/neighborhood.rs): NATTEN's window semantics (shifted inward at
//! the borders, never padded), and the fused CPU op's output and gradients against the same
//! attention written in Candle ops (gathered windows, Candle's autograd, in f64).

use candle_core::{DType, Device, Result, Tensor, Var};
use signal_diffusion_runtime::ops::attention::attention;
use signal_diffusion_runtime::ops::neighborhood::neighborhood_attention;

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// With q = 0 every window's probabilities are uniform, so each output is the mean of its
/// window's values: with v = (row, column), the window's centre. A corner query's window is
/// the k×k block in the corner (centre (3, 3) for k = 7), not a zero-padded one around it.
#[test]
fn each_query_averages_its_inward_shifted_window() -> Result<()> {
    let dev = Device::Cpu;
    let (h, w, k) = (9usize, 12usize, 7usize);
    let mut pos = vec![];
    for i in 0..h {
        for j in 0..w {
            pos.extend([i as f32, j as f32]);
        }
    }
    let v = Tensor::from_vec(pos, (1, h, w, 2), &dev)?;
    let q = Tensor::zeros((1, h, w, 2), DType::F32, &dev)?;
    let k_ = Tensor::randn(0f32, 1.0, (1, h, w, 2), &dev)?;
    let o = neighborhood_attention(&q, &k_, &v, 1, k, 1.0)?
        .squeeze(0)?
        .to_vec3::<f32>()?;
    // Window centres per axis, written out: 9 rows, 12 columns, k = 7.
    let rows = [3.0, 3.0, 3.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0];
    let cols = [3.0, 3.0, 3.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 8.0, 8.0, 8.0];
    for i in 0..h {
        for j in 0..w {
            let want = [rows[i], cols[j]];
            let got = &o[i][j];
            assert!(
                (got[0] - want[0]).abs() < 1e-5 && (got[1] - want[1]).abs() < 1e-5,
                "query ({i}, {j}): {got:?}, want {want:?}"
            );
        }
    }
    Ok(())
}

/// A window as large as the grid is global attention: equal to the attention op on the
/// flattened tokens.
#[test]
fn a_window_the_size_of_the_grid_is_global_attention() -> Result<()> {
    let dev = Device::Cpu;
    let (b, h, w, heads, d) = (2, 5, 5, 2, 8);
    let r = || Tensor::randn(0f32, 1.0, (b, h, w, heads * d), &dev);
    let (q, k, v) = (r()?, r()?, r()?);
    let na = neighborhood_attention(&q, &k, &v, heads, 5, 1.0 / (d as f64).sqrt())?;
    let flat = |t: &Tensor| t.reshape((b, h * w, heads * d));
    let global = attention(&flat(&q)?, &flat(&k)?, &flat(&v)?, heads)?;
    let e = max_diff(&na.reshape((b, h * w, heads * d))?, &global);
    assert!(e < 2e-6, "{e}");
    Ok(())
}

/// The fused CPU op (f32) against Candle's autograd through gathered windows (the f64 path of
/// the same function): outputs and ∂q, ∂k, ∂v within 2e-5 (f32 rounding of sums of 49–81
/// terms), on grids with borders on every side, several heads, a head size that is not a
/// multiple of the 16 lanes, kernels 3, 5 and 7.
#[test]
fn the_fused_op_equals_candle_ops_forward_and_backward() -> Result<()> {
    let dev = Device::Cpu;
    for (b, h, w, heads, d, kernel) in [
        (2, 9, 11, 2, 16, 7),
        (1, 8, 8, 1, 64, 7),
        (2, 6, 10, 3, 5, 3),
        (1, 5, 13, 2, 20, 5),
    ] {
        let scale = 0.7;
        let shape = (b, h, w, heads * d);
        let inputs: Vec<Tensor> = (0..3)
            .map(|_| Tensor::randn(0f32, 1.0, shape, &dev))
            .collect::<Result<_>>()?;
        let upstream = Tensor::randn(0f32, 1.0, shape, &dev)?;
        let run = |dtype: DType| -> Result<(Tensor, Vec<Tensor>)> {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(&t.to_dtype(dtype)?))
                .collect::<Result<_>>()?;
            let o = neighborhood_attention(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                heads,
                kernel,
                scale,
            )?;
            let grads = (&o * upstream.to_dtype(dtype)?)?.sum_all()?.backward()?;
            let g = vars
                .iter()
                .map(|v| grads.get(v).expect("a gradient").clone())
                .collect();
            Ok((o, g))
        };
        let (ours, our_grads) = run(DType::F32)?;
        let (theirs, their_grads) = run(DType::F64)?;
        let case = format!("{b}×{h}×{w}, {heads} heads of {d}, kernel {kernel}");
        let e = max_diff(&ours, &theirs);
        assert!(e < 2e-5, "{case}: output {e}");
        for (name, (g, want)) in ["q", "k", "v"]
            .iter()
            .zip(our_grads.iter().zip(&their_grads))
        {
            let e = max_diff(g, want);
            assert!(e < 2e-5, "{case}: ∂{name} {e}");
            assert!(
                max_diff(want, &want.zeros_like()?) > 1e-3,
                "{case}: ∂{name} is zero"
            );
        }
    }
    Ok(())
}

/// Bad shapes are errors that say what is expected, not panics.
#[test]
fn kernels_larger_than_the_grid_or_even_are_refused() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 5, 9, 4), DType::F32, &dev)?;
    for (kernel, heads) in [(7, 1), (4, 1), (3, 3)] {
        let err = neighborhood_attention(&x, &x, &x, heads, kernel, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("neighborhood attention"), "{err}");
    }
    Ok(())
}
