signal_diffusion_macros::trainer!("several_errors_at_once.toml");

fn main() {}
