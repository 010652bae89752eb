signal_diffusion_macros::trainer!("unknown_task.toml");

fn main() {}
