//! The Candle runtime the generated trainers call. Data flows one way: `signal` (EEG to
//! spectrograms) -> dataset on disk -> `data` (batches) -> `train` (models, optim) -> checkpoints
//! and logs. The generated code only wires constants and types into `train`.

pub mod adaln;
pub mod attention;
pub mod conv;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cudnn;
pub mod data;
pub mod diffusion;
pub mod dit;
pub mod fidelity;
pub mod image;
pub mod io;
pub mod linear;
pub mod log;
pub mod models;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod precision;
pub mod sample;
pub mod signal;
pub mod table;
pub mod tasks;
pub mod train;
