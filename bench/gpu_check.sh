#!/usr/bin/env bash
# The one prepared GPU run: every open GPU question in at most 9 minutes on one GPU, most valuable first.
#
#   bash bench/gpu_check.sh OUT [--data DIR] [--bundle FILE] [--cpu-dry-run]
#
# Each section runs under its own time limit and the whole under GPU_CHECK_BUDGET_S (default 530 s):
# a section that would start with too little time left is recorded as skipped. Each writes
# OUT/NN_name.txt as it goes and a line "NN_name rc=R Ss" to OUT/summary.txt, so a run cut off at any
# point still reports what it reached.
#   01_env            GPU, driver, torch, CUDA, Triton, nvcc, Opacus
#   02_kernels        the kernel and fp16 tests natively (Triton kernels, the CUDA extension, GradScaler)
#   03_engine         the engine with each backend (torch, triton, cuda) against the per-example loop and
#                     Opacus on the published MNIST and CelebA networks (tests/test_gpu.py)
#   04_published      the published MNIST config at K=32: dp.max_physical_batch_size=auto's plan, a
#                     measured pass (rows/s, peak memory) and the projected time of the paper's 4,500 steps
#   05_grid           the (B, K) speed grid on both networks, non-private / dpdm_fast (torch, triton) /
#                     Opacus interleaved (OUT/grid: results.json, .md, .png)
#   06_nccl           the trainer under torchrun with world size 1 (NCCL on a GPU)
#   07_train          a 2-minute training run of the quick preset (SIGTERM at the limit: it checkpoints),
#                     then a sample grid from its checkpoint (OUT/train/samples.png)
#   08_audit          the one-run audit (default setting) with the Triton backend
#
# --bundle FILE: after every section, OUT (checkpoints and sample arrays left out) as one .tar.gz at FILE,
# replaced whole each time: the device tool brings back at most 8 files from its $OUT, so run with
# OUT on the machine's disk and FILE under $OUT (bench/gpu_carry.py prints the call).
# --data DIR: the folder holding mnist/ (default: shared/data in this checkout, else ../shared/data);
# on the device machine, `python bench/gpu_carry.py` first copies ../shared/data/mnist into shared/data and
# downloads the wheels the device image lacks (omegaconf, kornia, Opacus) into .whl/, both git-excluded;
# carry both. Without omegaconf or kornia the run stops at once, saying so; without Opacus its parts say so.
# --cpu-dry-run: the same sections on the CPU with tiny shapes and the torch backend (pytest collects the
# GPU tests without running them), about a minute: a default test runs it, so the script cannot rot.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUT [--data DIR] [--bundle FILE] [--cpu-dry-run]}
shift
DRY=0
DATA=""
BUNDLE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --data) DATA=${2:?--data needs a folder}; shift ;;
    --bundle) BUNDLE=${2:?--bundle needs a file}; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
START=$(date +%s)     # the budget counts from here: the wheel install below is part of it
# OUT and --data are relative to the caller's folder, resolved before moving to the checkout's root
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -n "$DATA" ]; then
  DATA=$(cd "$DATA" 2>/dev/null && pwd) || { echo "no data folder $DATA (--data DIR, holding mnist/)" >&2; exit 2; }
fi
if [ -n "$BUNDLE" ]; then
  mkdir -p "$(dirname "$BUNDLE")"
  BUNDLE="$(cd "$(dirname "$BUNDLE")" && pwd)/$(basename "$BUNDLE")"
fi
cd "$(dirname "$0")/.."
if [ -z "$DATA" ]; then
  if [ -d shared/data/mnist ]; then DATA=shared/data; else DATA=../shared/data; fi
  DATA=$(cd "$DATA" 2>/dev/null && pwd) || { echo "no data folder $DATA (--data DIR, holding mnist/)" >&2; exit 2; }
fi
export PYTHONUNBUFFERED=1
: > "$OUT/00_preflight.txt"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  # (pip's own words kept for the preflight's record: a wheel for another Python fails here, not later)
  if python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      >> "$OUT/00_preflight.txt" 2>&1; then
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/site"
  else
    echo "installing the carried wheels (.whl/*.whl) failed: pip's output above" >> "$OUT/00_preflight.txt"
  fi
fi
# A plain checkout (the device machine): the package from here, kernels/ and csrc/ linked in as installed
LINKED=()
if ! python3 -c "import dpdm_fast.kernels, dpdm_fast.csrc" >/dev/null 2>&1; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  for d in kernels csrc; do
    [ -e "dpdm_fast/$d" ] || { ln -s "../$d" "dpdm_fast/$d"; LINKED+=("dpdm_fast/$d"); }
  done
fi
trap 'rm -f ${LINKED[@]+"${LINKED[@]}"}' EXIT
DPDM="python3 -m dpdm_fast.cli"

BUDGET=${GPU_CHECK_BUDGET_S:-530}
: > "$OUT/summary.txt"
# a machine without the carried wheels (bench/gpu_carry.py) would fail every section past the kernel tests
# at its first import: stop at once, naming what is missing, before the GPU's minutes go to failures
python3 bench/gpu_carry.py --check >> "$OUT/00_preflight.txt" 2>&1
PREFLIGHT=$?
cat "$OUT/00_preflight.txt"
if [ $PREFLIGHT -ne 0 ]; then
  echo "00_preflight rc=$PREFLIGHT (stopped: see 00_preflight.txt)" | tee -a "$OUT/summary.txt"
  bundle
  exit 3
fi
budget_left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# bundle: OUT so far as one archive (written aside, then moved: a run cut off mid-write keeps the last whole one)
bundle() {
  [ -n "$BUNDLE" ] || return 0
  tar -C "$(dirname "$OUT")" --exclude='*.pt' --exclude='*.npz' --exclude="$(basename "$BUNDLE")*" \
    -czf "$BUNDLE.partial" "$(basename "$OUT")" && mv -f "$BUNDLE.partial" "$BUNDLE"
}
# section NAME LIMIT_S COMMAND...: run it with what is left of the budget, log it, record its status
section() {
  local name=$1 limit=$2 left t0 rc
  shift 2
  left=$(budget_left)
  if [ "$left" -lt 15 ]; then
    echo "$name SKIPPED (${left}s of the budget left)" | tee -a "$OUT/summary.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit}s)"
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  rc=$?
  tail -n 4 "$OUT/$name.txt"
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s$([ $rc -eq 124 ] && echo ' (time limit)')" | tee -a "$OUT/summary.txt"
  bundle
}

if [ $DRY -eq 1 ]; then
  DEVICE=cpu
  export DPDM_TEST_DEVICE=cpu TRITON_INTERPRET=1
  PYTEST_MODE=(--collect-only -q)
  TINY=(model.network.nf=8 "model.network.ch_mult=[1,2]" model.network.num_res_blocks=1
        "model.network.attn_resolutions=[14]" loss.n_noise_samples=2 sampler.num_steps=3 dp.backend=torch)
  PUBLISHED=(configs/mnist_28/train_eps_10.0.yaml "${TINY[@]}" dp.max_physical_batch_size=auto dp.memory_fraction=0.01)
  GRID=(--device cpu --engines nonprivate,dpdm_fast,opacus_kavg --workloads small --grid 2x2 --repeats 1 --no-memory)
  RUN=(configs/mnist_28/train_eps_10.0.yaml "${TINY[@]}" data.public_size=null train.batch_size=32 train.n_epochs=1
       dp.delta=1e-6 dp.max_physical_batch_size=16 dp.n_splits=1 train.snapshot_freq=1000)
  RUN_NCCL=("${RUN[@]}")
  TRAIN_STEPS=(--max-steps 2)
  SAMPLE=(--n 20 --steps 3 --batch 20)
  AUDIT=(configs/audit/mnist_quick.yaml model.network.nf=4 train.batch_size=75 train.n_epochs=1
         --canaries 40 --real-examples 60 --backend torch)
else
  DEVICE=cuda
  unset TRITON_INTERPRET
  export DPDM_TEST_DEVICE=cuda
  PYTEST_MODE=(-q -rs)
  PUBLISHED=(configs/mnist_28/train_eps_10.0.yaml dp.max_physical_batch_size=auto)
  GRID=(--device cuda --engines nonprivate,dpdm_fast,dpdm_fast_triton,opacus_kavg --workloads mnist,celeba
        --grid 64x32,256x32,1024x8 --repeats 3 --max-step-s 5)
  RUN=(configs/mnist_28/quick_cpu.yaml)
  RUN_NCCL=(configs/mnist_28/quick_cpu.yaml warmup.enabled=false)   # (the warm-up runs in one process only)
  TRAIN_STEPS=()
  SAMPLE=(--n 100)
  AUDIT=(configs/audit/mnist_quick.yaml --backend triton)
fi
python3 -c "import opacus" 2>/dev/null || GRID=("${GRID[@]/,opacus_kavg/}")   # (without Opacus: its column dropped)

section 01_env 30 python3 - <<'PY'
import importlib, shutil, subprocess, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.1f} GiB")
    smi = shutil.which("nvidia-smi")
    if smi:
        print(subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True).stdout.strip() or "driver: ?")
else:
    print("GPU none (CPU dry run)")
for name in ("triton", "opacus", "omegaconf", "kornia"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "MISSING:", type(e).__name__, e)
nvcc = shutil.which("nvcc")
print("nvcc", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
      if nvcc else "not found")
PY
# the sm_70 compile route needs the CUDA 12 wheels of the dev extras, which a bare GPU machine lacks:
# its compile-only tests are then left out (they run in every CPU test run), not reported as failures
NVRTC=()
python3 -c "from dpdm_fast.csrc import nvrtc_build; nvrtc_build.toolchain()" >/dev/null 2>&1 || NVRTC=(-k "not nvrtc")
section 02_kernels 100 python3 -m pytest -p no:cacheprovider "${PYTEST_MODE[@]}" ${NVRTC[@]+"${NVRTC[@]}"} \
  tests/test_kernels.py tests/test_engine_triton.py tests/test_cuda_kernels.py tests/test_engine_fp16.py
section 03_engine 70 python3 -m pytest -p no:cacheprovider "${PYTEST_MODE[@]}" tests/test_gpu.py
section 04_published 80 $DPDM info "${PUBLISHED[@]}" --device $DEVICE
section 05_grid 120 $DPDM bench "${GRID[@]}" --out "$OUT/grid"
section 06_nccl 45 torchrun --standalone --nproc-per-node 1 -m dpdm_fast.cli train "${RUN_NCCL[@]}" \
  data.path="$DATA/mnist" --workdir "$OUT/nccl" --device $DEVICE --max-steps 2 --no-progress
section 07_train 130 $DPDM train "${RUN[@]}" data.path="$DATA/mnist" --workdir "$OUT/train" --device $DEVICE \
  ${TRAIN_STEPS[@]+"${TRAIN_STEPS[@]}"} --no-progress
# (a run stopped before its first step, e.g. in the warm-up, writes no checkpoint: say so instead of a
# sampler's file-not-found; a spent budget is reported by section as for the others)
if [ -f "$OUT/train/checkpoint.pt" ] || [ "$(budget_left)" -lt 15 ]; then
  section 07_sample 25 $DPDM sample "$OUT/train/checkpoint.pt" "${SAMPLE[@]}" --device $DEVICE --no-progress \
    --out "$OUT/train/samples.npz"
else
  echo "07_sample SKIPPED (07_train wrote no checkpoint: see 07_train.txt)" | tee -a "$OUT/summary.txt"
fi
section 08_audit 60 $DPDM audit "${AUDIT[@]}" data.path="$DATA/mnist" --device $DEVICE --no-progress \
  --out "$OUT/audit"
echo "total $(( $(date +%s) - START ))s; summary in $OUT/summary.txt"
bundle
if [ -n "$BUNDLE" ]; then echo "bundle: $BUNDLE ($(du -k "$BUNDLE" | cut -f1) KiB)"; fi
