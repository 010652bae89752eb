signal_diffusion_macros::trainer!("diffusion_flip_on_time_series.toml");

fn main() {}
