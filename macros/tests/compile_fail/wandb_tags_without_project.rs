signal_diffusion_macros::trainer!("wandb_tags_without_project.toml");

fn main() {}
