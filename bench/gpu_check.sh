#!/usr/bin/env bash
# One prepared run on a machine with an NVIDIA GPU: correctness on the GPU, then the GPU grid.
# Usage: bash bench/gpu_check.sh OUT_DIR
# Needs torch (CUDA), numpy, matplotlib, omegaconf, pillow, tqdm, pytest, hypothesis there; opacus travels
# as a wheel in .whl/ (pure Python; see bench/RESULTS.md), installed to /tmp/site. No network is used.
# Finishes in about 10 minutes at most on one H200 (each part has its own timeout).
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 - <<'PY' | tee "$OUT/env.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ["opacus", "triton", "omegaconf", "matplotlib", "hypothesis", "pytest_benchmark"]:
    try:
        m = importlib.import_module(name); print(name, getattr(m, "__version__", "?"))
    except Exception as e:
        print(name, "MISSING:", e, "-> engines or tests needing it are reported as failed/skipped")
PY

echo "== 1. correctness on the GPU (engine vs per-example loop and Opacus, rules vs loops) =="
DPDM_TEST_DEVICE=cuda timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt"

echo "== 2. GPU grid =="
ENGINES=nonprivate,dpdm_fast,dpdm_fast_triton,functorch
python3 -c "import opacus" 2>/dev/null && ENGINES=$ENGINES,opacus_kavg,opacus_ghost || echo "opacus missing: opacus_kavg and opacus_ghost NOT run"
timeout 300 python3 -m dpdm_fast.cli bench --device cuda --engines "$ENGINES" --workloads mnist,celeba \
  --grid 64x32,256x32,1024x8 --repeats 5 --out "$OUT" 2>&1 | tee "$OUT/bench_log.txt"

echo "== 3. issue 8's (B, K) grid, both networks (DP / non-private per cell) =="
GRID_ENGINES=nonprivate,dpdm_fast,dpdm_fast_triton
python3 -c "import opacus" 2>/dev/null && GRID_ENGINES=$GRID_ENGINES,opacus_kavg
timeout 200 python3 -m dpdm_fast.cli bench --device cuda --engines "$GRID_ENGINES" --workloads small,mnist \
  --grid full --repeats 3 --no-memory --max-step-s 5 --out "$OUT/grid" 2>&1 | tee "$OUT/grid_log.txt"
echo "wrote $OUT"
