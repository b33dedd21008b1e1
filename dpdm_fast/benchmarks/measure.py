"""Measurements of one grid cell: interleaved step times, and peak memory of each engine alone.

Peak memory is measured in a fresh subprocess per engine (``python -m dpdm_fast.benchmarks.measure
memory ...``) that builds the engine and runs two steps: on CPU the peak of live tensor bytes (torch
profiler allocation events) and the peak RSS, on GPU ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time

import torch

from .engines import build_engine
from ..engine.profiling import peak_allocated_bytes, reset_resident_peak, resident_bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _failure(e: BaseException) -> str:
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
        return "out of memory"
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def time_cell(engines: list[str], workload: str, B: int, K: int, repeats: int, device: str) -> dict:
    """Median/min/max step time of each engine; repeats interleaved across engines so that machine
    noise hits all of them alike. A failing engine gets a status instead of times."""
    dev = torch.device(device)
    steps, out = {}, {}
    for name in engines:
        try:
            step, _ = build_engine(name, workload, B, K, dev)
            step()  # warm-up (and first failure point)
            _sync(dev)
            steps[name] = step
        except Exception as e:  # noqa: BLE001 - reported in the table, never dropped
            out[name] = {"status": _failure(e)}
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    times = {n: [] for n in steps}
    for _ in range(repeats):
        for name, step in list(steps.items()):
            gc.collect()
            _sync(dev)
            t0 = time.perf_counter()
            try:
                step()
                _sync(dev)
            except Exception as e:  # noqa: BLE001
                out[name] = {"status": _failure(e)}
                del steps[name]
                continue
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        if name not in out:
            out[name] = _summary(ts)
    return out


def _summary(ts: list[float]) -> dict:
    ts_sorted = sorted(ts)
    q1, q3 = ts_sorted[len(ts) // 4], ts_sorted[(3 * len(ts)) // 4]
    return {"status": "ok", "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
            "iqr_s": q3 - q1, "times_s": ts}


def time_here(engine: str, workload: str, B: int, K: int, steps: int, device: str) -> dict:
    dev = torch.device(device)
    try:
        step, _ = build_engine(engine, workload, B, K, dev)
        step()
        _sync(dev)
        ts = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            _sync(dev)
            ts.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        return {"status": _failure(e)}
    return {"status": "ok", "times_s": ts}


def time_cell_isolated(engines: list[str], workload: str, B: int, K: int, rounds: int, device: str,
                       threads: int) -> dict:
    """Like ``time_cell``, but every engine runs alone in a fresh process (as in real training, where
    one process trains with one engine), one timed step per process, engines taking turns for
    ``rounds`` rounds so that machine drift still hits all of them alike."""
    times: dict[str, list[float]] = {e: [] for e in engines}
    out: dict[str, dict] = {}
    for _ in range(rounds):
        for e in engines:
            if e in out:
                continue
            r = _run_self(["time", e, workload, str(B), str(K), "--threads", str(threads), "--device", device])
            if r["status"] != "ok":
                out[e] = r
            else:
                times[e] += r["times_s"]
    for e, ts in times.items():
        if e not in out:
            out[e] = _summary(ts)
    return out


def _run_self(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "dpdm_fast.benchmarks.measure", *args], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"status": "out of memory" if proc.returncode == -9 else f"failed: {tail[:160]}"}
    return json.loads(lines[-1])


def peak_memory_here(engine: str, workload: str, B: int, K: int, device: str) -> dict:
    """Peak memory of building the engine and running two training steps.

    Both above the tensors live before it (an earlier cell's leftovers do not count). GPU: the caching
    allocator's peak. CPU: the peak of live tensor bytes, from the torch profiler's allocation events
    (precise: model, rows, optimizer state, persistent engine buffers and every temporary), plus the
    process's peak RSS during the steps (what the OS saw; noisy, not reset between cells' allocations).
    """
    dev = torch.device(device)
    built = {}

    def build_and_step():
        built["step"], built["params"] = build_engine(engine, workload, B, K, dev)
        for _ in range(2):
            built["step"]()
    try:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            peak = peak_allocated_bytes(build_and_step, dev)
            return {"status": "ok", "peak_bytes": peak, "params": built["params"]}
        reset_resident_peak()   # (where not permitted the peak includes start-up)
        peak = peak_allocated_bytes(build_and_step, dev)
    except Exception as e:  # noqa: BLE001
        return {"status": _failure(e)}
    return {"status": "ok", "peak_bytes": peak, "peak_rss_bytes": resident_bytes("VmHWM"), "params": built["params"]}


def peak_memory(engine: str, workload: str, B: int, K: int, device: str, threads: int) -> dict:
    """CPU: in a fresh subprocess, so nothing another engine allocated counts; GPU: in this process."""
    if torch.device(device).type == "cuda":
        return peak_memory_here(engine, workload, B, K, device)
    return _run_self(["memory", engine, workload, str(B), str(K), "--threads", str(threads)])


def _main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["memory", "time"])
    ap.add_argument("engine")
    ap.add_argument("workload")
    ap.add_argument("B", type=int)
    ap.add_argument("K", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.what == "memory":
        print(json.dumps(peak_memory_here(a.engine, a.workload, a.B, a.K, a.device)))
    else:
        print(json.dumps(time_here(a.engine, a.workload, a.B, a.K, 1, a.device)))


if __name__ == "__main__":
    _main()
