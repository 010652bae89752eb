signal_diffusion_macros::trainer!("localmamba_num_res_blocks_disagrees_with_depths.toml");

fn main() {}
