signal_diffusion_macros::trainer!("missing_tasks.toml");

fn main() {}
