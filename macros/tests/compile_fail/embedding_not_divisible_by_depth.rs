signal_diffusion_macros::trainer!("embedding_not_divisible_by_depth.toml");

fn main() {}
