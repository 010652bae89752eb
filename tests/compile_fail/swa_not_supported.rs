signal_diffusion_macros::trainer!("swa_not_supported.toml");

fn main() {}
