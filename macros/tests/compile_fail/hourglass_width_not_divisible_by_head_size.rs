signal_diffusion_macros::trainer!("hourglass_width_not_divisible_by_head_size.toml");

fn main() {}
