"""Issue 8, item 4: the engine's fixed per-step costs, each as a share of one DP step.

Profiles dpdm_fast steps (torch profiler) and reads the engine's named ranges:
  dpdm_fast.buffer_alloc  allocating the per-example buffer when B grows, and zeroing the norm table
  dpdm_fast.buffer_copy   copying per-group gradients into the buffer (rules that cannot write in place)
  dpdm_fast.norms         per-parameter norms of each example, as each block is written
  dpdm_fast.clip_sum      clip factors and the clip-weighted sum over examples
  dpdm_fast.noise         Gaussian noise on the summed gradient
  dpdm_fast.grads_out     handing the noisy average to the parameters' .grad
The step total is the profiled step's wall time; the unprofiled median step time is printed beside it.

Usage: python bench/fixed_costs.py [--workload small] [--batch 1024] [--k 1] [--steps 2]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch.profiler import profile

from dpdm_fast.benchmarks.engines import build_engine
from dpdm_fast.benchmarks.report import machine_info

SCOPES = ["buffer_alloc", "buffer_copy", "norms", "clip_sum", "noise", "grads_out"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="small")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="profiled steps (after two warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    step, params = build_engine("dpdm_fast", a.workload, a.batch, a.k)
    step()
    step()  # the first step autotunes the conv paths and allocates the buffer: not a steady-state step
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with profile() as prof:
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        profiled = (time.perf_counter() - t0) / a.steps
    totals = {s: 0.0 for s in SCOPES}
    for e in prof.key_averages():
        name = e.key.removeprefix("dpdm_fast.")
        if e.key.startswith("dpdm_fast.") and name in totals:
            totals[name] = e.cpu_time_total / 1e3 / a.steps
    m = machine_info("cpu", a.threads)
    print(f"{a.workload} net ({params:,} parameters), B={a.batch}, K={a.k}: {m['cpu']}, {a.threads} threads, "
          f"torch {m['torch']}")
    print(f"step: {profiled * 1e3:.0f} ms profiled, {statistics.median(times) * 1e3:.0f} ms unprofiled (median "
          f"of {a.steps})")
    print("| fixed cost | ms per step | share of the step |\n|---|---|---|")
    for s in SCOPES:
        print(f"| {s} | {totals[s]:.1f} | {100 * totals[s] / (profiled * 1e3):.2f}% |")
    print(f"| all of them | {sum(totals.values()):.1f} | {100 * sum(totals.values()) / (profiled * 1e3):.2f}% |")
    # The buffer is allocated once (and again only when a batch is larger than every earlier one),
    # so steady-state steps above show ~0 for it; its one-time cost, first touch of every page included:
    n = a.batch * params
    t0 = time.perf_counter()
    torch.empty(n, dtype=torch.float32).fill_(0.0)
    once = time.perf_counter() - t0
    print(f"one-time allocation + first touch of the {n * 4 / 2**20:,.0f} MiB buffer: {once * 1e3:.0f} ms "
          f"({100 * once / statistics.median(times):.1f}% of one step, paid on the first step only)")


if __name__ == "__main__":
    main()
