//! The selective scan on the CPU (ops/selective_scan.rs) at LocalMamba's sizes: forward, and
//! forward + backward (which recomputes the states chunk by chunk).
//! `cargo bench -p signal-diffusion-runtime --bench selective_scan`

mod common;

use candle_core::{Device, Tensor, Var};
use signal_diffusion_runtime::ops::selective_scan::selective_scan;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    // (label, batch, channels = K·d_inner, groups = K, state, length)
    let cases = [
        (
            "localmamba-db level 0 (16×16 latent tokens, width 128)",
            8,
            3 * 256,
            3,
            16,
            256,
        ),
        (
            "localmamba-timeseries level 0 (20×256 tokens, width 128)",
            8,
            3 * 256,
            3,
            16,
            5120,
        ),
    ];
    for (label, b, ch, g, n, l) in cases {
        if !common::selected(label) {
            continue;
        }
        let r =
            |dims: &[usize], s: f64| Tensor::randn(0f32, 1.0, dims, &dev).map(|t| (t * s).unwrap());
        let vars: Vec<Var> = [
            r(&[b, ch, l], 1.0)?,
            r(&[b, ch, l], 0.5)?,
            r(&[ch, n], 0.5)?.exp()?.neg()?,
            r(&[b, g, n, l], 1.0)?,
            r(&[b, g, n, l], 1.0)?,
            r(&[ch], 1.0)?,
            r(&[ch], 0.5)?,
        ]
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<_>>()?;
        let t = |i: usize| vars[i].as_tensor();
        let run = |backward: bool| {
            let y = selective_scan(t(0), t(1), t(2), t(3), t(4), t(5), t(6), true).unwrap();
            if backward {
                y.sum_all().unwrap().backward().unwrap();
            }
        };
        let fwd = common::median_seconds(|| run(false));
        let both = common::median_seconds(|| run(true));
        let steps = (b * ch * l) as f64;
        println!(
            "{{\"case\": \"{label}\", \"forward_ms\": {:.1}, \"forward_ns_per_channel_step\": {:.2}, \"forward_backward_ms\": {:.1}}}",
            fwd * 1e3,
            fwd / steps * 1e9,
            both * 1e3
        );
    }
    Ok(())
}
