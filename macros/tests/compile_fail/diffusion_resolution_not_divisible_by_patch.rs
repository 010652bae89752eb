signal_diffusion_macros::trainer!("diffusion_resolution_not_divisible_by_patch.toml");

fn main() {}
