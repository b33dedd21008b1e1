"""Scaling note from a benchmark JSON: how time and memory grow with B and K, and what that predicts.

Usage: python bench/scaling.py bench/out/cpu_mnist/results.json
Fits, per engine, step time = a + b * rows (rows = B*K) and peak memory = m0 + m1 * rows by least
squares over the measured cells, shows the K-dependence at fixed B, and extrapolates to the paper's
MNIST run (B=4096, K=32, 300 epochs of 60,000 examples).
"""
from __future__ import annotations

import json
import math
import sys
from collections import defaultdict

PAPER_B, PAPER_K, EPOCHS, N = 4096, 32, 300, 60000


def fit(points):
    n = len(points)
    if n < 2:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def main(path: str) -> None:
    result = json.load(open(path))
    m = result["machine"]
    cells = [c for c in result["cells"] if c["status"] == "ok"]
    by_engine = defaultdict(list)
    for c in cells:
        by_engine[c["engine"]].append(c)
    steps = math.ceil(EPOCHS * N / PAPER_B)
    rows = PAPER_B * PAPER_K
    print(f"Machine: {m['cpu']} ({m['threads']} threads), {m['date'][:10]}; paper run: {steps} steps of {rows} rows\n")
    print("| engine | time per row (ms, fitted slope) | fixed cost per step (ms) | memory per row (MiB) | "
          "K=4 -> K=8 at B=16 (time ratio) | predicted paper run on this machine (core-hours) |")
    print("|---|---|---|---|---|---|")
    for engine, cs in by_engine.items():
        t = fit([(c["B"] * c["K"], c["median_s"]) for c in cs])
        mem = fit([(c["B"] * c["K"], c["peak_bytes"]) for c in cs if c.get("peak_bytes")])
        k4 = next((c for c in cs if c["B"] == 16 and c["K"] == 4), None)
        k8 = next((c for c in cs if c["B"] == 16 and c["K"] == 8), None)
        kr = f"{k8['median_s'] / k4['median_s']:.2f}x" if k4 and k8 else "-"
        if t is None:
            continue
        hours = steps * (t[0] + t[1] * rows) / 3600 * m["threads"]
        mem_s = f"{mem[1] / 2**20:.1f}" if mem else "-"
        print(f"| {engine} | {t[1] * 1e3:.2f} | {t[0] * 1e3:.0f} | {mem_s} | {kr} | {hours:,.0f} |")


if __name__ == "__main__":
    main(sys.argv[1])
