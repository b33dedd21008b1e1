#!/usr/bin/env bash
# Issue 10's prepared GPU run (one command, about 8 minutes at most on one H200): the kernel suite natively,
# the CUDA extension built and tested, then bench/kernels_gpu.py (conv weight gradient and whole-step ratios).
# Usage: bash bench/gpu_kernels.sh OUT_DIR     (opacus as a wheel in .whl/, as for bench/gpu_check.sh)
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_kernels.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# kernels/ and csrc/ install as dpdm_fast.kernels / dpdm_fast.csrc: link them in for a plain checkout
ln -sfn ../kernels dpdm_fast/kernels; ln -sfn ../csrc dpdm_fast/csrc
echo "== 1. kernel and engine tests, natively on the GPU =="
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_engine_triton.py \
  tests/test_cuda_kernels.py -rs 2>&1 | tee "$OUT/kernel_tests.txt"
echo "== 2. conv weight gradient and whole-step ratios =="
timeout 240 python3 bench/kernels_gpu.py --out "$OUT" 2>&1 | tee "$OUT/kernels_gpu.txt"
rm -f dpdm_fast/kernels dpdm_fast/csrc
echo "wrote $OUT"
