"""Side-by-side benchmark of one classification training step: ours vs PyTorch, on a GPU or on
the CPU.

The PyTorch side is the reference's cnn_light (spec/reference/classification.md §2.2) with its
three heads, built from the same numbers as config/classification/baseline.toml: 1×256×256 input,
E 384, depth 3, 3 repeats, GELU, dropout 0.43, batch 192, AdamW (lr 2e-4, wd 0.009, betas 0.9/0.995),
clip 1.0, losses CE(gender) + CE(health) + Huber(age, δ 2). Its parameter count is checked against
the plan's 5,249,477. TF32 on for matmuls and cuDNN, as the reference forces. Each step does what
ours does: forward, loss, backward, clip, optimizer step, one read of the losses to the host.

Ours is `train-baseline --benchmark N` (build with
`SD_CONFIG=config/classification/baseline.toml cargo build --release --features cuda`).
Peak GPU memory of each run is polled with nvidia-smi (the same way for both sides).

usage: python3 benches/classification_step.py --ours path/to/train [--steps 20] [--batch 192] [--amp]
(`--amp`: bf16 autocast on both sides: our `use_amp`, torch.autocast(bfloat16) for PyTorch.)
(`--batch` other than 192: compile `--ours` from a copy of baseline.toml with that batch_size.)

CPU: `--device cpu --threads 2 --batch 32 --steps 2` (ours compiled from baseline.toml with
batch_size 32; both sides on the same thread count, each in its own process so its peak RSS is
its own: ours through /usr/bin/time, PyTorch's from getrusage in the child). PyTorch eager
only unless `--compile`: torch.compile on the CPU (inductor's C++) takes minutes to compile.
"""

import argparse
import json
import resource
import subprocess
import sys
import threading
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def cnn_light(cin=1, e=384, depth=3, repeats=3, p=0.43):
    g = e / 4**depth
    gf, c0 = (4, int(g)) if g >= 8 else (2, int(e / 2**depth))
    channels = [c0 * gf ** (i + 1) for i in range(depth)]
    layers = [nn.Conv2d(cin, c0, 5, padding=2), nn.GELU(), nn.GroupNorm(1, c0), nn.Dropout(p), nn.AvgPool2d(2)]
    cin = c0
    for cout in channels:
        layers.append(nn.GroupNorm(1, cin))
        for j in range(repeats):
            layers += [nn.Conv2d(cin if j == 0 else cout, cout, 3, padding=1), nn.GELU()]
        layers += [nn.Dropout(p), nn.AvgPool2d(2)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


class Classifier(nn.Module):
    def __init__(self, e=384, outputs=(2, 2, 1)):
        super().__init__()
        self.backbone = cnn_light(e=e)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(e, 2 * e), nn.GELU(), nn.Linear(2 * e, o)) for o in outputs
        )

    def forward(self, x):
        f = self.backbone(x)
        return [h(f) for h in self.heads]


class PeakMemory:
    """Max of nvidia-smi's memory.used while the block runs (MiB)."""

    def __enter__(self):
        self.peak, self.stop = 0, False

        def poll():
            while not self.stop:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True,
                ).stdout.split()
                if out:
                    self.peak = max(self.peak, int(out[0]))
                time.sleep(0.05)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def torch_steps(compiled, steps, batch=192, dev="cuda", warmup=3, amp=False):
    torch.manual_seed(0)
    model = Classifier().to(dev)
    n = sum(p.numel() for p in model.parameters())
    assert n == 5_249_477, n
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.009, betas=(0.9, 0.995))
    x = torch.rand(batch, 1, 256, 256, device=dev) * 2 - 1
    yg = torch.randint(0, 2, (batch,), device=dev)
    yh = torch.randint(0, 2, (batch,), device=dev)
    ya = torch.rand(batch, device=dev)

    def loss_fn(outs):
        lg = F.cross_entropy(outs[0], yg)
        lh = F.cross_entropy(outs[1], yh)
        la = F.huber_loss(outs[2].squeeze(1), ya, delta=2.0)
        return lg + lh + la, torch.stack([lg, lh, la])

    fwd = torch.compile(model) if compiled else model

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
            outs = fwd(x)
        loss, per_task = loss_fn([o.float() for o in outs])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return torch.cat([loss[None], per_task]).tolist()[0]

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        last = step()
    sync()
    secs = time.perf_counter() - t0
    alloc = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None
    return steps / secs, last, alloc


def cpu_main(args):
    """Each side in its own process on `--threads` threads; peak RSS of each."""
    flops = 1975.6e9 * args.batch / 32  # the plan's FLOPs per step at batch 32 (train --plan)
    results = {}
    env = {"RAYON_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    import os
    out = subprocess.run(
        ["/usr/bin/time", "-f", "maxrss_kib %M", args.ours, "--benchmark", str(args.steps)],
        capture_output=True, text=True, env={**os.environ, **env},
    )
    print(out.stdout + out.stderr, flush=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("benchmark")]
    rss = [l for l in out.stderr.splitlines() if l.startswith("maxrss_kib")]
    if line:
        sps = float(line[0].split(" steps/s")[0].split()[-1])
        results["ours"] = {"steps_per_s": sps, "peak_rss_mib": int(rss[0].split()[1]) / 1024 if rss else None}
    variants = [("torch_eager", False)] + ([("torch_compile", True)] if args.compile else [])
    for name, compiled in variants:
        child = subprocess.run(
            [sys.executable, __file__, "--torch-cpu-child", str(int(compiled)), "--steps", str(args.steps),
             "--batch", str(args.batch), "--threads", str(args.threads), "--ours", args.ours],
            capture_output=True, text=True, env={**os.environ, **env},
        )
        print(child.stderr[-2000:], flush=True)
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    for r in results.values():
        r["samples_per_s"] = r["steps_per_s"] * args.batch
        r["gflops"] = r["steps_per_s"] * flops / 1e9
    if "ours" in results:
        for name, _ in variants:
            results[f"ours_over_{name}"] = results["ours"]["steps_per_s"] / results[name]["steps_per_s"]
    print(json.dumps(results, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=192, help="must equal the batch `--ours` was compiled with")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--threads", type=int, default=2, help="CPU: threads for both sides")
    ap.add_argument("--compile", action="store_true", help="CPU: also time torch.compile")
    ap.add_argument("--amp", action="store_true", help="GPU: bf16 autocast on both sides (our `use_amp`)")
    ap.add_argument("--torch-cpu-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_cpu_child is not None:
        torch.set_num_threads(args.threads)
        sps, last, _ = torch_steps(bool(args.torch_cpu_child), args.steps, args.batch, "cpu", warmup=1)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"steps_per_s": sps, "last_loss": last, "peak_rss_mib": rss}))
        return
    if args.device == "cpu":
        return cpu_main(args)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    flops = 11853.825e9 * args.batch / 192  # the plan's FLOPs per step at batch 192 (train --plan)
    results = {}
    with PeakMemory() as mem:
        amp = ["--set", "training.use_amp=true"] if args.amp else []
        out = subprocess.run([args.ours, "--benchmark", str(args.steps), *amp], capture_output=True, text=True)
    print(out.stdout + out.stderr, flush=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("benchmark")]
    if line:
        sps = float(line[0].split(" steps/s")[0].split()[-1])
        results["ours"] = {"steps_per_s": sps, "peak_mib_nvidia_smi": mem.peak}
    for name, compiled in [("torch_eager", False), ("torch_compile", True)]:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with PeakMemory() as mem:
            sps, last, alloc = torch_steps(compiled, args.steps, args.batch, amp=args.amp)
        results[name] = {"steps_per_s": sps, "peak_mib_nvidia_smi": mem.peak, "max_allocated_mib": alloc, "last_loss": last}
        print(name, results[name], flush=True)
    for r in results.values():
        r["samples_per_s"] = r["steps_per_s"] * args.batch
        r["tflops"] = r["steps_per_s"] * flops / 1e12
    if "ours" in results:
        for name in ("torch_eager", "torch_compile"):
            results[f"ours_over_{name}"] = results["ours"]["steps_per_s"] / results[name]["steps_per_s"]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
