//! `layout.json`: what the pixels of a spectrogram dataset mean (its output type and, for
//! db-polar, which of the two polar layouts), written by `sigdiff preprocess` and `sigdiff
//! sample` beside the images. Three-channel images all look alike to a loader, so a db-iq
//! dataset read by a db-polar config, or one polar layout read as the other, would train without
//! a complaint; with this record the trainer refuses at start instead. Datasets made by the
//! original implementation have no record and are read as the config says.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use signal_diffusion_config::choice::{OutputType, PolarLayout};

pub const FILE: &str = "layout.json";

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Layout {
    pub output_type: OutputType,
    /// Only for db-polar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polar_layout: Option<PolarLayout>,
}

impl Layout {
    pub fn new(output_type: OutputType, polar_layout: PolarLayout) -> Self {
        Layout {
            output_type,
            polar_layout: (output_type == OutputType::DbPolar).then_some(polar_layout),
        }
    }

    /// The polar layout to write with (any, when the images are not db-polar).
    pub fn polar(&self) -> PolarLayout {
        self.polar_layout.unwrap_or(PolarLayout::PhaseCosSin)
    }

    fn describe(&self) -> String {
        match self.polar_layout {
            Some(p) => format!("{} images in the `{p}` layout", self.output_type),
            None => format!("{} images", self.output_type),
        }
    }
}

/// The record of `dir`, if it has one.
pub fn read(dir: &Path) -> Result<Option<Layout>> {
    let path = dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{}: not a dataset layout record", path.display()))
            .map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

pub fn write(dir: &Path, layout: &Layout) -> Result<()> {
    let json = serde_json::to_string_pretty(layout)?;
    crate::data::io::write_atomic(&dir.join(FILE), |w| Ok(w.write_all(json.as_bytes())?))
}

/// An error when `dir`'s record says its images are not `expected`; `how` says how the reader
/// was told what to expect (the config keys, or the preprocessing options).
pub fn check(dir: &Path, expected: &Layout, how: &str) -> Result<()> {
    match read(dir)? {
        Some(found) if found != *expected => bail!(
            "{}: this dataset holds {}, but {how} says {}. Point the config at a dataset of that kind, set `[data] output_type`/`polar_layout` to what the dataset holds, or preprocess it again",
            dir.join(FILE).display(),
            found.describe(),
            expected.describe()
        ),
        _ => Ok(()),
    }
}
