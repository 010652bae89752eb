signal_diffusion_macros::trainer!("negative_learning_rate.toml");

fn main() {}
