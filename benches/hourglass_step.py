"""Side-by-side benchmark of one hourglass training step on the CPU: ours vs k-diffusion's
`ImageTransformerDenoiserModelV2` (the model the reference's Hourglass2DModel ports), both
built from benches/hourglass_cpu.toml's numbers; the parameter counts are checked equal.

Each step does what ours does: the rectified-flow loss (logit-normal sigma on the 1000-level
grid, x_t = (1-sigma)x + sigma*eps, target eps - x, soft-min-SNR weights with gamma 5), backward,
clip 1.0, AdamW (lr 1e-4, wd 0), one read of the loss; the model takes sigma (k-diffusion's
c_noise = ln(sigma)/4 inside). Both sides run on `--threads` threads in their own processes,
alternating (ours, k-diffusion, ours, ...); medians and every run are printed.

    SD_CONFIG=benches/hourglass_cpu.toml cargo build --release
    python3 benches/hourglass_step.py --ours target/release/train-hourglass_cpu \
        --k-diffusion /path/to/k-diffusion [--steps 3] [--threads 2] [--repeat 3]

`--preset db-only` runs the reference's hourglass-db-only model instead (benches/hourglass_db_cpu.toml,
batch 2 of 3x256x256): its neighbourhood levels go through a stand-in for NATTEN (no CPU build),
the naive unfold-based version of benches/ops_side_by_side.py, with NATTEN's semantics (each
query's 7x7 window clamped inside the grid).

k-diffusion's layers import dctorch: `pip install --no-deps dctorch`.
"""

import argparse
import json
import os
import resource
import sys
import time
import types


def install_naive_natten():
    """A `natten` module whose fused na2d is the naive unfold-based neighbourhood attention."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ops_side_by_side import naive_neighborhood

    natten = types.ModuleType("natten")
    natten.has_fused_na = lambda: True
    natten.functional = types.SimpleNamespace(
        na2d=lambda q, k, v, kernel_size, scale=1.0: naive_neighborhood(q, k, v, kernel_size, scale)
    )
    sys.modules["natten"] = natten


def k_diffusion_child(root, steps, threads, preset):
    import torch

    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [os.path.join(root, "k_diffusion")]
    sys.modules["k_diffusion"] = pkg
    for stub in ("sampling", "utils"):
        sys.modules[f"k_diffusion.{stub}"] = types.ModuleType(f"k_diffusion.{stub}")
    from k_diffusion.models import image_transformer_v2 as it

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if preset == "db-only":
        na = it.NeighborhoodAttentionSpec(d_head=64, kernel_size=7)
        levels = [
            it.LevelSpec(depth=2, width=64, d_ff=512, self_attn=na, dropout=0.05),
            it.LevelSpec(depth=2, width=128, d_ff=512, self_attn=na, dropout=0.05),
            it.LevelSpec(depth=3, width=256, d_ff=512, self_attn=it.GlobalAttentionSpec(d_head=64), dropout=0.05),
        ]
        batch, size = 2, 256
    else:
        levels = [
            it.LevelSpec(depth=2, width=128, d_ff=384, self_attn=it.GlobalAttentionSpec(d_head=64), dropout=0.0),
            it.LevelSpec(depth=2, width=256, d_ff=768, self_attn=it.GlobalAttentionSpec(d_head=64), dropout=0.0),
        ]
        batch, size = 8, 64
    mapping = it.MappingSpec(depth=2, width=256, d_ff=768, dropout=0.0)
    m = it.ImageTransformerDenoiserModelV2(levels, mapping, in_channels=3, out_channels=3, patch_size=[2, 2]).train()
    flow_steps(lambda x, sigma: m(x, sigma), m, torch.randn(batch, 3, size, size), steps)


def flow_steps(forward, m, x, steps):
    """Times `steps` training steps of `m` (called as `forward(x_t, sigma)`) on the batch `x` after
    a warm-up, as our trainer's step: the rectified-flow loss with soft-min-SNR (gamma 5),
    backward, clip 1.0, AdamW (lr 1e-4, wd 0), one read of the loss. Prints the JSON line
    `alternate` reads."""
    import torch

    params = sum(p.numel() for p in m.parameters())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.0)
    batch = x.shape[0]

    def step():
        sigma = torch.ceil(1000 * torch.sigmoid(torch.randn(batch))).clamp(1, 1000) / 1000
        eps = torch.randn_like(x)
        s = sigma.view(-1, 1, 1, 1)
        out = forward((1 - s) * x + s * eps, sigma)
        snr = (1 - sigma) ** 2 / sigma**2
        w = (1 - sigma) ** 2 * 5.0 / (snr + 5.0)
        loss = (((out - (eps - x)) ** 2).mean(dim=(1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        return loss.item()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(json.dumps({"images_per_s": steps * batch / secs, "rss_gib": rss, "params": params}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--k-diffusion", required=True, help="a checkout of github.com/crowsonkb/k-diffusion")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--preset", choices=["small", "db-only"], default="small")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.preset == "db-only":
            install_naive_natten()
        return k_diffusion_child(args.k_diffusion, args.steps, args.threads, args.preset)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dit_step import alternate, plan_numbers

    params, _ = plan_numbers(args.ours)
    child = ["--ours", args.ours, "--k-diffusion", args.k_diffusion, "--steps", str(args.steps),
             "--threads", str(args.threads), "--preset", args.preset, "--child"]
    print_pairs("k-diffusion", *alternate(args.ours, child, args.steps, args.threads, args.repeat, params))


def print_pairs(peer, ours, ours_rss, theirs, theirs_rss):
    """Each side's median images/s and runs, and the median of the pairs' ratios."""
    med = lambda v: sorted(v)[len(v) // 2]
    ratios = [a / b for a, b in zip(ours, theirs)]
    print(f"{'ours':13}{med(ours):.3f} images/s (runs {', '.join(f'{v:.3f}' for v in ours)})  peak RSS {max(ours_rss):.2f} GiB")
    print(f"{peer:13}{med(theirs):.3f} images/s (runs {', '.join(f'{v:.3f}' for v in theirs)})  peak RSS {max(theirs_rss):.2f} GiB")
    print(f"ratio (ours / {peer}): median of pairs {med(ratios):.2f}x (pairs {', '.join(f'{v:.2f}' for v in ratios)}), memory {max(ours_rss) / max(theirs_rss):.2f}x")


if __name__ == "__main__":
    main()
