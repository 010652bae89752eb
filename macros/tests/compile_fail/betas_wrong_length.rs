signal_diffusion_macros::trainer!("betas_wrong_length.toml");

fn main() {}
