//! The CPU convolutions of ops/conv.rs at the classification baseline's shapes (cnn_light E 384:
//! the 5×5 stem and the 3×3 convolutions of its three blocks), batch 8: forward, filter
//! gradient, and input gradient, each in GFLOP/s (2·B·O·C·kh·kw·Ho·Wo per pass). The filter
//! gradient is timed with a constant input (no input gradient), less the forward and the loss
//! (a product with a random upstream gradient, summed); the input gradient is the backward
//! with a variable input less that.
//! `cargo bench -p signal-diffusion-runtime --bench conv`

mod common;

use candle_core::{Device, Tensor, Var};
use signal_diffusion_runtime::ops::conv::conv;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let batch = 8;
    // (input channels, output channels, side, kernel)
    let cases = [
        (1, 48, 256, 5),
        (48, 96, 128, 3),
        (96, 96, 128, 3),
        (96, 192, 64, 3),
        (192, 192, 64, 3),
        (192, 384, 32, 3),
        (384, 384, 32, 3),
    ];
    // Each rate also as a share of the f32 FMA peak on Candle's threads, at the widest unit
    // the kernels may use (runtime/benches/fma_peak.rs measures them all).
    let peak = common::Isa::of_kernels().map(|isa| {
        let threads = candle_core::utils::get_num_threads();
        let peak = common::fma_peak(isa, false, threads);
        println!(
            "f32 FMA peak ({}, {threads} threads, measured): {peak:.1} GFLOP/s",
            isa.name()
        );
        peak
    });
    println!(
        "{:<22} {:>16} {:>16} {:>16}",
        "conv (batch 8), GFLOP/s", "forward", "∂W", "∂X"
    );
    let mut total = [0f64; 3];
    for (c, o, side, k) in cases {
        let x = Tensor::randn(0f32, 1.0, (batch, c, side, side), &dev)?;
        let xv = Var::from_tensor(&x)?;
        let w = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (o, c, k, k), &dev)? * 0.1)?)?;
        let upstream = Tensor::randn(0f32, 1.0, (batch, o, side, side), &dev)?;
        let pad = k / 2;
        let forward = common::median_seconds(|| {
            conv(&x, w.as_tensor(), None, pad).unwrap();
        });
        let backward = |input: &Tensor| {
            let y = conv(input, w.as_tensor(), None, pad).unwrap();
            (&y * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
        };
        // The loss's own forward and backward at the output's size (two full-size tensors),
        // subtracted from the backward timings below.
        let output = Var::from_tensor(&upstream.zeros_like()?)?;
        let loss = common::median_seconds(|| {
            (output.as_tensor() * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
        });
        let filter = common::median_seconds(|| backward(&x)) - forward - loss;
        let data = common::median_seconds(|| backward(xv.as_tensor())) - forward - loss - filter;
        let gflop = 2.0 * (batch * o * c * k * k * side * side) as f64 / 1e9;
        let rate = |s: f64| match peak {
            Some(p) => format!("{:.1} ({:.0} %)", gflop / s, 100.0 * gflop / s / p),
            None => format!("{:.1}", gflop / s),
        };
        println!(
            "{:<22} {:>16} {:>16} {:>16}",
            format!("{c}->{o} {k}x{k} @{side}²"),
            rate(forward),
            rate(filter),
            rate(data)
        );
        for (t, s) in total.iter_mut().zip([forward, filter, data]) {
            *t += s;
        }
    }
    println!(
        "total seconds: forward {:.3}, ∂W {:.3}, ∂X {:.3} (the stem's ∂X is never computed in training)",
        total[0], total[1], total[2]
    );
    Ok(())
}
