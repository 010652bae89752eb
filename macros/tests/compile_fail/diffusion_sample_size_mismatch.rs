signal_diffusion_macros::trainer!("diffusion_sample_size_mismatch.toml");

fn main() {}
