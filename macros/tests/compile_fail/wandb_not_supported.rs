signal_diffusion_macros::trainer!("wandb_not_supported.toml");

fn main() {}
