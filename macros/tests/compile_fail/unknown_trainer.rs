signal_diffusion_macros::trainer!("unknown_trainer.toml");

fn main() {}
