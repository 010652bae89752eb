#!/usr/bin/env bash
# Builds, on a machine without a GPU, what benches/gpu_checks.sh runs on a GPU machine: the
# classification and DiT baseline trainers and the CUDA parity-test binary, all `--features
# cuda`, stripped into gpu/ and packed as gpu.tar.xz (both ignored by git; carry the archive:
# ≈ 20 MiB, where the three binaries are ≈ 170 MiB, mostly Candle's PTX, and a carry is limited
# to 64 MiB).
#
#   bash benches/gpu_build.sh [cuda-toolkit-dir]     # default ~/.cache/signal-diffusion/cuda13
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA=${1:-$HOME/.cache/signal-diffusion/cuda13}
bash .ci/cuda-toolkit.sh "$CUDA"
export CUDA_HOME=$CUDA PATH=$CUDA/bin:$PATH CUDA_COMPUTE_CAP=90
# A target directory of its own: the cuda feature would otherwise rebuild the CPU artifacts.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
mkdir -p gpu
for config in classification/baseline diffusion/baseline; do
  SD_CONFIG=config/$config.toml cargo build --release --features cuda --bin train
  cp "$CARGO_TARGET_DIR/release/train" "gpu/train-${config%%/*}"
done
tests=$(cargo test --release --features cuda -p signal-diffusion-runtime --test runtime --no-run \
  --message-format=json | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "runtime" and m.get("executable"):
        print(m["executable"])')
cp "$tests" gpu/cuda-tests
# The CUDA runtime the binaries link (rpath $ORIGIN); everything else is loaded at run time.
cp -L "$CUDA/lib/libcudart.so.13" gpu/
strip gpu/train-* gpu/cuda-tests
tar -C gpu -cf - . | xz -T0 -6 > gpu.tar.xz
du -sh gpu/* gpu.tar.xz
