signal_diffusion_macros::trainer!("diffusion_classes_without_num_classes.toml");

fn main() {}
