//! The closed sets of values a config key may take, as enums. A key is read as a string once, at
//! validation (`Section::pick`); from there on the value is an enum, so codegen, the plan and the
//! trainers `match` on it and the compiler checks that every value is handled. The TOML spelling
//! is kept for messages and for serialisation (`--print-config` and the config hash print and hash
//! the same strings as before).

/// A closed set of TOML strings.
pub trait Choice: Copy + Sized + 'static {
    /// Every value, in the order messages list them.
    const ALL: &'static [Self];
    /// How the value is spelt in TOML.
    fn toml(self) -> &'static str;
    /// Other spellings accepted for it (the reference's names), read as the value itself.
    fn aliases(self) -> &'static [&'static str];
}

/// Declares an enum whose variants are spelt in TOML as given.
macro_rules! choices {
    ($(
        $(#[$meta:meta])*
        pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal $(| $alias:literal)*),+ $(,)? }
    )+) => {$(
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl Choice for $name {
            const ALL: &'static [Self] = &[$($name::$variant),+];
            fn toml(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
            fn aliases(self) -> &'static [&'static str] {
                match self { $($name::$variant => &[$($alias),*]),+ }
            }
        }

        impl $crate::literal::Literal for $name {
            fn literal(&self, _: &$crate::literal::At) -> String {
                match self { $($name::$variant => concat!(stringify!($name), "::", stringify!($variant))),+ }.into()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.toml())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.toml())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                from_toml(&text).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "`{text}` is not one of: {}",
                        names::<$name>(Self::ALL).join(", ")
                    ))
                })
            }
        }
    )+};
}

impl OutputType {
    /// Image channels: the dB magnitude alone, or with two more (I/Q or phase) channels.
    pub fn channels(self) -> usize {
        match self {
            OutputType::DbOnly => 1,
            OutputType::DbIq | OutputType::DbPolar => 3,
        }
    }
}

/// The value spelt `text` (or one of its aliases), if any.
pub fn from_toml<C: Choice>(text: &str) -> Option<C> {
    C::ALL
        .iter()
        .copied()
        .find(|c| c.toml() == text || c.aliases().contains(&text))
}

/// The TOML spellings of `values`.
pub fn names<C: Choice>(values: &[C]) -> Vec<&'static str> {
    values.iter().map(|c| c.toml()).collect()
}

choices! {
    /// `data.output_type`: what the three image channels hold.
    pub enum OutputType { DbOnly = "db-only", DbIq = "db-iq", DbPolar = "db-polar" }

    /// `data.data_type`: spectrogram images or z-scored time series.
    pub enum DataType { Spectrogram = "spectrogram", Timeseries = "timeseries" }

    /// `training.device`.
    pub enum Device {
        /// The first GPU in a CUDA build when one is found, else the CPU.
        Auto = "auto",
        Cpu = "cpu",
        Cuda = "cuda",
    }

    /// `training.eval_strategy`.
    pub enum EvalStrategy { Epoch = "epoch", Steps = "steps", None = "none" }

    /// `training.checkpoint_strategy` (classification).
    pub enum CheckpointStrategy { Epoch = "epoch", Steps = "steps" }

    /// `training.compile_mode` (accepted for the reference's configs; see docs/config.md).
    pub enum CompileMode {
        Default = "default",
        ReduceOverhead = "reduce-overhead",
        MaxAutotune = "max-autotune",
    }

    /// `optimizer.name`.
    pub enum OptimizerName { AdamW = "adamw", Adam = "adam", Sgd = "sgd", AdamW8bit = "adamw_8bit" }

    /// `scheduler.name`: the learning-rate schedule.
    pub enum LrSchedule {
        Constant = "constant",
        ConstantWithWarmup = "constant_with_warmup",
        Linear = "linear",
        Cosine = "cosine",
        Polynomial = "polynomial",
    }

    /// `model.backbone` (classification).
    pub enum Backbone {
        CnnLight = "cnn_light",
        Cnn = "cnn",
        Cnn1d = "cnn_1d",
        Cnn1dLight = "cnn_1d_light",
        Transformer = "transformer",
    }

    /// `model.activation` (classification).
    pub enum Activation {
        Gelu = "gelu",
        Relu = "relu",
        LeakyRelu = "lrelu",
        Silu = "silu",
        Sigmoid = "sigmoid",
        Tanh = "tanh",
        PRelu = "prelu",
    }

    /// `model.extras.pooling` (transformer backbone).
    pub enum Pooling { Mean = "mean", Cls = "cls" }

    /// `model.name` (diffusion).
    pub enum DiffusionModel {
        Dit = "dit",
        Hourglass = "hourglass",
        LocalMamba = "localmamba",
        /// Stable Diffusion 1.5 (its UNet, VAE and CLIP-L text encoder).
        StableDiffusion15 = "stable-diffusion" | "stable-diffusion-v1-5",
        /// Stable Diffusion 3.5 medium (its MMDiT, VAE and two CLIP text encoders).
        StableDiffusion35 = "stable-diffusion-35" | "stable-diffusion-3.5-medium",
    }

    /// `model.conditioning` (diffusion).
    pub enum Conditioning {
        None = "none",
        Caption = "caption",
        Classes = "classes",
        GenderHealthAge = "gend_hlth_age",
    }

    /// `dataset.dataset_type` (diffusion): how the dataset directory is read.
    pub enum DatasetType { Auto = "auto", ImageFolder = "imagefolder", Parquet = "parquet" }

    /// `model.lora.bias`.
    pub enum LoraBias { None = "none", All = "all", LoraOnly = "lora_only" }

    /// `objective.prediction_type`: what the network is trained to output.
    pub enum Objective { VectorField = "vector_field", Epsilon = "epsilon", Sample = "sample" }

    /// `objective.scheduler`: the noise path.
    pub enum NoiseScheduler {
        FlowMatchEuler = "flow_match_euler",
        Ddpm = "ddpm",
        Ddim = "ddim",
    }

    /// A VP path's β schedule (diffusers' `beta_schedule`): β linear in t, or √β linear in t
    /// (Stable Diffusion's `scaled_linear`).
    pub enum BetaSchedule { Linear = "linear", ScaledLinear = "scaled_linear" }

    /// `training.mixed_precision` (diffusion).
    pub enum MixedPrecision { No = "no", Fp16 = "fp16", Bf16 = "bf16" }

    /// `inference.sampler`.
    pub enum Sampler { Euler = "euler", Heun = "heun", Ddim = "ddim", DpmPP2M = "dpmpp_2m" }

    /// `data.polar_layout`: what the three channels of a `db-polar` image hold. The
    /// configuration contract's (dB magnitude, cos φ, sin φ; φ wraps nowhere), or the original
    /// implementation's (dB, linear magnitude, φ min-max scaled, wrapping at ±π).
    pub enum PolarLayout { PhaseCosSin = "phase-cos-sin", MagnitudePhase = "magnitude-phase" }

    /// `training.class_weights`: how a classification task's cross-entropy weighs its classes.
    pub enum ClassWeights { None = "none", Balanced = "balanced" }

    /// `model.extras.activation_fn`: a DiT feed-forward's first half, as diffusers'
    /// `FeedForward` names them (`geglu-approximate` is its ungated `ApproximateGELU`).
    pub enum FeedForward {
        Gelu = "gelu",
        GeluApproximate = "gelu-approximate",
        Geglu = "geglu",
        GegluApproximate = "geglu-approximate",
        Swiglu = "swiglu",
        LinearSilu = "linear-silu",
    }

    /// `inference.guidance`.
    pub enum Guidance { Cfg = "cfg", RectifiedCfgPp = "rectified_cfg_pp" }
}
