signal_diffusion_macros::trainer!("dropout_out_of_range.toml");

fn main() {}
