signal_diffusion_macros::trainer!("transformer_dims_against_the_data.toml");

fn main() {}
