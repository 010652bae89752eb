//! Diffusion, independent of the model family: noise paths and training objectives (`path`),
//! samplers and what a checkpoint needs to sample (`sampler`), the EMA of the weights (`ema`)
//! and the distances between generated and real sets (`fidelity`). It calls a model only through
//! `denoiser`, the one forward every family is adapted to, and imports nothing from `train`.

pub mod denoiser;
pub mod ema;
pub mod fidelity;
pub mod loss;
pub mod path;
pub mod sampler;
