signal_diffusion_macros::trainer!("unknown_optimizer.toml");

fn main() {}
