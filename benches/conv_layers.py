"""Per-layer convolution times on the CPU, ours beside PyTorch eager's, at the classification
baseline's shapes (cnn_light E 384: the 5×5 stem and the 3×3 convolutions of its three blocks),
batch 8, in alternating runs: ours, PyTorch, ours, PyTorch, ...

Ours: the conv bench (runtime/benches/conv.rs), whose rows marked `*` are the algorithm the
trainer runs at that shape; its backward is ∂W + ∂X (∂W alone for the stem, whose input needs no
gradient, as in training). PyTorch: `F.conv2d` forward and backward under torch.profiler, the
per-call CPU time of `aten::convolution` and `aten::convolution_backward` (median of 5 calls
after a warm-up), on the same threads; `ATEN_CPU_CAPABILITY` / `ONEDNN_MAX_CPU_ISA` cap its ISA
as `SIGNAL_DIFFUSION_MAX_CPU_ISA` caps ours.

usage: python3 benches/conv_layers.py --ours "$(cargo bench -p signal-diffusion-runtime --bench conv --no-run 2>&1 | grep -o 'target/release/deps/conv-[0-9a-f]*')" [--runs 3] [--threads 2]
"""

import argparse
import re
import statistics
import subprocess

import torch
import torch.nn.functional as F

# (in, out, side, kernel, input needs a gradient): classification baseline, in order.
SHAPES = [
    (1, 48, 256, 5, False),
    (48, 96, 128, 3, True),
    (96, 96, 128, 3, True),
    (96, 192, 64, 3, True),
    (192, 192, 64, 3, True),
    (192, 384, 32, 3, True),
    (384, 384, 32, 3, True),
]
BATCH = 8


def label(c, o, side, k):
    return f"{c}->{o} {k}x{k} @{side}x{side}"


def gflop(c, o, side, k):
    return 2 * BATCH * c * o * k * k * side * side / 1e9


def ours(binary):
    """{label: (forward s, backward s)} from one run of the conv bench."""
    out = subprocess.run([binary, "--bench", "x"], capture_output=True, text=True, check=True).stdout
    times = {}
    for c, o, side, k, needs_dx in SHAPES:
        row = next(l for l in out.splitlines() if l.startswith(label(c, o, side, k) + " ") and " *" in l)
        rates = [float(v) for v in re.findall(r"(-?[\d.]+) \(", row)]
        seconds = [gflop(c, o, side, k) / r for r in rates]
        times[label(c, o, side, k)] = (seconds[0], seconds[1] + (seconds[2] if needs_dx else 0.0))
    return times


def theirs():
    times = {}
    for c, o, side, k, needs_dx in SHAPES:
        x = torch.randn(BATCH, c, side, side, requires_grad=needs_dx)
        w = (torch.randn(o, c, k, k) * 0.1).requires_grad_()
        upstream = torch.randn(BATCH, o, side, side)

        def step():
            (F.conv2d(x, w, padding=k // 2) * upstream).sum().backward()

        step()
        calls = {"aten::convolution": [], "aten::convolution_backward": []}
        for _ in range(5):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
            for e in prof.key_averages():
                if e.key in calls:
                    calls[e.key].append(e.cpu_time_total / 1e6)
        times[label(c, o, side, k)] = tuple(statistics.median(calls[n]) for n in calls)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True, help="the conv bench binary")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    for i in range(args.runs):
        runs.append((ours(args.ours), theirs()))
        print(f"run {i + 1} of {args.runs} done", flush=True)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {BATCH}; ms, median of {args.runs} runs (ratio: PyTorch's time / ours, per run, median and range)")
    print(f"{'conv':<22} {'ours fwd':>9} {'torch fwd':>9} {'ratio':>17} {'ours bwd':>9} {'torch bwd':>9} {'ratio':>17}")
    totals = [[0.0] * 4 for _ in runs]
    for c, o, side, k, _ in SHAPES:
        key = label(c, o, side, k)
        cells = []
        for part in range(2):
            mine = [r[0][key][part] for r in runs]
            peer = [r[1][key][part] for r in runs]
            ratios = sorted(p / m for p, m in zip(peer, mine))
            cells += [
                f"{1e3 * statistics.median(mine):9.1f}",
                f"{1e3 * statistics.median(peer):9.1f}",
                f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})".rjust(17),
            ]
            for t, r in zip(totals, runs):
                t[2 * part] += r[0][key][part]
                t[2 * part + 1] += r[1][key][part]
        print(f"{key:<22} " + " ".join(cells))
    fwd = sorted(t[1] / t[0] for t in totals)
    bwd = sorted(t[3] / t[2] for t in totals)
    print(f"all layers: forward {statistics.median(fwd):.2f}x ({fwd[0]:.2f}-{fwd[-1]:.2f}), backward {statistics.median(bwd):.2f}x ({bwd[0]:.2f}-{bwd[-1]:.2f}) PyTorch's time")


if __name__ == "__main__":
    main()
