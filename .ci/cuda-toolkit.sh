#!/usr/bin/env bash
# Installs what `cargo build --features cuda` needs on a machine with no GPU and no CUDA install:
# nvcc 13.0 and the CUDA 13 headers from NVIDIA's PyPI wheels, plus link-only stubs of the driver
# and toolkit libraries (libcuda, cublas, cublasLt, curand, nvrtc, cudnn) generated from cudarc's
# symbol list.
#
#   bash .ci/cuda-toolkit.sh ~/.cache/signal-diffusion/cuda13
#   export CUDA_HOME=~/.cache/signal-diffusion/cuda13 PATH=~/.cache/signal-diffusion/cuda13/bin:$PATH CUDA_COMPUTE_CAP=90
#   cargo build --release --features cuda
#
# Pinned to 13.0.x on purpose: newer nvcc writes a PTX ISA that a CUDA 13.0 driver rejects.
# The stubs are for linking only; never put <dest>/lib/stubs on LD_LIBRARY_PATH at run time.
set -euo pipefail
DEST=${1:?usage: cuda-toolkit.sh <install-dir>}
if [[ -x $DEST/bin/nvcc && -f $DEST/lib/stubs/libcudnn.so ]]; then
  echo "CUDA toolkit already in $DEST"; exit 0
fi
HERE=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
python3 -m pip download -q --no-deps -d "$TMP" nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
for w in "$TMP"/*.whl; do python3 -m zipfile -e "$w" "$TMP/x"; done
mkdir -p "$DEST" && cp -a "$TMP/x/nvidia/cu13/." "$DEST/"
chmod +x "$DEST"/bin/* "$DEST"/nvvm/bin/*   # zipfile drops the executable bit
ln -sf libcudart.so.13 "$DEST/lib/libcudart.so"

# Link stubs: every `pub unsafe fn cu*` cudarc declares, as an empty C function, with the real soname.
(cd "$HERE" && cargo fetch -q)
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1)
mkdir -p "$DEST/lib/stubs"
stub() {
  grep -oE '^pub unsafe fn [A-Za-z0-9_]+' "$CUDARC/src/$3/sys/mod.rs" | awk '{print "void "$4"(void){}"}' | sort -u >"$TMP/$1.c"
  cc -shared -fPIC -o "$DEST/lib/stubs/lib$1.so" -Wl,-soname,"$2" "$TMP/$1.c"
}
stub cuda libcuda.so.1 driver
stub cublas libcublas.so.13 cublas
stub cublasLt libcublasLt.so.13 cublaslt
stub curand libcurand.so.10 curand
stub nvrtc libnvrtc.so.13 nvrtc
stub cudnn libcudnn.so.9 cudnn   # cuDNN 9 (PyTorch's nvidia-cudnn-cu13 wheel provides the real one)
echo "CUDA toolkit installed in $DEST"
