"""Side-by-side benchmark of one DiT training step: ours vs diffusers, on the CPU or a GPU.

The diffusers side is `DiTTransformer2DModel` built from `--dims` (heads, head dim, layers,
image size, patch, batch; default the numbers of benches/dit_cpu.toml: 6 x 64, 6 layers, 64x64,
patch 2, batch 8; unconditional: label table of 1001 rows), whose parameter count is checked
against our binary's plan (`--plan`). Each step does what ours does: the
rectified-flow loss (logit-normal sigma, x_t = (1-sigma)x + sigma*eps, target eps - x,
soft-min-SNR weights with gamma 5), backward, clip 1.0, AdamW (lr 1e-4, wd 0), one read of the
loss. Both sides run on `--threads` threads, each in its own process, so each peak RSS is its own
(ours through /usr/bin/time, diffusers' from getrusage in its child).

Ours is `train-dit_cpu --benchmark N` (build with `SD_CONFIG=benches/dit_cpu.toml cargo build
--release`).

usage: python3 benches/dit_step.py --ours target/release/train-dit_cpu [--steps 3] [--threads 2]

Latent space: `--channels 16` with ours from benches/dit_latent_cpu.toml (the same DiT on the SD 3.5
VAE's 16 × 64 × 64 latents of 512² images; build with HF_HUB_CACHE=tests/fixtures/hub, which holds
that VAE's config.json): `--ours target/release/train-dit_latent_cpu --channels 16`.

LoRA (`--lora R`): the same DiT fine-tuned through rank-R adapters on to_q, to_k, to_v and to_out.0
(alpha = R), diffusers + PEFT's `get_peft_model` against ours from benches/dit_lora_cpu.toml, whose
`model.pretrained` is random weights this script writes first (`--write-base target/dit_lora_base`,
diffusers' `save_pretrained`; then `SD_CONFIG=benches/dit_lora_cpu.toml cargo build --release`):
`--ours target/release/train-dit_lora_cpu --lora 16`. Only the adapters are in either optimizer.

GPU (`--device cuda`): ours built with `--features cuda` from the config whose numbers `--dims`
repeats (config/diffusion/baseline.toml: `--dims 16,72,12,64,2,32`), then ours, diffusers eager
and diffusers under `torch.compile`, each under `--precision` (bf16: our
`mixed_precision = "bf16"`, torch.autocast(bfloat16) for diffusers; no: f32 with TF32), with
images/s, peak GPU memory and MFU: the plan's FLOPs per step x steps/s over `--peak-tflops`
(989: dense bf16 of an H100/H200 SXM).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def dit(dims, channels):
    from diffusers import DiTTransformer2DModel

    heads, head_dim, layers, size, patch, _ = dims
    return DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels, out_channels=channels,
        num_layers=layers, patch_size=patch, sample_size=size, num_embeds_ada_norm=1000,
    )


def diffusers_child(steps, threads, dims, device="cpu", compiled=False, precision="no", channels=3, lora=0):
    import torch

    heads, head_dim, layers, size, patch, batch = dims
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    m = dit(dims, channels).to(device).train()
    params = sum(p.numel() for p in m.parameters())
    if lora:
        from peft import LoraConfig, get_peft_model

        m = get_peft_model(m, LoraConfig(r=lora, lora_alpha=lora, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    trained = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0)
    x = torch.randn(batch, channels, size, size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    forward = torch.compile(m) if compiled else m
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step():
        sigma = torch.ceil(1000 * torch.sigmoid(torch.randn(batch, device=device))).clamp(1, 1000) / 1000
        eps = torch.randn_like(x)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x + s * eps
        with torch.autocast(device, dtype=dtype, enabled=precision == "bf16"):
            out = forward(xt, timestep=sigma * 1000, class_labels=labels).sample
        snr = (1 - sigma) ** 2 / sigma**2
        w = (1 - sigma) ** 2 * 5.0 / (snr + 5.0)
        loss = (((out.float() - (eps - x)) ** 2).mean(dim=(1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        return loss.item()

    for _ in range(3 if device == "cuda" else 1):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(json.dumps({"images_per_s": steps * batch / secs, "secs": secs, "rss_gib": peak, "params": params}))


def alternate(ours, child_args, steps, threads, repeat, params):
    """`repeat` alternating runs (ours, the peer, ours, ...), each in its own process on
    `threads` threads: ours is `ours --benchmark steps` under /usr/bin/time, the peer this
    script's caller run with `child_args` (it prints a JSON line with images_per_s, rss_gib and
    params, which must equal ours). Returns each side's images/s and peak RSS (GiB) per run."""
    env = {"RAYON_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
    ours_ips, ours_rss, theirs, theirs_rss = [], [], [], []
    for _ in range(repeat):
        out = subprocess.run(
            ["/usr/bin/time", "-f", "maxrss_kib %M", ours, "--benchmark", str(steps)],
            capture_output=True, text=True, env=env, check=True,
        )
        line = [l for l in out.stdout.splitlines() if l.startswith("benchmark")][0]
        ours_ips.append(float(line.split(" images/s")[0].split()[-1]))
        rss = [l for l in out.stderr.splitlines() if l.startswith("maxrss_kib")][0]
        ours_rss.append(int(rss.split()[1]) / 1024 / 1024)
        child = subprocess.run(
            [sys.executable, sys.argv[0], *child_args], capture_output=True, text=True, check=True,
        )
        r = json.loads(child.stdout.strip().splitlines()[-1])
        assert r["params"] == params, (r["params"], params)
        theirs.append(r["images_per_s"])
        theirs_rss.append(r["rss_gib"])
    return ours_ips, ours_rss, theirs, theirs_rss


def plan_numbers(ours):
    """(parameters, FLOPs per step) from our binary's `--plan`."""
    out = subprocess.run([ours, "--plan"], capture_output=True, text=True, check=True).stdout
    params = int([l for l in out.splitlines() if l.startswith("total parameters")][0].split()[-1].replace(",", ""))
    gflop = float([l for l in out.splitlines() if l.startswith("FLOPs per training step")][0].split()[4])
    return params, gflop * 1e9


def gpu_main(args, dims):
    # The same memory measure for every side: the peak of nvidia-smi's memory.used while its
    # process runs (context and allocator caches included); PyTorch's own peak allocation too.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from classification_step import PeakMemory

    params, flops = plan_numbers(args.ours)
    batch = dims[5]
    sets = ["--set", f"training.mixed_precision={args.precision}"]
    with PeakMemory() as mem:
        out = subprocess.run([args.ours, "--benchmark", str(args.steps), *sets], capture_output=True, text=True, check=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("benchmark")][0]
    rows = [("ours", float(line.split(" images/s")[0].split()[-1]), mem.peak, None)]
    for name, compiled in [("diffusers eager", False), ("diffusers torch.compile", True)]:
        with PeakMemory() as mem:
            child = subprocess.run(
                [sys.executable, __file__, "--ours", args.ours, "--steps", str(args.steps), "--dims", args.dims,
                 "--device", "cuda", "--precision", args.precision, "--child"] + (["--compiled"] if compiled else []),
                capture_output=True, text=True, check=True,
            )
        r = json.loads(child.stdout.strip().splitlines()[-1])
        assert r["params"] == params, (r["params"], params)
        rows.append((name, r["images_per_s"], mem.peak, r["rss_gib"]))
    for name, ips, smi_mib, allocated in rows:
        mfu = flops * ips / batch / (args.peak_tflops * 1e12)
        mem = f"peak {smi_mib / 1024:.2f} GiB in use (nvidia-smi)"
        if allocated is not None:
            mem += f", {allocated:.2f} GiB allocated by PyTorch"
        print(f"{name:24} {ips:9.1f} images/s  {ips / batch:6.2f} steps/s  MFU {100 * mfu:5.1f} %  {mem}")
    print(f"ours / eager {rows[0][1] / rows[1][1]:.2f}x, ours / compile {rows[0][1] / rows[2][1]:.2f}x ({args.precision})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="CPU: alternating runs of each side; medians reported")
    ap.add_argument("--dims", default="6,64,6,64,2,8", help="heads,head_dim,layers,size,patch,batch of --ours's config")
    ap.add_argument("--channels", type=int, default=3, help="input channels: 16 for SD 3.5 VAE latents (benches/dit_latent_cpu.toml)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["no", "bf16"], default="bf16", help="GPU only; the CPU bench runs f32")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU: the dense bf16 peak MFU is measured against")
    ap.add_argument("--lora", type=int, default=0, help="CPU: rank of LoRA adapters on the attention projections (ours: benches/dit_lora_cpu.toml)")
    ap.add_argument("--write-base", help="write random weights of --dims in diffusers' layout to this directory and exit")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    dims = [int(v) for v in args.dims.split(",")]
    if args.write_base:
        import torch

        torch.manual_seed(0)
        return dit(dims, args.channels).save_pretrained(args.write_base)
    if args.child:
        precision = args.precision if args.device == "cuda" else "no"
        return diffusers_child(args.steps, args.threads, dims, args.device, args.compiled, precision, args.channels, args.lora)
    if args.device == "cuda":
        return gpu_main(args, dims)
    params, _ = plan_numbers(args.ours)
    child = ["--ours", args.ours, "--steps", str(args.steps), "--threads", str(args.threads), "--dims", args.dims,
             "--channels", str(args.channels), "--lora", str(args.lora), "--child"]
    ours, ours_rss, theirs, theirs_rss = alternate(args.ours, child, args.steps, args.threads, args.repeat, params)
    med = lambda v: sorted(v)[len(v) // 2]
    print(f"ours      {med(ours):.3f} images/s (runs {', '.join(f'{v:.3f}' for v in ours)})  peak RSS {max(ours_rss):.2f} GiB")
    peer = "diffusers + PEFT" if args.lora else "diffusers"
    print(f"{peer} {med(theirs):.3f} images/s (runs {', '.join(f'{v:.3f}' for v in theirs)})  peak RSS {max(theirs_rss):.2f} GiB")
    print(f"ratio (ours / diffusers, medians): speed {med(ours) / med(theirs):.2f}x, memory {max(ours_rss) / max(theirs_rss):.2f}x")


if __name__ == "__main__":
    main()
