signal_diffusion_macros::trainer!("hourglass_shifted_window_attention.toml");

fn main() {}
