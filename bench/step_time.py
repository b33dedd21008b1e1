"""Issue 3's check: one DP step of the DPDM MNIST network against non-private and Opacus, side by side.

Engines (see dpdm_fast/benchmarks/engines.py) are timed interleaved in one process:
  nonprivate   plain Adam step on the mean loss (the floor)
  dpdm_fast    this engine
  opacus_kavg  Opacus 1.6 'hooks' per-row gradients, averaged over each example's K rows, clipped

Usage: python bench/step_time.py [--batch 16] [--k 8] [--threads 2] [--repeats 7]
"""
from __future__ import annotations

import argparse
import warnings

import torch

from dpdm_fast.benchmarks.measure import time_cell
from dpdm_fast.benchmarks.report import machine_info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--workload", default="mnist")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    out = time_cell(["nonprivate", "dpdm_fast", "opacus_kavg"], a.workload, a.batch, a.k, a.repeats, "cpu")
    m = machine_info("cpu", a.threads)
    print(f"{a.workload}, B={a.batch}, K={a.k}, {m['cpu']}, {a.threads} threads, torch {m['torch']}")
    base = out["nonprivate"].get("median_s")
    for name, r in out.items():
        if r["status"] != "ok":
            print(f"{name:12s} {r['status']}")
            continue
        print(f"{name:12s} median {r['median_s'] * 1e3:8.1f} ms (min {r['min_s'] * 1e3:.1f}, max {r['max_s'] * 1e3:.1f})"
              + (f"  {r['median_s'] / base:.2f}x non-private" if base else ""))
    if out["dpdm_fast"]["status"] == out["opacus_kavg"]["status"] == "ok":
        print(f"dpdm_fast speed-up over opacus_kavg: {out['opacus_kavg']['median_s'] / out['dpdm_fast']['median_s']:.2f}x")


if __name__ == "__main__":
    main()
