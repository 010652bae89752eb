signal_diffusion_macros::trainer!("missing_settings_file.toml");

fn main() {}
