//! What the CUDA kernels are specialised to: the shapes of the config's model, written as the
//! preprocessor header every kernel source (runtime/kernels) is compiled with, by nvcc in build.rs
//! or by NVRTC at start-up. Lives here, not in the runtime, because build.rs needs it too.

use std::path::{Path, PathBuf};

use crate::plan::Plan;

/// The sizes the kernels are specialised to, from the shape plan: each listed size gets kernels
/// whose loop bounds are compile-time constants (`_any` kernels take any size at run time).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelSizes {
    /// Values per sample of every one-group GroupNorm (classification CNNs).
    pub norm: Vec<usize>,
    /// A DiT's token width (its adaLN rows).
    pub widths: Vec<usize>,
    /// A DiT's tokens per sample (its attention softmax rows).
    pub tokens: Vec<usize>,
    /// LocalMamba's selective-scan state size.
    pub scan_states: Vec<usize>,
    /// The hourglass's neighbourhood-attention (head size, kernel) pairs.
    pub neighborhoods: Vec<(usize, usize)>,
}

impl KernelSizes {
    /// From the plan: GroupNorm layers give `norm`; DiT attention layers (output
    /// [tokens, width]) give `widths` and `tokens`; LocalMamba its scans' state size; the
    /// hourglass its neighbourhood levels. Each list deduplicated, ascending.
    pub fn of(plan: &Plan) -> Self {
        let mut sizes = KernelSizes::default();
        for l in &plan.layers {
            if l.name.ends_with("(GroupNorm)") {
                sizes.norm.push(l.output.iter().product());
            }
            if let (true, &[tokens, width]) = (l.name.ends_with(".attn1"), &l.output[..]) {
                sizes.widths.push(width);
                sizes.tokens.push(tokens);
            }
        }
        sizes.scan_states.extend(plan.scan_state);
        sizes.neighborhoods = plan.neighborhoods.clone();
        sizes.neighborhoods.sort_unstable();
        sizes.neighborhoods.dedup();
        for list in [&mut sizes.norm, &mut sizes.widths, &mut sizes.tokens] {
            list.sort_unstable();
            list.dedup();
        }
        sizes
    }

    /// The generated header: one X-macro per list.
    pub fn header(&self) -> String {
        let list = |v: &[usize]| -> String { v.iter().map(|n| format!(" X({n})")).collect() };
        let pairs: String = self
            .neighborhoods
            .iter()
            .map(|(d, k)| format!(" X({d}, {k})"))
            .collect();
        format!(
            "// Generated from the config's shape plan.\n#define SD_NORM_SIZES(X){}\n#define SD_DIT_WIDTHS(X){}\n#define SD_DIT_TOKENS(X){}\n#define SD_SCAN_STATES(X){}\n#define SD_NA_SIZES(X){pairs}\n",
            list(&self.norm),
            list(&self.widths),
            list(&self.tokens),
            list(&self.scan_states)
        )
    }
}

/// The text nvcc (build.rs) or NVRTC (start-up) compiles: the header, then every source of
/// `kernel_dir` (runtime/kernels), helpers (.cuh) before kernels (.cu), each group by name.
pub fn translation_unit(kernel_dir: &Path, sizes: &KernelSizes) -> std::io::Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(kernel_dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"))
        .collect();
    files.sort_by_key(|p| {
        (
            p.extension().is_some_and(|e| e == "cu"),
            p.file_name().map(|n| n.to_owned()),
        )
    });
    let mut tu = sizes.header();
    for f in &files {
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        tu.push_str(&format!(
            "\n// ---- {name}\n{}",
            std::fs::read_to_string(f)?
        ));
    }
    Ok(tu)
}

/// What a CUDA build hands the code generator: the translation unit (NVRTC compiles it at
/// start-up when `ptx` is empty) and the PTX nvcc made of it, (compute capability × 10, file).
pub struct CudaBuild {
    pub source: KernelText,
    pub ptx: Vec<(u32, PathBuf)>,
}

pub enum KernelText {
    /// Written by build.rs (embedded with include_str!).
    File(PathBuf),
    /// Made by the `trainer!` macro (embedded as a literal).
    Inline(String),
}

/// nvcc as a build finds it: `$NVCC`, then `$CUDA_HOME/bin` or `$CUDA_PATH/bin`, then `PATH`.
pub fn find_nvcc() -> Option<PathBuf> {
    let exe = format!("nvcc{}", std::env::consts::EXE_SUFFIX);
    let homes = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|d| PathBuf::from(d).join("bin").join(&exe));
    let path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(&exe)).collect())
        .unwrap_or_default();
    std::env::var_os("NVCC")
        .map(PathBuf::from)
        .into_iter()
        .chain(homes)
        .chain(path)
        .find(|p| p.is_file())
}

/// Compile the translation unit `source` to PTX for `compute_{arch}` at `out`.
pub fn nvcc_ptx(
    nvcc: &Path,
    arch: u32,
    source: &Path,
    out: &Path,
) -> std::io::Result<std::process::Output> {
    std::process::Command::new(nvcc)
        .args([
            "--ptx",
            "-O3",
            "-std=c++17",
            &format!("-arch=compute_{arch}"),
            "-o",
        ])
        .arg(out)
        .arg(source)
        .output()
}

/// The GPU architectures build.rs embeds PTX for (compute capability × 10): Ampere and Hopper.
pub const PTX_ARCHS: [u32; 2] = [80, 90];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_lists_each_size_once() {
        let sizes = KernelSizes {
            norm: vec![8, 4096],
            widths: vec![384],
            tokens: vec![],
            scan_states: vec![16],
            neighborhoods: vec![(64, 7)],
        };
        assert_eq!(
            sizes.header(),
            "// Generated from the config's shape plan.\n#define SD_NORM_SIZES(X) X(8) X(4096)\n\
             #define SD_DIT_WIDTHS(X) X(384)\n#define SD_DIT_TOKENS(X)\n#define SD_SCAN_STATES(X) X(16)\n#define SD_NA_SIZES(X) X(64, 7)\n"
        );
    }
}
