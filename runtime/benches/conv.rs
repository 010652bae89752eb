//! The CPU convolutions of ops/conv.rs at every shape the shipped classification presets use
//! (their plans, read from config/classification/*.toml: stems, 3×3 blocks, 1×1 skips, the 1-D
//! kernels), batch 8: forward, filter gradient, and input gradient, each in GFLOP/s counted as
//! the direct convolution's 2·B·O·C·kh·kw·Ho·Wo per pass, by every algorithm that can run the
//! shape (`*`: the one the plan and the op choose). The filter gradient is timed with a constant
//! input (no input gradient), less the forward and the loss (a product with a random upstream
//! gradient, summed); the input gradient is the backward with a variable input less that.
//! `cargo bench -p signal-diffusion-runtime --bench conv [-- <filter>]`, e.g. `-- 3x3`.

mod common;
#[path = "common/preset_convs.rs"]
mod preset_convs;

use candle_core::{Device, Tensor, Var};
use signal_diffusion_runtime::ops::conv::{conv_with, ConvAlgorithm};

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let batch = 8;
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
        "{:<24} {:<22} {:>16} {:>16} {:>16}",
        "conv (batch 8), GFLOP/s", "algorithm", "forward", "∂W", "∂X"
    );
    let mut total = [0f64; 3];
    for (c, o, [kh, kw], [ho, wo]) in preset_convs::shapes() {
        // A 1-D convolution is a 2-D one of height 1 (kernel and output).
        let label = match ho {
            1 => format!("{c}->{o} k{kw} @{wo}"),
            _ => format!("{c}->{o} {kh}x{kw} @{ho}x{wo}"),
        };
        if !common::selected(&label) {
            continue;
        }
        let chosen = ConvAlgorithm::for_shape(c, o, [kh, kw], [ho, wo]);
        let algorithms = match [kh, kw] {
            [3, 3] => vec![ConvAlgorithm::Im2colGemm, ConvAlgorithm::WinogradF4x3],
            _ => vec![ConvAlgorithm::Im2colGemm],
        };
        for algorithm in algorithms {
            let conv = |x: &Tensor, w: &Tensor, b: Option<&Tensor>, pad: usize| {
                conv_with(x, w, b, pad, algorithm)
            };
            // Same padding (odd kernels): the input is the output's size. 1-D as rank 3.
            let (x_dims, w_dims, y_dims) = match ho {
                1 => (vec![batch, c, wo], vec![o, c, kw], vec![batch, o, wo]),
                _ => (
                    vec![batch, c, ho, wo],
                    vec![o, c, kh, kw],
                    vec![batch, o, ho, wo],
                ),
            };
            let x = Tensor::randn(0f32, 1.0, x_dims, &dev)?;
            let xv = Var::from_tensor(&x)?;
            let w = Var::from_tensor(&(Tensor::randn(0f32, 1.0, w_dims, &dev)? * 0.1)?)?;
            let upstream = Tensor::randn(0f32, 1.0, y_dims, &dev)?;
            let pad = kw / 2;
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
            let data =
                common::median_seconds(|| backward(xv.as_tensor())) - forward - loss - filter;
            let gflop = 2.0 * (batch * o * c * kh * kw * ho * wo) as f64 / 1e9;
            let rate = |s: f64| match peak {
                Some(p) => format!("{:.1} ({:.0} %)", gflop / s, 100.0 * gflop / s / p),
                None => format!("{:.1}", gflop / s),
            };
            println!(
                "{:<24} {:<22} {:>16} {:>16} {:>16}",
                label,
                format!(
                    "{}{}",
                    algorithm.name(),
                    if algorithm == chosen { " *" } else { "" }
                ),
                rate(forward),
                rate(filter),
                rate(data)
            );
            if algorithm == chosen {
                for (t, s) in total.iter_mut().zip([forward, filter, data]) {
                    *t += s;
                }
            }
        }
    }
    println!(
        "total seconds by the chosen algorithms: forward {:.3}, ∂W {:.3}, ∂X {:.3} (a stem's ∂X is never computed in training)",
        total[0], total[1], total[2]
    );
    Ok(())
}
