//! The integration tests of the `signal-diffusion` package, linked into one binary (each file a
//! module): trainers compiled by the `trainer!` macro on tiny datasets, the shipped presets, a
//! failing build, and the binaries. The compile errors of bad configs are tested in the macros
//! crate (macros/tests/compile_fail).

mod common;

mod build_error;
mod cli;
mod diffusion;
mod kernels;
mod presets;
mod train;
