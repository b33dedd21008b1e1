"""pytest-benchmark view of the same steps: ``pytest bench/ --benchmark-only``.

Not part of the default test run (pytest.ini's testpaths is tests/). For the side-by-side
table with memory and ratios use ``dpdm-fast bench``; this file suits pytest-benchmark's
comparison tooling (``--benchmark-autosave``, ``--benchmark-compare``).
"""
import os
import warnings

import pytest
import torch

from dpdm_fast.benchmarks import ENGINES, build_engine

warnings.filterwarnings("ignore")
DEVICE = os.environ.get("DPDM_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
GRID = [(64, 32), (256, 32)] if DEVICE.startswith("cuda") else [(8, 4), (16, 8)]


@pytest.mark.parametrize("B,K", GRID, ids=[f"B{b}-K{k}" for b, k in GRID])
@pytest.mark.parametrize("workload", ["mnist", "celeba"])
@pytest.mark.parametrize("engine", list(ENGINES))
def test_step(benchmark, engine, workload, B, K):
    torch.set_num_threads(int(os.environ.get("DPDM_BENCH_THREADS", "2")))
    try:
        step, _ = build_engine(engine, workload, B, K, DEVICE)
        step()
    except Exception as e:  # noqa: BLE001 - a failing engine is reported, never silently dropped
        pytest.fail(f"{engine} fails on {workload} B={B} K={K}: {type(e).__name__}: {e}")
    sync = torch.cuda.synchronize if DEVICE.startswith("cuda") else (lambda: None)

    def run():
        step()
        sync()
    benchmark.extra_info.update(engine=engine, workload=workload, B=B, K=K, device=DEVICE)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
