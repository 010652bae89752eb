//! EEG signal processing: readers, decimation, the reference's log-frequency spectrogram and
//! its images, time-series normalisation, dataset layouts, preprocessing, and the synthetic demo.
pub mod datasets;
pub mod decimate;
pub mod edf;
pub mod preprocess;
pub mod spectrogram;
pub mod synth;
pub mod timeseries;
