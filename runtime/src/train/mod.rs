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
}

impl Compiled {
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
