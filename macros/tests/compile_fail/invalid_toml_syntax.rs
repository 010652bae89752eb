signal_diffusion_macros::trainer!("invalid_toml_syntax.toml");

fn main() {}
