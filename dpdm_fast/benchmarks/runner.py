"""Run a grid of (workload, B, K) cells for a set of engines and derive the ratios."""
from __future__ import annotations

import gc
from typing import Iterable

import torch

from ..engine.cpu_allocator import available_bytes
from .engines import WORKLOADS
from .measure import peak_memory, time_cell, time_cell_isolated
from .report import machine_info

CPU_QUICK_GRID = [(8, 4), (16, 8)]
CPU_GRID = [(8, 4), (16, 8), (32, 4)]
GPU_GRID = [(64, 32), (256, 32), (1024, 8)]
# the range users run (issue 8): every B with every K
FULL_GRID = [(B, K) for B in (16, 64, 256, 1024) for K in (1, 2, 8, 32)]


class Budget:
    """Which (engine, cell) runs are too slow or too big to attempt, by extrapolation from the cells
    already measured, so that a grid over the whole range finishes and says what it did not run.

    Time: the engine's seconds per row in its largest measured cell of the workload, times the
    cell's rows (steps are linear in B*K, see bench/RESULTS.md). Memory (CPU, where running out kills
    the process instead of raising): activations per row, calibrated once per workload from two
    small non-private runs, plus what the engine itself keeps per example or per row, against the
    memory the machine has available.
    """

    def __init__(self, max_step_s: float | None, device: str, threads: int, max_rows: int | None = None):
        self.max_step_s, self.device, self.threads, self.max_rows = max_step_s, device, threads, max_rows
        self.seconds_per_row: dict[tuple[str, str], tuple[int, float]] = {}
        self.activation_bytes: dict[str, tuple[float, float]] = {}

    def record(self, workload: str, engine: str, rows: int, seconds: float) -> None:
        known = self.seconds_per_row.get((workload, engine))
        if known is None or rows >= known[0]:
            self.seconds_per_row[(workload, engine)] = (rows, seconds / rows)

    def refusal(self, workload: str, engine: str, B: int, K: int, params: int) -> str | None:
        rows = B * K
        if self.max_rows is not None and rows > self.max_rows:
            return f"too slow: not run ({rows} rows per step > --max-rows {self.max_rows})"
        known = self.seconds_per_row.get((workload, engine))
        if self.max_step_s is not None and known is not None and known[1] * rows > self.max_step_s:
            return f"too slow: not run (~{known[1] * rows:.3g} s per step extrapolated, limit {self.max_step_s:g} s)"
        if torch.device(self.device).type != "cpu":
            return None  # a GPU out-of-memory raises, and is reported as such by the timing itself
        need = self._memory_estimate(workload, engine, B, K, params)
        have = _available_bytes()
        if need is not None and have is not None and need > 0.9 * have:
            return (f"out of memory: not run (~{need / 2**30:.1f} GiB estimated, "
                    f"{have / 2**30:.1f} GiB available)")
        return None

    def _memory_estimate(self, workload: str, engine: str, B: int, K: int, params: int) -> float | None:
        if workload not in self.activation_bytes:
            small = [peak_memory("nonprivate", workload, 2, k, self.device, self.threads) for k in (1, 3)]
            if any(m["status"] != "ok" for m in small):
                return None
            per_row = (small[1]["peak_bytes"] - small[0]["peak_bytes"]) / 4
            self.activation_bytes[workload] = (small[0]["peak_bytes"] - 2 * per_row, per_row)
        base, per_row = self.activation_bytes[workload]
        rows, grad = B * K, 4 * params
        extra = {"nonprivate": 0, "dpdm_fast": B * grad, "opacus_kavg": (rows + B) * grad,
                 "opacus_ghost": rows * grad / 8, "functorch": 2 * rows * per_row + B * grad}.get(engine, rows * grad)
        return base + rows * per_row + extra


def _available_bytes() -> int | None:
    gc.collect()
    return available_bytes()   # (after glibc hands back the freed heap pages of earlier cells' engines)


def derive_ratios(row: list[dict]) -> None:
    """Ratios within one (workload, B, K) cell: time vs non-private, speed-up vs Opacus, memory over non-private."""
    by = {c["engine"]: c for c in row if c["status"] == "ok"}
    for c in row:
        if c["status"] != "ok":
            continue
        if "nonprivate" in by:
            c["x_nonprivate"] = c["median_s"] / by["nonprivate"]["median_s"]
            if c.get("peak_bytes") and by["nonprivate"].get("peak_bytes"):
                c["mem_over_nonprivate"] = c["peak_bytes"] - by["nonprivate"]["peak_bytes"]
        if "opacus_kavg" in by:
            c["speedup_vs_opacus_kavg"] = by["opacus_kavg"]["median_s"] / c["median_s"]


def remeasure_memory(result: dict, threads: int = 2, log=print) -> dict:
    """Re-run only the memory measurements of a saved result (e.g. after changing the memory metric)."""
    for c in result["cells"]:
        if c["status"] != "ok":
            continue
        log(f"[{c['workload']} B={c['B']} K={c['K']}] memory of {c['engine']}")
        mem = peak_memory(c["engine"], c["workload"], c["B"], c["K"], result["machine"]["device"], threads)
        c.pop("step_extra_bytes", None)
        c["peak_bytes"], c["peak_rss_bytes"] = mem.get("peak_bytes"), mem.get("peak_rss_bytes")
    for key in {(c["workload"], c["B"], c["K"]) for c in result["cells"]}:
        derive_ratios([c for c in result["cells"] if (c["workload"], c["B"], c["K"]) == key])
    return result


def run_grid(engines: Iterable[str], workloads: Iterable[str], grid: Iterable[tuple[int, int]], *,
             repeats: int = 5, device: str = "cpu", threads: int = 2, memory: bool = True,
             isolate: bool = False, max_step_s: float | None = None, max_rows: int | None = None,
             log=print, on_row=None) -> dict:
    """Time (and measure memory of) every engine on every cell. ``isolate``: each timed step in a
    fresh process of its own engine (slower to run; closer to a real one-engine training process).
    Cells run in order of rows (B*K); an engine whose step would exceed ``max_step_s`` seconds or the
    machine's memory (see ``Budget``) is reported as not run, with the estimate. ``on_row(result)``:
    called with the result so far after each (workload, B, K) row, so a run cut off keeps what it reached."""
    engines, workloads = list(engines), list(workloads)
    grid = sorted(grid, key=lambda c: (c[0] * c[1], c[0]))
    torch.set_num_threads(threads)
    budget = Budget(max_step_s, device, threads, max_rows)
    machine = machine_info(device, threads)

    def result(cells: list[dict]) -> dict:
        return {"machine": machine, "engines": engines, "repeats": repeats,
                "timing": "isolated processes" if isolate else "interleaved in one process",
                "max_step_s": max_step_s, "max_rows": max_rows, "cells": list(cells)}
    cells = []
    for w in workloads:
        params = sum(p.numel() for p in WORKLOADS[w].make_net().parameters())
        for B, K in grid:
            refused = {e: r for e in engines if (r := budget.refusal(w, e, B, K, params)) is not None}
            run = [e for e in engines if e not in refused]
            how = "rounds of one process per engine" if isolate else "interleaved repeats"
            log(f"[{w} B={B} K={K}] timing {', '.join(run) or 'nothing'} ({repeats} {how})"
                + "".join(f"; {e}: {r}" for e, r in refused.items()))
            if not run:
                timing = {}
            elif isolate:
                timing = time_cell_isolated(run, w, B, K, repeats, device, threads)
            else:
                timing = time_cell(run, w, B, K, repeats, device)
            gc.collect()
            row = []
            for e in engines:
                cell = {"workload": w, "B": B, "K": K, "engine": e, **timing.get(e, {"status": refused.get(e)})}
                if memory and e in run:
                    mem = peak_memory(e, w, B, K, device, threads)
                    cell["peak_bytes"] = mem.get("peak_bytes")
                    cell["peak_rss_bytes"] = mem.get("peak_rss_bytes")
                    if cell["status"] == "ok" and mem["status"] != "ok":
                        cell["status"] = f"memory run {mem['status']}"
                if cell["status"] == "ok":
                    cell["examples_per_s"] = B / cell["median_s"]
                    cell["rows_per_s"] = B * K / cell["median_s"]
                    budget.record(w, e, B * K, cell["median_s"])
                row.append(cell)
            derive_ratios(row)
            cells += row
            if on_row is not None:
                on_row(result(cells))
    return result(cells)
