//! The integration tests of the `signal-diffusion` package, linked into one binary (each file a
//! module): trainers compiled by the `trainer!` macro on tiny datasets, the shipped presets, the
//! compile errors of bad configs, and the binaries.

mod common;

mod build_error;
mod cli;
mod compile_fail;
mod diffusion;
mod kernels;
mod presets;
mod train;
