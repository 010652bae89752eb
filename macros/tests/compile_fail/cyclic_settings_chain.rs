signal_diffusion_macros::trainer!("cyclic_settings_chain.toml");

fn main() {}
