//! Any bytes given to the MAT-file (EEGLAB .set container) parser: an error or values, never
//! a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = signal_diffusion_runtime::data::signal::mat::parse(std::path::Path::new("fuzz.set"), data);
});
