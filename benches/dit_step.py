"""Side-by-side benchmark of one DiT training step on the CPU: ours vs diffusers.

The diffusers side is `DiTTransformer2DModel` built from the numbers of benches/dit_cpu.toml
(6 heads x 64, 6 layers, 3x64x64, patch 2, unconditional: label table of 1001 rows), whose
parameter count is checked against the plan's 20,050,572. Each step does what ours does: the
rectified-flow loss (logit-normal sigma, x_t = (1-sigma)x + sigma*eps, target eps - x,
soft-min-SNR weights with gamma 5), backward, clip 1.0, AdamW (lr 1e-4, wd 0), one read of the
loss. Both sides run on `--threads` threads, each in its own process, so each peak RSS is its own
(ours through /usr/bin/time, diffusers' from getrusage in its child).

Ours is `train-dit_cpu --benchmark N` (build with `SD_CONFIG=benches/dit_cpu.toml cargo build
--release`).

usage: python3 benches/dit_step.py --ours target/release/train-dit_cpu [--steps 3] [--threads 2]
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def diffusers_child(steps, threads, batch=8):
    import torch
    from diffusers import DiTTransformer2DModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = DiTTransformer2DModel(
        num_attention_heads=6, attention_head_dim=64, in_channels=3, out_channels=3,
        num_layers=6, patch_size=2, sample_size=64, num_embeds_ada_norm=1000,
    ).train()
    params = sum(p.numel() for p in m.parameters())
    assert params == 20_050_572, params
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.0)
    x = torch.randn(batch, 3, 64, 64)
    labels = torch.zeros(batch, dtype=torch.long)

    def step():
        sigma = torch.ceil(1000 * torch.sigmoid(torch.randn(batch))).clamp(1, 1000) / 1000
        eps = torch.randn_like(x)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x + s * eps
        out = m(xt, timestep=sigma * 1000, class_labels=labels).sample
        snr = (1 - sigma) ** 2 / sigma**2
        w = (1 - sigma) ** 2 * 5.0 / (snr + 5.0)
        loss = (((out.float() - (eps - x)) ** 2).mean(dim=(1, 2, 3)) * w).mean()
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
    print(json.dumps({"images_per_s": steps * batch / secs, "secs": secs, "rss_gib": rss}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs of each side; medians reported")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return diffusers_child(args.steps, args.threads)
    env = {"RAYON_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin"}
    ours, ours_rss, theirs, theirs_rss = [], [], [], []
    for _ in range(args.repeat):
        out = subprocess.run(
            ["/usr/bin/time", "-f", "maxrss_kib %M", args.ours, "--benchmark", str(args.steps)],
            capture_output=True, text=True, env=env, check=True,
        )
        line = [l for l in out.stdout.splitlines() if l.startswith("benchmark")][0]
        ours.append(float(line.split(" images/s")[0].split()[-1]))
        rss = [l for l in out.stderr.splitlines() if l.startswith("maxrss_kib")][0]
        ours_rss.append(int(rss.split()[1]) / 1024 / 1024)
        child = subprocess.run(
            [sys.executable, __file__, "--ours", args.ours, "--steps", str(args.steps), "--threads", str(args.threads), "--child"],
            capture_output=True, text=True, check=True,
        )
        r = json.loads(child.stdout.strip().splitlines()[-1])
        theirs.append(r["images_per_s"])
        theirs_rss.append(r["rss_gib"])
    med = lambda v: sorted(v)[len(v) // 2]
    print(f"ours      {med(ours):.3f} images/s (runs {', '.join(f'{v:.3f}' for v in ours)})  peak RSS {max(ours_rss):.2f} GiB")
    print(f"diffusers {med(theirs):.3f} images/s (runs {', '.join(f'{v:.3f}' for v in theirs)})  peak RSS {max(theirs_rss):.2f} GiB")
    print(f"ratio (ours / diffusers, medians): speed {med(ours) / med(theirs):.2f}x, memory {max(ours_rss) / max(theirs_rss):.2f}x")


if __name__ == "__main__":
    main()
