//! Neighbourhood attention on the CPU (ops/neighborhood.rs) at the hourglass presets' sizes:
//! forward, and forward + backward, in GFLOP/s of the op's arithmetic (4·k²·d per query and
//! head forward, 14·k²·d backward: the recomputed scores and the two passes).
//! `cargo bench -p signal-diffusion-runtime --bench neighborhood`

mod common;

use candle_core::{Device, Tensor, Var};
use signal_diffusion_runtime::ops::neighborhood::neighborhood_attention;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    // (label, batch, height, width, heads, head size, kernel)
    let cases = [
        (
            "hourglass-db level 0 (128×128 tokens, 1 head)",
            8,
            128,
            128,
            1,
            64,
            7,
        ),
        (
            "hourglass-db level 1 (64×64 tokens, 2 heads)",
            8,
            64,
            64,
            2,
            64,
            7,
        ),
        (
            "hourglass-timeseries level 0 (20×256 tokens, 2 heads)",
            8,
            20,
            256,
            2,
            64,
            7,
        ),
    ];
    for (label, b, h, w, heads, d, k) in cases {
        if !common::selected(label) {
            continue;
        }
        let shape = (b, h, w, heads * d);
        let vars: Vec<Var> = (0..3)
            .map(|_| Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev)?))
            .collect::<candle_core::Result<_>>()?;
        let upstream = Tensor::randn(0f32, 1.0, shape, &dev)?;
        let run = |backward: bool| {
            let o = neighborhood_attention(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                heads,
                k,
                0.125,
            )
            .unwrap();
            if backward {
                (&o * &upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
            }
        };
        let queries = (b * h * w * heads) as f64;
        let fwd_flop = queries * 4.0 * (k * k * d) as f64;
        let bwd_flop = queries * 14.0 * (k * k * d) as f64;
        let fwd = common::median_seconds(|| run(false));
        let both = common::median_seconds(|| run(true));
        println!(
            "{{\"case\": \"{label}\", \"forward_ms\": {:.1}, \"forward_gflops\": {:.1}, \"forward_backward_ms\": {:.1}, \"forward_backward_gflops\": {:.1}}}",
            fwd * 1e3,
            fwd_flop / fwd / 1e9,
            both * 1e3,
            (fwd_flop + bwd_flop) / both / 1e9
        );
    }
    Ok(())
}
