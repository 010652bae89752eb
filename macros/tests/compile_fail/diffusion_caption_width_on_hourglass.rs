signal_diffusion_macros::trainer!("diffusion_caption_width_on_hourglass.toml");

fn main() {}
