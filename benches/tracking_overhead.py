#!/usr/bin/env python3
"""What experiment tracking costs a training run: the classification quickstart (the README's
`train`, 96 steps, a scalar every step and every 5 steps, evaluations each epoch) with every
tracker off, then with all three on (TensorBoard, MLflow, W&B offline), alternating off/on.

Reports, per pair, the wall time of each run and the trainer's own count of the time spent in
its logger ("tracking: X s of the run's Y s in the logger"), then the medians and the spread.
Usage: cargo build --release --bin train && python3 benches/tracking_overhead.py [pairs]
Needs the demo data (`cargo run --release --bin sigdiff -- synth --overwrite`).
"""
import os, re, shutil, statistics, subprocess, sys, tempfile, time

PAIRS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "target", "release", "train")
OFF = ["--set", "training.tensorboard=false"]
ON = ["--set", "training.tensorboard=true", "--set", "training.mlflow=true",
      "--set", "training.wandb_project=bench"]


def run(args):
    out = tempfile.mkdtemp(prefix="tracking-")
    env = dict(os.environ, MLFLOW_TRACKING_URI="", WANDB_MODE="offline")
    t0 = time.perf_counter()
    p = subprocess.run([TRAIN, "--output-dir", out, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(p.stdout + p.stderr)
    m = re.search(r"tracking: ([0-9.]+) s of the run's ([0-9.]+) s", p.stdout)
    shutil.rmtree(out)
    return wall, float(m.group(1)), float(m.group(2))


walls, shares = [], []
for i in range(PAIRS):
    off = run(OFF)
    on = run(ON)
    walls.append(on[0] / off[0])
    shares.append(on[1] / on[2])
    print(f"pair {i + 1}: off {off[0]:.2f} s (logger {off[1]:.3f} s), "
          f"on {on[0]:.2f} s (logger {on[1]:.3f} s = {100 * on[1] / on[2]:.2f} % of {on[2]:.1f} s)",
          flush=True)
print(f"logger share with all three trackers: median {100 * statistics.median(shares):.2f} % "
      f"(range {100 * min(shares):.2f}-{100 * max(shares):.2f} %)")
print(f"wall time on/off: median {statistics.median(walls):.3f} "
      f"(range {min(walls):.3f}-{max(walls):.3f}) over {PAIRS} alternating pairs")
