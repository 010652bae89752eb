signal_diffusion_macros::trainer!("transformer_heads_not_dividing_width.toml");

fn main() {}
