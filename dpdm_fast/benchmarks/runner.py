"""Run a grid of (workload, B, K) cells for a set of engines and derive the ratios."""
from __future__ import annotations

import gc
from typing import Iterable

import torch

from .measure import peak_memory, time_cell, time_cell_isolated
from .report import machine_info

CPU_QUICK_GRID = [(8, 4), (16, 8)]
CPU_GRID = [(8, 4), (16, 8), (32, 4)]
GPU_GRID = [(64, 32), (256, 32), (1024, 8)]


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
             isolate: bool = False, log=print) -> dict:
    """Time (and measure memory of) every engine on every cell. ``isolate``: each timed step in a
    fresh process of its own engine (slower to run; closer to a real one-engine training process)."""
    engines, workloads, grid = list(engines), list(workloads), list(grid)
    torch.set_num_threads(threads)
    cells = []
    for w in workloads:
        for B, K in grid:
            how = "rounds of one process per engine" if isolate else "interleaved repeats"
            log(f"[{w} B={B} K={K}] timing {', '.join(engines)} ({repeats} {how})")
            if isolate:
                timing = time_cell_isolated(engines, w, B, K, repeats, device, threads)
            else:
                timing = time_cell(engines, w, B, K, repeats, device)
            gc.collect()
            row = []
            for e in engines:
                cell = {"workload": w, "B": B, "K": K, "engine": e, **timing[e]}
                if memory:
                    mem = peak_memory(e, w, B, K, device, threads)
                    cell["peak_bytes"] = mem.get("peak_bytes")
                    cell["peak_rss_bytes"] = mem.get("peak_rss_bytes")
                    if cell["status"] == "ok" and mem["status"] != "ok":
                        cell["status"] = f"memory run {mem['status']}"
                if cell["status"] == "ok":
                    cell["examples_per_s"] = B / cell["median_s"]
                    cell["rows_per_s"] = B * K / cell["median_s"]
                row.append(cell)
            derive_ratios(row)
            cells += row
    return {"machine": machine_info(device, threads), "engines": engines, "repeats": repeats,
            "timing": "isolated processes" if isolate else "interleaved in one process", "cells": cells}
