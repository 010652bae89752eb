signal_diffusion_macros::trainer!("scheduler_kwarg_for_wrong_scheduler.toml");

fn main() {}
