#!/usr/bin/env bash
# The GPU check, one short script for a lent GPU machine (see README, "GPU").
#
# 1. Builds csrc/cuda's kernel and its standalone check with nvcc for this GPU
#    and runs it: byte-exactness against a host reference (device and pinned
#    staging, unaligned, odd sizes, grid caps), then GB/s against
#    cudaMemcpyAsync of the same bytes. Needs only nvcc and the driver.
# 2. If a CUDA build of torch (and kvbridge's few Python deps) import, builds
#    kvbridge's libraries in place and runs tests/test_cuda_kernel.py: the
#    Python path (ctypes, copy_kv_blocks, HostMirror over a K/V-split cache).
#
# Output: $OUT/gpu-check.md and $OUT/gpu-pytest.txt (OUT defaults to
# benchmarks/results). Exit status: that of the standalone check, or of pytest
# when it ran and failed. Arguments go to the check (--quick: fewer sizes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT" build
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .)
if [ -z "$cap" ]; then
  echo "gpu-check: nvidia-smi reports no GPU" >&2
  exit 2
fi
echo "gpu-check: building for sm_$cap with $NVCC"
"$NVCC" -O3 -std=c++17 -arch="sm_$cap" csrc/cuda/check/kvb_cuda_check.cu \
  csrc/cuda/kvb_copy.cu -o build/kvb_cuda_check || exit 2
build/kvb_cuda_check "$@" | tee "$OUT/gpu-check.md"
rc=${PIPESTATUS[0]}

PY=${PYTHON:-python3}
if "$PY" -c "import torch, msgspec, numpy, pytest, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  KVBRIDGE_CUDA_ARCHS="$cap" KVBRIDGE_REQUIRE_KERNELS=1 "$PY" setup.py -q build_ext --inplace \
    > "$OUT/gpu-build.txt" 2>&1 || { echo "gpu-check: kvbridge build failed" >&2; exit 2; }
  "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda_kernel.py 2>&1 | tee "$OUT/gpu-pytest.txt"
  prc=${PIPESTATUS[0]}
  [ "$prc" -ne 0 ] && rc=$prc
else
  echo "gpu-check: no CUDA torch (or msgspec/numpy/pytest) in $PY: Python GPU tests not run" \
    | tee "$OUT/gpu-pytest.txt"
fi
exit "$rc"
