//! What the bench binaries share.

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
#[allow(dead_code)] // the benches that have one case per shape use it
pub fn selected(label: &str) -> bool {
    let words: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    words.is_empty() || label.contains(&words.join(" "))
}
