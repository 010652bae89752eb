//! The machine's FMA peak, measured, for every "% of peak" figure in docs/benchmarks.md: f32 and
//! f64, AVX2 + FMA and AVX-512 (where the CPU has it), 1 thread and all cores. Next to each, the
//! FLOP per cycle per core that the vendor documents for that micro-architecture and the clock
//! the measurement implies: a probe that saturates the pipes implies a clock between the base
//! and the boost clock; one that does not (too few chains, or 256-bit registers on a core with
//! 512-bit pipes) implies a clock below the base.
//! `cargo bench -p signal-diffusion-runtime --bench fma_peak`

mod common;

use common::{fma_peak, Isa};

fn main() {
    let cpu = Cpu::read();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "{} (vendor {}, family {}), {cores} cores as seen, nominal {:.2} GHz",
        cpu.model,
        cpu.vendor,
        cpu.family,
        cpu.mhz / 1e3
    );
    println!(
        "{:<9} {:>5} {:>7} {:>10} {:>22} {:>12}",
        "unit", "type", "threads", "GFLOP/s", "FLOP/cycle/core (doc)", "implied GHz"
    );
    for isa in Isa::available() {
        for f64_lanes in [false, true] {
            let documented = cpu.flop_per_cycle(isa, f64_lanes);
            for threads in [1, cores] {
                let peak = fma_peak(isa, f64_lanes, threads);
                let (doc, ghz) = match documented {
                    Some(f) => (f.to_string(), format!("{:.2}", peak / threads as f64 / f)),
                    None => ("unknown".into(), "-".into()),
                };
                let ty = if f64_lanes { "f64" } else { "f32" };
                println!(
                    "{:<9} {ty:>5} {threads:>7} {peak:>10.1} {doc:>22} {ghz:>12}",
                    isa.name()
                );
            }
        }
    }
}

/// What /proc/cpuinfo says about the first core.
struct Cpu {
    vendor: String,
    family: u32,
    model: String,
    mhz: f64,
}

impl Cpu {
    fn read() -> Cpu {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |key: &str| {
            info.lines()
                .find(|l| l.split(':').next().map(str::trim) == Some(key))
                .and_then(|l| l.split_once(':'))
                .map_or(String::new(), |(_, v)| v.trim().to_string())
        };
        Cpu {
            vendor: field("vendor_id"),
            family: field("cpu family").parse().unwrap_or(0),
            model: field("model name"),
            mhz: field("cpu MHz").parse().unwrap_or(0.0),
        }
    }

    /// f32 or f64 FLOP per cycle per core at full FMA throughput on `isa`, as AMD's and Intel's
    /// optimisation manuals give it: two FMA pipes everywhere listed; Zen 4 runs a 512-bit FMA
    /// as two 256-bit halves, Zen 5 (server and desktop) at full width; Intel's AVX-512 parts
    /// with two 512-bit FMA units (Xeon Gold 6000+/Platinum, Sapphire Rapids on) do 2 × 512
    /// bits, those with one unit half that: unknown here, so none.
    fn flop_per_cycle(&self, isa: Isa, f64_lanes: bool) -> Option<f64> {
        let f32_flop = match (self.vendor.as_str(), self.family, isa) {
            ("AuthenticAMD", 25, _) => 32.0,
            ("AuthenticAMD", 26, Isa::Avx2) => 32.0,
            ("AuthenticAMD", 26, Isa::Avx512) => 64.0,
            ("GenuineIntel", 6, Isa::Avx2) => 32.0,
            _ => return None,
        };
        Some(if f64_lanes { f32_flop / 2.0 } else { f32_flop })
    }
}
