signal_diffusion_macros::trainer!("diffusion_lora_unknown_target.toml");

fn main() {}
