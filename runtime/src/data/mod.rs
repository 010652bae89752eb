//! Everything that reads or writes samples: EEG recordings to spectrogram or time-series
//! datasets (`signal`), the training batches read from those datasets (`loader`), the file
//! formats they are stored in (`io`: PNG, NPY, atomic writes; `table`: Parquet in the Hugging
//! Face `datasets` layout), the image resizing and augmentations (`image`), and the caches of
//! decoded images (`cache`) and of their VAE latents (`latents`). It sits beside
//! `models` and imports neither `models` nor `train`.

pub mod cache;
pub mod image;
pub mod io;
pub mod latents;
pub mod layout;
pub mod loader;
pub mod signal;
pub mod table;
