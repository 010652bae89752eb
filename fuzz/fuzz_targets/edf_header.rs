//! Any bytes given to the EDF/BDF parser: an error or a recording, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = signal_diffusion_runtime::data::signal::edf::parse(std::path::Path::new("fuzz.edf"), data);
});
