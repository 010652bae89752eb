//! EEG signal processing: the reference's log-frequency spectrogram and the synthetic demo data.
pub mod decimate;
pub mod edf;
pub mod spectrogram;
pub mod synth;
pub mod timeseries;
