//! The runtime's integration tests, linked into one binary (each file a module; one binary links
//! Candle once instead of once per file). `memory.rs` is its own binary: it installs a counting
//! global allocator, which would measure every other test running beside it.

mod common;

mod adapters;
mod cache;
mod clip;
mod conv;
mod cuda;
mod decimate_parity;
mod dit;
mod edf;
mod emulated_kernels;
mod formats;
mod fuzz_corpus;
mod gradients;
mod hourglass;
mod image;
mod latents;
mod localmamba;
mod lora;
mod meta_dataset;
mod mit;
mod mmdit;
mod neighborhood;
mod optim;
mod preprocess;
mod sampler;
mod selective_scan;
mod spectrogram_parity;
mod synth;
mod unet;
mod vae;
