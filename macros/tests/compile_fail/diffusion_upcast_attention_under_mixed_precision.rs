signal_diffusion_macros::trainer!("diffusion_upcast_attention_under_mixed_precision.toml");

fn main() {}
