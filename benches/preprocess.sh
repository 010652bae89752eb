#!/usr/bin/env bash
# Preprocessing throughput, ours next to the numpy/scipy baseline, in one run on one machine.
# Needs: Rust, Python 3 with numpy, scipy, pillow (pip install numpy scipy pillow).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -p signal-diffusion-runtime --bench preprocess 2>/dev/null | grep '^{'
python3 benches/spectrogram_baseline.py runtime/tests/fixtures/s001r02_picked_125hz_f64.npy
