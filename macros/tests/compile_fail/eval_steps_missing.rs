signal_diffusion_macros::trainer!("eval_steps_missing.toml");

fn main() {}
