//! What every generated trainer shares: the compiled constants it hands over, the command-line
//! options, re-resolving the embedded config with `--set` overrides, and checkpoints.

pub mod checkpoint;
pub mod classification;
pub mod swa;

use std::path::PathBuf;

use anyhow::{bail, Result};
use signal_diffusion_config::{self as config, settings::Env, Resolved, Target};

use crate::tasks::TaskSpec;

/// Options of a `train` binary (parsed in src/bin/train.rs).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub print_config: bool,
    pub plan: bool,
    /// `--set key=value`, for non-structural keys only.
    pub sets: Vec<(String, String)>,
    pub output_dir: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    /// `--benchmark N`: time N training steps on random data instead of training.
    pub benchmark: Option<usize>,
}

/// The constants generated from a config (see config/src/codegen.rs).
pub struct Compiled {
    pub name: &'static str,
    pub config_path: &'static str,
    pub project_root: &'static str,
    pub embedded: &'static [(&'static str, &'static str, &'static str)],
    pub plan: &'static str,
    pub parameters: u64,
    pub flops_per_step: u64,
    pub batch_size: usize,
    pub input_shape: &'static [usize],
    pub tasks: &'static [TaskSpec],
    /// Values per sample of the model's GroupNorms: the CUDA kernels are specialised to them.
    pub cuda_norm_sizes: &'static [usize],
    /// (compute capability × 10, PTX) compiled by nvcc at build time; empty: NVRTC at start-up.
    pub cuda_ptx: &'static [(u32, &'static str)],
    /// The kernels' source, for NVRTC (empty in a CPU build).
    pub cuda_source: &'static str,
}

/// The device `training.device` names: "cpu", "cuda" (an error without a GPU), or "auto" (the
/// first GPU when this is a CUDA build and one is there, else the CPU). On a GPU our kernels are
/// loaded first, so a broken kernel fails here rather than mid-run.
pub fn select_device(name: &str, compiled: &Compiled) -> Result<candle_core::Device> {
    use candle_core::Device;
    let device = match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0).map_err(|e| {
            anyhow::anyhow!("training.device = \"cuda\", but no GPU could be opened: {e}")
        })?,
        _ if cfg!(feature = "cuda") => Device::cuda_if_available(0).unwrap_or(Device::Cpu),
        _ => Device::Cpu,
    };
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        let origin = crate::cuda::install(
            d,
            compiled.cuda_norm_sizes,
            compiled.cuda_ptx,
            compiled.cuda_source,
        )?;
        // TF32 matmuls and convolutions, as the reference forces on whenever CUDA is available.
        candle_core::cuda_backend::set_gemm_reduced_precision_f32(true);
        println!("device cuda:0 (TF32 matmuls), kernels {origin}");
    }
    #[cfg(not(feature = "cuda"))]
    let _ = compiled;
    if device.is_cpu() {
        println!("device cpu");
    }
    Ok(device)
}

impl Compiled {
    /// What `--plan` says about the CUDA kernels of this binary.
    pub fn kernels(&self) -> String {
        if !cfg!(feature = "cuda") {
            return "CUDA kernels: none (a CPU build; rebuild with `--features cuda`)".into();
        }
        let archs: Vec<String> = self
            .cuda_ptx
            .iter()
            .map(|(a, _)| format!("compute_{a}"))
            .collect();
        let how = match archs.is_empty() {
            true => "compiled by NVRTC at start-up (nvcc was not found at build time)".to_string(),
            false => format!("PTX by nvcc at build time for {}", archs.join(", ")),
        };
        format!(
            "CUDA kernels: {how}; GroupNorm kernels specialised to {:?} values per sample",
            self.cuda_norm_sizes
        )
    }

    /// Resolve the embedded config again, with overrides, through the same validation as the
    /// build; refuse if the result would need a different trainer.
    pub fn resolve(&self, sets: &[(String, String)]) -> Result<Resolved> {
        let env = Env {
            settings_override: None,
            home: std::env::var_os("HOME").map(PathBuf::from),
            project_root: PathBuf::from(self.project_root),
            embedded: Some(
                self.embedded
                    .iter()
                    .map(|(_, p, t)| (PathBuf::from(p), t.to_string()))
                    .collect(),
            ),
        };
        let r = config::resolve_with(
            std::path::Path::new(self.config_path),
            &env,
            Target {
                cuda: cfg!(feature = "cuda"),
            },
            sets,
        )
        .map_err(|e| anyhow::anyhow!("{}", config::render(&e)))?;
        let params = r.plan.as_ref().map(|p| p.params).unwrap_or(0);
        if params != self.parameters {
            bail!("the overrides change the model ({} parameters instead of {}); change the TOML and rebuild", params, self.parameters);
        }
        Ok(r)
    }
}
