signal_diffusion_macros::trainer!("diffusion_caption_on_dit.toml");

fn main() {}
