"""Issue 21's epoch benchmark: one training epoch that encodes every image with the VAE (what
the reference does in every epoch: `vae.encode` inside its training step) against the same
epoch reading the latents from our cache, same binary, same model, same machine.

Each pair runs the trainer of benches/latent_epoch.toml twice, in its own process each time:
first with an empty `dataset.cache_dir` (it encodes the 32 training images, then trains the
epoch), then again on the cache the first run wrote (it trains the epoch). Reported: the whole
process's wall-clock time of each (start-up, VAE and data loading included) and their ratio,
the median over `--pairs` with its spread, and the encode and update times the trainer prints.
The VAE has the SD 3.5 VAE's architecture with random weights (seed 0), written once by
diffusers (benches/vae_encode.py's sd35_shaped_vae) to target/sd35-shaped-vae; the demo data
comes from `sigdiff synth`.

usage (from the repository root):
    cargo run --release --bin sigdiff -- synth      # data/demo/stfts, if not there
    python3 benches/latent_epoch.py --write-vae     # once: target/sd35-shaped-vae
    SD_CONFIG=benches/latent_epoch.toml cargo build --release
    RAYON_NUM_THREADS=2 python3 benches/latent_epoch.py --pairs 3
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TRAINER = "target/release/train-latent_epoch"


def run(cache, out):
    started = time.perf_counter()
    log = subprocess.run([TRAINER, "--set", f"dataset.cache_dir={cache}", "--output-dir", out],
                         capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    text = log.stdout + log.stderr
    encoded = re.search(r"encoded the train split in ([0-9.]+) s", text)
    updates = re.search(r"done: \d+ updates in ([0-9.]+) s", text)
    return wall, encoded and float(encoded.group(1)), float(updates.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--write-vae", action="store_true")
    a = ap.parse_args()
    if a.write_vae:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from vae_encode import sd35_shaped_vae
        return sd35_shaped_vae("target/sd35-shaped-vae")
    encoding, cached = [], []
    for k in range(a.pairs):
        tmp = tempfile.mkdtemp(prefix="latent-epoch-")
        cache = os.path.join(tmp, "cache")
        first = run(cache, os.path.join(tmp, "runs"))
        assert first[1] is not None, "the first run did not encode: is the cache empty?"
        second = run(cache, os.path.join(tmp, "runs"))
        assert second[1] is None, "the second run encoded again: the cache was not reused"
        shutil.rmtree(tmp)
        encoding.append(first)
        cached.append(second)
        print(f"pair {k + 1}: encoding {first[0]:.1f} s (encode {first[1]:.1f} s, updates {first[2]:.1f} s), "
              f"cached {second[0]:.1f} s (updates {second[2]:.1f} s): {first[0] / second[0]:.2f}x", flush=True)
    ratios = [e[0] / c[0] for e, c in zip(encoding, cached)]
    print(f"epoch wall-clock ratio, encoding / cached: median {statistics.median(ratios):.2f}x "
          f"(pairs {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
