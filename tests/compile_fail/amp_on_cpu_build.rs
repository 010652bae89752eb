signal_diffusion_macros::trainer!("amp_on_cpu_build.toml");

fn main() {}
