signal_diffusion_macros::trainer!("task_weight_for_unlisted_task.toml");

fn main() {}
