"""Side-by-side benchmark of the frozen VAE encoder on the CPU: ours (models/vae.rs, through
`cargo bench --bench vae_encode`) vs diffusers' AutoencoderKL, f32, in alternating runs (ours,
diffusers, ours, ...), each in its own process on `--threads` threads. The VAE has the SD 3.5
VAE's architecture (block_out_channels [128, 256, 512, 512], 2 layers per block, 16 latent
channels, 32 groups) with random weights (seed 0), written once to `--vae` by diffusers'
`save_pretrained`; nothing is downloaded.

It also prints what the encode cost means for latent training: the epoch-time ratio of encoding
every step (the reference's way) over training from the latent cache, projected as
(step + encode) / (step + cached read) per image from a DiT step time given with `--step-s`
(seconds per image of the trainer's `--benchmark` on the same machine).

usage: python3 benches/vae_encode.py [--resolution 256] [--batch 2] [--reps 3] [--pairs 3]
       [--threads 2] [--step-s S]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def sd35_shaped_vae(path):
    from diffusers import AutoencoderKL
    import torch

    if os.path.exists(os.path.join(path, "config.json")):
        return
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16,
        norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    ).save_pretrained(path)


def diffusers_child(path, resolution, batch, reps, threads):
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(threads)
    vae = AutoencoderKL.from_pretrained(path).eval()
    x = torch.randn(batch, 3, resolution, resolution) * 0.5
    with torch.no_grad():
        vae.encode(x)
        started = time.perf_counter()
        for _ in range(reps):
            vae.encode(x).latent_dist.mean.sum().item()
    print(json.dumps({"images_per_s": reps * batch / (time.perf_counter() - started)}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vae", default="/tmp/sd35-shaped-vae")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step-s", type=float, default=None)
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    if a.child:
        return diffusers_child(a.vae, a.resolution, a.batch, a.reps, a.threads)
    sd35_shaped_vae(a.vae)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    shape = [a.vae, str(a.resolution), str(a.batch), str(a.reps)]
    bench = ["cargo", "bench", "-q", "-p", "signal-diffusion-runtime", "--bench", "vae_encode"]
    subprocess.run(bench + ["--no-run"], check=True, env=env)
    ours_cmd = bench + ["--", *shape]
    ours, theirs = [], []
    for _ in range(a.pairs):
        out = subprocess.run(ours_cmd, capture_output=True, text=True, check=True, env=env).stdout
        ours.append(json.loads(out.strip().splitlines()[-1])["images_per_s"])
        child = [sys.executable, sys.argv[0], "--child", "--vae", a.vae, "--resolution", str(a.resolution),
                 "--batch", str(a.batch), "--reps", str(a.reps), "--threads", str(a.threads)]
        out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
        theirs.append(json.loads(out.strip().splitlines()[-1])["images_per_s"])
    ratios = [o / t for o, t in zip(ours, theirs)]
    print(f"encode {a.resolution}x{a.resolution}, batch {a.batch}, {a.threads} threads")
    print("ours images/s     ", " ".join(f"{v:.3f}" for v in ours))
    print("diffusers images/s", " ".join(f"{v:.3f}" for v in theirs))
    print(f"ratio median {statistics.median(ratios):.2f}x (pairs {min(ratios):.2f}-{max(ratios):.2f})")
    if a.step_s:
        encode_s = 1 / statistics.median(ours)
        print(f"projected epoch ratio, encoding every step / cached latents: "
              f"{(a.step_s + encode_s) / a.step_s:.2f}x (step {a.step_s:.3f} s + encode {encode_s:.3f} s per image)")


if __name__ == "__main__":
    main()
