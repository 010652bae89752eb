//! What the bench binaries share.

// Each bench binary compiles this module and uses its own part of it.
#![allow(dead_code)]

use std::time::Instant;

/// The median wall time of 5 runs, in seconds (the 2-vCPU machines this runs on are noisy).
pub fn median_seconds(mut run: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[2]
}

/// Whether to run the case `label`: every case, or those whose label contains the first
/// argument that is not a flag (`cargo bench --bench X -- level 0`; cargo adds `--bench`).
pub fn selected(label: &str) -> bool {
    let words: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    words.is_empty() || label.contains(&words.join(" "))
}

/// The vector unit a peak is measured on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Isa {
    Avx2,
    Avx512,
}

impl Isa {
    /// The widest unit the kernels run at on this CPU: AVX-512 where it has it and
    /// `SIGNAL_DIFFUSION_MAX_CPU_ISA` does not cap it (as the GEMM and our kernels choose).
    pub fn of_kernels() -> Option<Isa> {
        Isa::available()
            .into_iter()
            .rev()
            .find(|&isa| isa == Isa::Avx2 || !gemm_common::avx512_capped())
    }

    /// The units this CPU has with FMA, narrowest first.
    pub fn available() -> Vec<Isa> {
        let mut isas = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                isas.push(Isa::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
        }
        isas
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx2 => "AVX2+FMA",
            Isa::Avx512 => "AVX-512",
        }
    }
}

/// The FMA peak in GFLOP/s, measured: `threads` threads each running independent chains of
/// fused multiply-adds on full registers of `isa` (16 chains of 512 bits, 12 of 256: more than
/// latency × FMA pipes, 4 × 2 on every core we run on, so the pipes never wait), f64 or f32.
/// An FMA is 2 FLOP per lane. The best of 5 runs: a peak is what the core can do.
pub fn fma_peak(isa: Isa, f64_lanes: bool, threads: usize) -> f64 {
    const FMAS_PER_THREAD: usize = 400_000_000;
    let (chains, lanes) = match (isa, f64_lanes) {
        (Isa::Avx2, true) => (12, 4),
        (Isa::Avx2, false) => (12, 8),
        (Isa::Avx512, true) => (16, 8),
        (Isa::Avx512, false) => (16, 16),
    };
    let iters = FMAS_PER_THREAD / chains;
    let run = || {
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| fma_chains(isa, f64_lanes, iters));
            }
        });
        start.elapsed().as_secs_f64()
    };
    let secs = (0..5).map(|_| run()).fold(f64::INFINITY, f64::min);
    (threads * iters * chains * lanes * 2) as f64 / secs / 1e9
}

/// Each chain is `r = a·r + b`, so every FMA waits for the one before it in its chain and only
/// independent chains fill the pipes. `a` just under 1 keeps the values finite and normal.
fn fma_chains(isa: Isa, f64_lanes: bool, iters: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        macro_rules! chains {
            ($feature:literal, $n:literal, $set1:ident, $fmadd:ident) => {{
                #[target_feature(enable = $feature)]
                unsafe fn run(iters: usize) {
                    let (a, b) = ($set1(0.999_999), $set1(1e-7));
                    let mut acc = [$set1(1.0); $n];
                    for _ in 0..iters {
                        for r in acc.iter_mut() {
                            *r = $fmadd(a, *r, b);
                        }
                    }
                    std::hint::black_box(&acc);
                }
                // SAFETY: `isa` is one of `Isa::available()`, checked at run time.
                unsafe { run(iters) }
            }};
        }
        assert!(
            Isa::available().contains(&isa),
            "{isa:?} is not on this CPU"
        );
        match (isa, f64_lanes) {
            (Isa::Avx2, true) => chains!("avx2,fma", 12, _mm256_set1_pd, _mm256_fmadd_pd),
            (Isa::Avx2, false) => chains!("avx2,fma", 12, _mm256_set1_ps, _mm256_fmadd_ps),
            (Isa::Avx512, true) => chains!("avx512f", 16, _mm512_set1_pd, _mm512_fmadd_pd),
            (Isa::Avx512, false) => chains!("avx512f", 16, _mm512_set1_ps, _mm512_fmadd_ps),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, f64_lanes, iters);
        unreachable!("no FMA unit is probed on this architecture");
    }
}
