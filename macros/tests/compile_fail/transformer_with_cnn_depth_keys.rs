signal_diffusion_macros::trainer!("transformer_with_cnn_depth_keys.toml");

fn main() {}
