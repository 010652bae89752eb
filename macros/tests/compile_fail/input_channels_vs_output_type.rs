signal_diffusion_macros::trainer!("input_channels_vs_output_type.toml");

fn main() {}
