signal_diffusion_macros::trainer!("diffusion_dit_with_hourglass_keys.toml");

fn main() {}
