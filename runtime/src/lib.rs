//! The Candle runtime the generated trainers call, laid out by layer family (docs/architecture.md
//! has the map). Imports run one way: `train` (the loops) uses `diffusion`, `models` and `track`
//! (the run trackers), and `diffusion` and `models` use `ops`; `data` sits beside `models` and
//! uses only the `ops::cpu` leaf; `tasks` is the label vocabulary all of them share.
//!
//! Generated code (config/src/codegen.rs, the `trainer!` macro) names only the items re-exported
//! at the bottom of this file.

pub mod data;
pub mod diffusion;
pub mod models;
pub mod ops;
pub mod tasks;
pub mod track;
pub mod train;

// The surface the generated trainers name.
pub use diffusion::denoiser::{
    count_parameters as count_denoiser_parameters, Denoiser, DenoiserShape, Frame,
};
pub use models::classifier::{
    count_parameters as count_classifier_parameters, Backbone, Cnn, Cnn1d, Cnn1dShape, CnnLight,
    CnnLightShape, CnnShape, Transformer, TransformerShape,
};
pub use models::dit::{Conditioning, DitShape};
pub use models::hourglass::{HourglassShape, LevelShape, SelfAttention};
pub use models::localmamba::{LocalMambaShape, Scan};
pub use models::nn::Activation;
pub use ops::KernelSizes;
/// The config crate: generated trainers state their resolved config in its types.
pub use signal_diffusion_config as config;
pub use tasks::{TaskKind, TaskSpec};
pub use train::classification::main as train_classifier;
pub use train::diffusion::main as train_diffusion;
pub use train::{Compiled, RunOptions};
