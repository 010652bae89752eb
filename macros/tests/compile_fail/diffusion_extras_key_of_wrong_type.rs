signal_diffusion_macros::trainer!("diffusion_extras_key_of_wrong_type.toml");

fn main() {}
