signal_diffusion_macros::trainer!("hourglass_window_does_not_divide_the_grid.toml");

fn main() {}
