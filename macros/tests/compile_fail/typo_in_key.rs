signal_diffusion_macros::trainer!("typo_in_key.toml");

fn main() {}
