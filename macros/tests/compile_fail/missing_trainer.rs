signal_diffusion_macros::trainer!("missing_trainer.toml");

fn main() {}
