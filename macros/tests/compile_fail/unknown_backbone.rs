signal_diffusion_macros::trainer!("unknown_backbone.toml");

fn main() {}
