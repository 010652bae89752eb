signal_diffusion_macros::trainer!("wrong_type_float_for_int.toml");

fn main() {}
