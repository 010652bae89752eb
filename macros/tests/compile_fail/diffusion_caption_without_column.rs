signal_diffusion_macros::trainer!("diffusion_caption_without_column.toml");

fn main() {}
