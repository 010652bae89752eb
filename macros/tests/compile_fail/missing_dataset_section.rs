signal_diffusion_macros::trainer!("missing_dataset_section.toml");

fn main() {}
