signal_diffusion_macros::trainer!("backbone_1d_on_spectrograms.toml");

fn main() {}
