signal_diffusion_macros::trainer!("diffusion_unknown_model.toml");

fn main() {}
