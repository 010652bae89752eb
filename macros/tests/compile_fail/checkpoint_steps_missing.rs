signal_diffusion_macros::trainer!("checkpoint_steps_missing.toml");

fn main() {}
