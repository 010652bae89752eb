#!/usr/bin/env bash
# Everything a GPU session should measure, in one run of a few minutes (device time is short):
# the kernels' parity tests, then the classification and DiT baseline steps side by side with
# PyTorch eager and torch.compile, f32 (TF32) and bf16. Needs gpu.tar.xz from
# benches/gpu_build.sh (carried; unpacked into gpu/) and PyTorch + diffusers on the GPU machine.
# Logs go to $OUT (or ./gpu-logs). Checks run in the order given (default: all, most telling
# first), each with at most 240 s, and none is started with less than 60 s left of BUDGET_S
# (default 540: one device call is limited to 600 s), so a short session still gets the first.
#
#   bash benches/gpu_checks.sh [parity] [dit-bf16] [classification-bf16] [dit-f32] [classification-f32] [timings]
#
# `timings` (not in the default list) prints the per-op times of runtime/tests/cuda.rs
# `op_timings` (convolutions, GELU, GroupNorm, pooling, the fused block tail against its ops apart).
set -uo pipefail
cd "$(dirname "$0")/.."
# The CUDA 13 libraries and cuDNN 9 (README, "Building for a GPU"): the toolkit's, then
# PyTorch's wheels.
cudnn=$(python3 -c 'import nvidia.cudnn, os; print(os.path.join(nvidia.cudnn.__path__[0], "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu${cudnn:+:$cudnn}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
[[ -x gpu/cuda-tests ]] || { mkdir -p gpu && xz -dc gpu.tar.xz | tar -C gpu -xf -; }
LOGS=${OUT:-gpu-logs}
mkdir -p "$LOGS"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$LOGS/gpu.txt"
deadline=$((SECONDS + ${BUDGET_S:-540}))
run() {
  local name=$1 left=$((deadline - SECONDS))
  shift
  if ((left < 60)); then echo "== $name: skipped, $left s of the budget left"; return; fi
  echo "== $name: $*"
  timeout $((left < 240 ? left : 240)) "$@" > "$LOGS/$name.log" 2>&1
  echo "rc=$?" >> "$LOGS/$name.log"
  tail -12 "$LOGS/$name.log"
}
dit=(python3 benches/dit_step.py --device cuda --ours gpu/train-diffusion --dims 16,72,12,64,2,32 --steps 10)
classification=(python3 benches/classification_step.py --ours gpu/train-classification --steps 10)
checks=("$@")
((${#checks[@]})) || checks=(parity dit-bf16 classification-bf16 dit-f32 classification-f32)
for check in "${checks[@]}"; do
  case $check in
    parity) run parity gpu/cuda-tests cuda:: --include-ignored --test-threads 1 --skip op_timings --nocapture ;;
    dit-bf16) run dit-bf16 "${dit[@]}" --precision bf16 ;;
    dit-f32) run dit-f32 "${dit[@]}" --precision no ;;
    classification-bf16) run classification-bf16 "${classification[@]}" --amp ;;
    classification-f32) run classification-f32 "${classification[@]}" ;;
    timings) run timings gpu/cuda-tests cuda::op_timings --include-ignored --exact --nocapture ;;
    *) echo "unknown check $check"; exit 2 ;;
  esac
done
