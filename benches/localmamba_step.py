"""Side-by-side benchmark of one LocalMamba training step on the CPU: ours vs the PyTorch port of
the reference's LocalMamba2DModel (runtime/tests/fixtures/localmamba/port.py: k-diffusion's
skeleton, LocalVMamba's SS2D, mamba-ssm's own `selective_scan_ref`, which is what runs where the
reference's CUDA-only `selective_scan_fn` cannot), both built from benches/localmamba_db_cpu.toml's
numbers (the reference's localmamba-db-only at batch 4); the parameter counts are checked equal.

Each step does what ours does (hourglass_step.py's `flow_steps`): the rectified-flow loss with
soft-min-SNR (gamma 5), backward, clip 1.0, AdamW (lr 1e-4, wd 0), one read of the loss. Both
sides run on `--threads` threads in their own processes, alternating (ours, PyTorch, ours, ...);
medians and every run are printed, with each side's peak RSS.

    SD_CONFIG=benches/localmamba_db_cpu.toml HF_HUB_CACHE=tests/fixtures/hub cargo build --release
    python3 benches/localmamba_step.py --ours target/release/train-localmamba_db_cpu \\
        --k-diffusion /path/to/k-diffusion --mamba /path/to/mamba [--steps 2] [--repeat 3]

k-diffusion's layers import dctorch: `pip install --no-deps dctorch`.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def port_child(kd_root, mamba_root, steps, threads):
    import torch

    sys.path.insert(0, os.path.join(HERE, "..", "runtime", "tests", "fixtures", "localmamba"))
    import port

    port.setup(kd_root, mamba_root)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = port.LocalMamba2DModel(
        dims=[128, 256, 512], depths=[2, 2, 2],
        mapping=port.it.MappingSpec(depth=2, width=256, d_ff=768, dropout=0.0),
        in_channels=16, out_channels=16, patch_size=[2, 2], num_classes=0, mapping_cond_dim=0,
        d_state=16, ssm_ratio=2.0, dt_rank="auto", d_conv=3, directions=["h", "v", "w7"],
    ).train()
    sys.path.insert(0, HERE)
    from hourglass_step import flow_steps

    flow_steps(lambda x, sigma: m(x, sigma, None, None), m, torch.randn(4, 16, 32, 32), steps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--k-diffusion", required=True, help="a checkout of github.com/crowsonkb/k-diffusion")
    ap.add_argument("--mamba", required=True, help="a checkout of github.com/state-spaces/mamba")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return port_child(args.k_diffusion, args.mamba, args.steps, args.threads)
    sys.path.insert(0, HERE)
    from dit_step import alternate, plan_numbers
    from hourglass_step import print_pairs

    params, _ = plan_numbers(args.ours)
    child = ["--ours", args.ours, "--k-diffusion", args.k_diffusion, "--mamba", args.mamba,
             "--steps", str(args.steps), "--threads", str(args.threads), "--child"]
    print_pairs("PyTorch port", *alternate(args.ours, child, args.steps, args.threads, args.repeat, params))


if __name__ == "__main__":
    main()
