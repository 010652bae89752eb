//! The convolutions of the shipped classification presets, from their plans: the conv bench
//! times them and runtime/tests/conv.rs checks every kernel at them (both include this file).

use std::collections::BTreeSet;
use std::path::Path;

use signal_diffusion_config::settings::Env;

/// (input channels, output channels, kernel (h, w), output side (h, w)) of every convolution in
/// the shipped classification presets, largest kernels first.
pub fn shapes() -> Vec<(usize, usize, [usize; 2], [usize; 2])> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files: Vec<_> = std::fs::read_dir(root.join("config/classification"))
        .expect("config/classification")
        .map(|e| e.expect("a preset").path())
        .collect();
    files.sort();
    let mut shapes = BTreeSet::new();
    for file in files {
        let env = Env::isolated(root.clone());
        let resolved = signal_diffusion_config::plan_unchecked(&file, &env).unwrap_or_else(|e| {
            panic!(
                "{}: {}",
                file.display(),
                signal_diffusion_config::render(&e)
            )
        });
        for conv in resolved
            .plan
            .iter()
            .flat_map(|p| &p.layers)
            .filter_map(|l| l.conv)
        {
            shapes.insert((
                std::cmp::Reverse(conv.kernel),
                conv.cin,
                conv.cout,
                conv.side,
            ));
        }
    }
    shapes
        .into_iter()
        .map(|(k, c, o, side)| (c, o, k.0, side))
        .collect()
}
