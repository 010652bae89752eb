//! Any bytes given to the Neuroscan header parser as a whole file: an error or a header, never
//! a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.cnt");
    let _ = signal_diffusion_runtime::data::signal::cnt::parse_header(path, data, data.len());
});
