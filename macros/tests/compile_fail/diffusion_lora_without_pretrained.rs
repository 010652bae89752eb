signal_diffusion_macros::trainer!("diffusion_lora_without_pretrained.toml");

fn main() {}
