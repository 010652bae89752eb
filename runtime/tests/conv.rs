//! The convolution kernels against the im2col + GEMM reference at every shape the shipped
//! classification presets use (read from their plans, as the conv bench times them).

use candle_core::{Device, Tensor, Var};
use signal_diffusion_runtime::ops::conv::{conv_with, ConvAlgorithm};

#[path = "../benches/common/preset_convs.rs"]
mod preset_convs;

/// Every preset convolution the plan gives to Winograd equals im2col + GEMM in f64 within 1e-10
/// of the largest value: output, input gradient, filter and bias gradients.
#[test]
fn winograd_equals_im2col_at_every_preset_shape() {
    let dev = Device::Cpu;
    let shapes: Vec<_> = preset_convs::shapes()
        .into_iter()
        .filter(|&(c, o, k, side)| {
            ConvAlgorithm::for_shape(c, o, k, side) == ConvAlgorithm::WinogradF4x3
        })
        .collect();
    // The baseline's 96 → 96 at 128² and 384 → 384 at 32² among them.
    assert!(shapes.len() >= 10, "{shapes:?}");
    for (c, o, _, [h, w]) in shapes {
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (1, c, h, w), &dev).unwrap()).unwrap();
        let wt = Var::from_tensor(&Tensor::randn(0f64, 1.0, (o, c, 3, 3), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, o, &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f64, 1.0, (1, o, h, w), &dev).unwrap();
        let run = |algorithm| {
            let y = conv_with(
                x.as_tensor(),
                wt.as_tensor(),
                Some(b.as_tensor()),
                1,
                algorithm,
            )
            .unwrap();
            let g = (&y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grad = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
            [y, grad(&x), grad(&wt), grad(&b)]
        };
        let ours = run(ConvAlgorithm::WinogradF4x3);
        let reference = run(ConvAlgorithm::Im2colGemm);
        for ((a, r), what) in ours.iter().zip(&reference).zip(["y", "dx", "dw", "db"]) {
            let max = |t: Tensor| {
                t.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let d = max((a - r).unwrap()) / max(r.clone());
            assert!(
                d < 1e-10,
                "{c}->{o} at {h}x{w}: {what} off by {d} of its largest"
            );
        }
    }
}
