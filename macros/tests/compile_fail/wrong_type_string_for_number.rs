signal_diffusion_macros::trainer!("wrong_type_string_for_number.toml");

fn main() {}
