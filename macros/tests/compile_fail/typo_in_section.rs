signal_diffusion_macros::trainer!("typo_in_section.toml");

fn main() {}
