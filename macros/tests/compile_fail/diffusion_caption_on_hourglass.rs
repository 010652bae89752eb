signal_diffusion_macros::trainer!("diffusion_caption_on_hourglass.toml");

fn main() {}
