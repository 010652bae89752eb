signal_diffusion_macros::trainer!("diffusion_not_yet_supported.toml");

fn main() {}
