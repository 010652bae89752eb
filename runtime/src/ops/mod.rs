//! Ops with their own backward: what the models are built from. Each file is one op family,
//! forward and backward together, on the CPU and (under the `cuda` feature) on a GPU through the
//! kernel of the same name in `runtime/kernels/*.cu`. Candle's own op is used only where it has
//! a correct backward and is not on a hot path; the notes in `../shared/spec/candle-notes.md`
//! say which of Candle's ops drop gradients.
//!
//! Imports run downward only: `models`, `diffusion` and `train` call these; an op calls `cpu`
//! (the leaf of vectorised loops, threads and the RNG hash), `precision` (autocast) and the
//! CUDA side (`cuda`, `cudnn`), never a model.

pub mod adaln;
pub mod adam;
pub mod attention;
pub mod conv;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cudnn;
pub mod dropout;
pub mod gelu;
pub mod linear;
pub mod loss;
pub mod neighborhood;
pub mod norm;
pub mod pool;
pub mod precision;
pub mod rope;
pub mod selective_scan;
pub mod winograd;

/// The sizes a trainer's CUDA kernels are specialised to (config::cuda::KernelSizes, as the
/// generated code's constants). Defined in every build, so a CPU trainer names the same type.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelSizes {
    /// Values per sample of the model's GroupNorms.
    pub norm: &'static [usize],
    /// A DiT's token width (adaLN rows).
    pub widths: &'static [usize],
    /// A DiT's tokens per sample (attention softmax rows).
    pub tokens: &'static [usize],
    /// LocalMamba's selective-scan state size.
    pub scan_states: &'static [usize],
    /// The hourglass's neighbourhood-attention (head size, kernel) pairs.
    pub neighborhoods: &'static [(usize, usize)],
}
