signal_diffusion_macros::trainer!("bad_settings_db_bounds.toml");

fn main() {}
