//! What every generated trainer shares: the compiled constants it hands over, the command-line
//! options, re-resolving the embedded config with `--set` overrides, and checkpoints.

pub mod adamw_8bit;
pub mod benchmark;
pub mod checkpoint;
pub mod classification;
pub mod diffusion;
pub mod evaluate;
pub mod export;
pub mod metrics;
pub mod optim;
pub mod sample;
pub mod swa;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use signal_diffusion_config::{self as config, settings::Env, Config, Target};

use crate::ops::KernelSizes;
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
    /// The resolved config, for the project root the trainer runs with.
    pub config: fn(&Path) -> Config,
    pub name: &'static str,
    /// The config file, relative to the project root.
    pub config_path: &'static str,
    /// The build's project root (absolute, on the build machine); see [`Compiled::root`].
    pub project_root: &'static str,
    pub embedded: &'static [(&'static str, &'static str, &'static str)],
    pub hub_cache: Option<&'static str>,
    pub plan: &'static str,
    pub parameters: u64,
    pub flops_per_step: u64,
    pub batch_size: usize,
    pub input_shape: &'static [usize],
    pub tasks: &'static [TaskSpec],
    /// The sizes the CUDA kernels are specialised to.
    pub cuda_sizes: KernelSizes,
    /// (compute capability × 10, PTX) compiled by nvcc at build time; empty: NVRTC at start-up.
    pub cuda_ptx: &'static [(u32, &'static str)],
    /// The kernels' source, for NVRTC (empty in a CPU build).
    pub cuda_source: &'static str,
}

/// Whether this binary can use a GPU here, and if not, why: a CPU build; a CUDA build whose
/// libraries are not on this machine (they are loaded at run time, so the binary starts without
/// them); or no GPU behind the driver.
pub fn gpu() -> std::result::Result<(), String> {
    #[cfg(not(feature = "cuda"))]
    return Err("a CPU build (rebuild with `--features cuda`)".into());
    #[cfg(feature = "cuda")]
    {
        use cudarc::{cublas, cublaslt, cudnn, curand, driver, nvrtc};
        // SAFETY: each only tries to open the library (dlopen), calling nothing in it.
        let present = unsafe {
            [
                ("the CUDA driver (libcuda)", driver::sys::is_culib_present()),
                ("cuBLAS", cublas::sys::is_culib_present()),
                ("cuBLASLt", cublaslt::sys::is_culib_present()),
                ("cuRAND", curand::sys::is_culib_present()),
                ("NVRTC", nvrtc::sys::is_culib_present()),
                ("cuDNN", cudnn::sys::is_culib_present()),
            ]
        };
        let missing: Vec<&str> = present.iter().filter(|p| !p.1).map(|p| p.0).collect();
        if !missing.is_empty() {
            return Err(format!(
                "{} not found (put their directories on LD_LIBRARY_PATH; README, \"Building for a GPU\")",
                missing.join(", ")
            ));
        }
        match driver::CudaContext::device_count() {
            Ok(n) if n > 0 => Ok(()),
            Ok(_) => Err("the CUDA driver sees no GPU".into()),
            Err(e) => Err(format!("the CUDA driver does not start: {e}")),
        }
    }
}

/// The device `training.device` names: the CPU, the first GPU (an error without one), or `auto`:
/// the first GPU when this is a CUDA build and one opens, else the CPU (saying why). On a GPU our
/// kernels are loaded first, so a broken kernel fails here rather than mid-run.
pub fn select_device(
    choice: config::choice::Device,
    compiled: &Compiled,
) -> Result<candle_core::Device> {
    use candle_core::Device;
    use config::choice::Device as Choice;
    let device = match choice {
        Choice::Cpu => Device::Cpu,
        // Only a GPU choice looks for one (the look opens the driver).
        Choice::Cuda | Choice::Auto => match gpu() {
            Ok(()) => Device::new_cuda(0).map_err(|e| {
                anyhow::anyhow!(
                    "training.device = \"{choice}\", but the GPU could not be opened: {e}"
                )
            })?,
            Err(why) if choice == Choice::Cuda => {
                bail!("training.device = \"cuda\", but no GPU can be used: {why}")
            }
            Err(why) => {
                if cfg!(feature = "cuda") {
                    println!("training.device = \"auto\": no GPU ({why}); training on the CPU");
                }
                Device::Cpu
            }
        },
    };
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        let origin = crate::ops::cuda::install(
            d,
            compiled.cuda_sizes,
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
        let here = match gpu() {
            Ok(()) => "a GPU is available here".to_string(),
            Err(why) => format!("no GPU here: {why}"),
        };
        let KernelSizes {
            norm,
            widths,
            tokens,
            scan_states,
            neighborhoods,
        } = self.cuda_sizes;
        format!(
            "CUDA kernels: {how}; specialised to GroupNorms of {norm:?} values per sample, DiT rows of {widths:?}, attention rows of {tokens:?}, selective scans of state {scan_states:?} and neighbourhood attention of (head size, kernel) {neighborhoods:?}; {here}"
        )
    }

    /// The project root this run resolves the settings' relative paths against (`data.root`,
    /// `data.output_root` and the datasets under them): the build's checkout when it exists on
    /// this machine, else the current directory, as if the binary ran at the project root. Run-time
    /// paths (`dataset.name` as a path, `output_dir`, ...) are relative to the current directory
    /// either way. (docs/config.md, "Paths")
    pub fn root(&self) -> ProjectRoot {
        let build = PathBuf::from(self.project_root);
        if build.is_dir() {
            return ProjectRoot {
                dir: build,
                is_build: true,
            };
        }
        let cwd = std::env::current_dir().unwrap_or_default();
        ProjectRoot {
            dir: cwd,
            is_build: false,
        }
    }

    /// The config this run uses: the compiled one, or with `--set` overrides, the embedded TOML
    /// resolved again through the same validation as the build, refused if the result would need
    /// a different trainer.
    pub fn resolve(&self, sets: &[(String, String)]) -> Result<Config> {
        let root = self.root();
        if !root.is_build {
            println!(
                "the build's project root {} is not on this machine: settings paths resolve in {}",
                self.project_root,
                root.dir.display()
            );
        }
        if sets.is_empty() {
            return Ok((self.config)(&root.dir));
        }
        let env = Env {
            settings_override: None,
            home: std::env::var_os("HOME").map(PathBuf::from),
            embedded: Some(
                self.embedded
                    .iter()
                    .map(|(_, p, t)| {
                        (
                            config::settings::normalize(&root.dir.join(p)),
                            t.to_string(),
                        )
                    })
                    .collect(),
            ),
            project_root: root.dir,
            hub_cache: self.hub_cache.map(PathBuf::from),
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
        // The build printed the TOML's own warnings; those about an override are news.
        for w in r.warnings.iter().filter(|w| w.contains("--set ")) {
            eprintln!("{w}");
        }
        let params = r.plan.as_ref().map(|p| p.params).unwrap_or(0);
        if params != self.parameters {
            bail!("the overrides change the model ({} parameters instead of {}); change the TOML and rebuild", params, self.parameters);
        }
        Ok(r.config)
    }
}

/// Where [`Compiled::root`] found the project root.
pub struct ProjectRoot {
    pub dir: PathBuf,
    /// The build's own checkout (else the current directory).
    pub is_build: bool,
}

/// The dataset directory of `dataset.name` = `name`: `dir` as the config resolved it (a dataset
/// of the settings file, under the project root; else `name` as a path, relative to the current
/// directory), or an error naming where it looked and how to point the trainer at the data.
pub(crate) fn dataset_dir(
    compiled: &Compiled,
    name: &str,
    dir: &Path,
    named: bool,
) -> Result<PathBuf> {
    if dir.is_dir() {
        return Ok(dir.to_path_buf());
    }
    let looked = match named {
        true => {
            let root = compiled.root();
            let whose = match root.is_build {
                true => "the build's project root".to_string(),
                false => format!(
                    "the current directory (the build's project root {} is not on this machine)",
                    compiled.project_root
                ),
            };
            format!(
                "{} (the settings file's `[datasets.{name}]` output, under {whose} {})",
                dir.display(),
                root.dir.display()
            )
        }
        false => format!(
            "{} (a path relative to the current directory)",
            std::env::current_dir()
                .unwrap_or_default()
                .join(dir)
                .display()
        ),
    };
    bail!(
        "dataset.name = \"{name}\": no dataset directory at {looked}. Run where the data is, or `--set dataset.name=/path/to/dataset`"
    )
}

/// An error when the dataset at `dir` records images of another kind than `config` trains on
/// (data/layout.rs); time series carry no record.
pub(crate) fn check_layout(dir: &Path, config: &signal_diffusion_config::Config) -> Result<()> {
    if config.data_type != signal_diffusion_config::choice::DataType::Spectrogram {
        return Ok(());
    }
    let expected = crate::data::layout::Layout::new(config.output_type, config.polar_layout);
    crate::data::layout::check(
        dir,
        &expected,
        "the config (`data.output_type`, `data.polar_layout`)",
    )
}

/// The directories in `dir` whose names start with `prefix`, oldest first (by the number after
/// the prefix, then by name).
pub(crate) fn list_dirs(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
                })
                .collect()
        })
        .unwrap_or_default();
    let number = |p: &PathBuf| -> u64 {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        name[prefix.len().min(name.len())..]
            .parse()
            .unwrap_or(u64::MAX)
    };
    v.sort_by_key(|p| (number(p), p.clone()));
    v
}

/// UTC `YYYYmmdd-HHMMSS`, for run directory names.
pub(crate) fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    crate::track::utc_timestamp(secs, '-')
}

/// Where a run writes, created with its resolved config and plan: a resumed run continues in the
/// run that wrote the checkpoint (`<run>/checkpoints/<name>`); a new one is
/// `<output dir>/<name>-<timestamp>`, the output dir from `--output-dir`, else the config's, else
/// `default_base`.
pub(crate) fn run_directory(
    compiled: &Compiled,
    config: &Config,
    options: &RunOptions,
    resume: Option<&Path>,
    (output_dir, default_base): (Option<&String>, &str),
    name: String,
) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let run_dir = match resume {
        Some(ck) => ck
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .context("--resume takes <run>/checkpoints/<name>")?,
        None => {
            let base = options
                .output_dir
                .clone()
                .or(output_dir.map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(default_base));
            base.join(format!("{name}-{}", timestamp()))
        }
    };
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    std::fs::write(run_dir.join("config_resolved.json"), config.to_json())?;
    std::fs::write(run_dir.join("plan.txt"), compiled.plan)?;
    println!("run directory {}", run_dir.display());
    Ok(run_dir)
}

/// `--print-config` and `--plan`: print what was asked; true when the run stops there.
pub(crate) fn answered(compiled: &Compiled, config: &Config, options: &RunOptions) -> bool {
    if options.print_config {
        println!("{}", config.to_json());
    } else if options.plan {
        print!("{}", compiled.plan);
        println!("{}", compiled.kernels());
    }
    options.print_config || options.plan
}
