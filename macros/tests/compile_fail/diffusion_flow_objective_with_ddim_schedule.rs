signal_diffusion_macros::trainer!("diffusion_flow_objective_with_ddim_schedule.toml");

fn main() {}
