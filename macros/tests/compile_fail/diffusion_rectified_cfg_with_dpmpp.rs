signal_diffusion_macros::trainer!("diffusion_rectified_cfg_with_dpmpp.toml");

fn main() {}
