"""Side-by-side benchmark of our two model ops on the CPU against the PyTorch versions the issues
name as peers, at the presets' shapes, forward + backward:

- neighbourhood attention (ops/neighborhood.rs, runtime/benches/neighborhood.rs) vs the naive
  unfold-based PyTorch version: each query's window clamped inside the grid as NATTEN does
  (windows from `Tensor.unfold`, picked per query), softmax, weighted sum, autograd backward;
- the selective scan (ops/selective_scan.rs, runtime/benches/selective_scan.rs) vs mamba-ssm's
  own `selective_scan_ref` (read out of a mamba checkout as runtime/tests/fixtures/selective_scan/
  generate.py does), autograd backward.

Each side runs in its own process on `--threads` threads, alternating (ours, PyTorch, ours, ...);
each run reports the median of 5 timed calls after a warm-up (as our bench binaries do). The
headline is the median of the pairs' ratios.

    python3 benches/ops_side_by_side.py --mamba /path/to/mamba [--repeat 3] [--threads 2]
"""

import argparse
import ast
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (our bench, case label filter, PyTorch case, shape)
CASES = [
    ("neighborhood", "hourglass-db level 0", "na", dict(b=8, h=128, w=128, heads=1, d=64, k=7)),
    ("neighborhood", "hourglass-db level 1", "na", dict(b=8, h=64, w=64, heads=2, d=64, k=7)),
    ("neighborhood", "hourglass-timeseries level 0", "na", dict(b=8, h=20, w=256, heads=2, d=64, k=7)),
    ("selective_scan", "localmamba-db level 0", "scan", dict(b=8, ch=768, g=3, n=16, l=256)),
]


def median(v):
    v = sorted(v)
    return v[len(v) // 2]


def timed(run):
    run()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return median(times)


def naive_neighborhood(q, k, v, kernel, scale):
    """(B, H, W, heads, d) inputs; NATTEN's window: start = clamp(i - k//2, 0, H - k)."""
    import torch

    b, h, w, heads, d = q.shape
    start = lambda n: (torch.arange(n) - kernel // 2).clamp(0, n - kernel)
    sh, sw = start(h), start(w)

    def windows(t):
        # (B, H-k+1, W-k+1, heads, d, k, k) as a view, then each query's window.
        u = t.unfold(1, kernel, 1).unfold(2, kernel, 1)
        return u[:, sh][:, :, sw]  # (B, H, W, heads, d, k, k)

    kw, vw = windows(k), windows(v)
    scores = torch.einsum("bhwnd,bhwndij->bhwnij", q * scale, kw)
    p = scores.flatten(-2).softmax(-1).view_as(scores)
    return torch.einsum("bhwnij,bhwndij->bhwnd", p, vw)


def pytorch_child(case, shape, threads, mamba):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if case == "na":
        s = shape
        dims = (s["b"], s["h"], s["w"], s["heads"], s["d"])
        q, k, v = (torch.randn(*dims, requires_grad=True) for _ in range(3))
        r = torch.randn(*dims)

        def run(backward):
            o = naive_neighborhood(q, k, v, s["k"], 0.125)
            if backward:
                (o * r).sum().backward()
    else:
        import torch.nn.functional as F
        from einops import rearrange, repeat

        source = open(os.path.join(mamba, "mamba_ssm", "ops", "selective_scan_interface.py")).read()
        fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "selective_scan_ref")
        scope = {"torch": torch, "F": F, "rearrange": rearrange, "repeat": repeat}
        exec(compile(ast.Module(body=[fn], type_ignores=[]), "selective_scan_ref", "exec"), scope)
        ref = scope["selective_scan_ref"]
        s = shape
        b, ch, g, n, l = s["b"], s["ch"], s["g"], s["n"], s["l"]
        inputs = [
            torch.randn(b, ch, l),
            torch.randn(b, ch, l) * 0.5,
            -torch.exp(torch.randn(ch, n) * 0.5),
            torch.randn(b, g, n, l),
            torch.randn(b, g, n, l),
            torch.randn(ch),
            torch.randn(ch) * 0.5,
        ]
        for t in inputs:
            t.requires_grad_(True)

        def run(backward):
            u, delta, A, B, C, D, bias = inputs
            y = ref(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True)
            if backward:
                y.sum().backward()

    both = timed(lambda: run(True))
    print(json.dumps({"forward_backward_ms": both * 1e3}))


def ours(bench, label, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(
        ["cargo", "bench", "-q", "-p", "signal-diffusion-runtime", "--bench", bench, "--", label],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 1, f"{bench} -- {label}: {out}"
    return rows[0]["forward_backward_ms"]


def theirs(case, shape, threads, mamba):
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, json.dumps(shape), "--threads", str(threads), "--mamba", mamba],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.splitlines()[-1])["forward_backward_ms"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mamba", required=True, help="a checkout of github.com/state-spaces/mamba")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="", help="run the cases whose label contains this")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return pytorch_child(args.child[0], json.loads(args.child[1]), args.threads, args.mamba)
    subprocess.run(["cargo", "bench", "-q", "-p", "signal-diffusion-runtime", "--no-run"], cwd=ROOT, check=True)
    for bench, label, case, shape in CASES:
        if args.only not in label:
            continue
        pairs = []
        for _ in range(args.repeat):
            a = ours(bench, label, args.threads)
            b = theirs(case, shape, args.threads, args.mamba)
            pairs.append((a, b))
        ratios = [b / a for a, b in pairs]
        print(
            f"{label}: ours {median([a for a, _ in pairs]):.1f} ms, PyTorch {median([b for _, b in pairs]):.1f} ms "
            f"(pairs {', '.join(f'{a:.0f}/{b:.0f}' for a, b in pairs)}); "
            f"speed-up median {median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
