//! EEG signal processing: the reference's log-frequency spectrogram and the synthetic demo data.
pub mod spectrogram;
pub mod synth;
