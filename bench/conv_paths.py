"""Issue 8, item 2: is the Conv2d path the autotuner keeps the fastest one, layer by layer?

For each (workload, B, K) cell: one dpdm_fast step records every Conv2d call's shapes and the path the
autotuner chose for it; then each distinct shape's paths (grouped, loop, unfold and rows, where each
is a candidate) are timed again in isolation (min of 3 after a warm-up), and the chosen path's time
is compared with the fastest one's. The ordinary weight gradient (what non-private training computes
for the whole batch) is timed beside them for scale. A path more than 4x slower than the fastest at
warm-up is reported as such without further timing, as the autotuner does.

Usage: python bench/conv_paths.py [--workloads small,mnist] [--grid 16x1,64x2,...]
"""
from __future__ import annotations

import argparse
import time
import warnings
from collections import Counter

import torch

from dpdm_fast.benchmarks.engines import build_engine
from dpdm_fast.benchmarks.report import machine_info
from dpdm_fast.engine import autotune
from dpdm_fast.engine.capture import rule_runner
from dpdm_fast.engine.capture.rules import conv as conv_rule

DEFAULT_GRID = "16x1,16x8,64x1,64x2,64x32,256x1,256x8,1024x1,1024x2"


def _time(fn, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def conv_calls(workload: str, B: int, K: int) -> Counter:
    """(input shape, grad shape, weight shape, stride, padding, dilation, groups) of every Conv2d call
    of one step, with the path the autotuner chose for it."""
    seen: Counter = Counter()
    original = rule_runner.compute

    def record(site, names, args, kwargs, g, extra=()):
        m = site.module
        if isinstance(m, torch.nn.Conv2d) and "weight" in names:
            seen[(tuple(args[0].shape), tuple(g.shape), tuple(m.weight.shape), m.stride, m.padding,
                  m.dilation, m.groups)] += 1
        return original(site, names, args, kwargs, g, extra)
    rule_runner.compute = record
    try:
        autotune.clear_cache()
        step, _ = build_engine("dpdm_fast", workload, B, K)
        step()
    finally:
        rule_runner.compute = original
    return seen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="small,mnist")
    ap.add_argument("--grid", default=DEFAULT_GRID)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    m = machine_info("cpu", a.threads)
    print(f"{m['cpu']}, {a.threads} threads, torch {m['torch']}, {m['date']}")
    print("| workload | B | K | conv calls | chosen paths | chosen / fastest, worst layer | chosen / fastest, "
          "sum over the step | ordinary weight grad of the batch, sum | per-example (chosen), sum |")
    print("|---|---|---|---|---|---|---|---|---|")
    for w in a.workloads.split(","):
        for cell in a.grid.split(","):
            B, K = (int(v) for v in cell.split("x"))
            calls = conv_calls(w, B, K)
            choices = autotune.chosen_paths()
            worst, tot_chosen, tot_best, tot_plain, used = 1.0, 0.0, 0.0, 0.0, Counter()
            for (xs, gs, ws, stride, pad, dil, groups), n in calls.items():
                x, g = torch.randn(xs), torch.randn(gs)
                out = torch.zeros(B, *ws)  # like the engine's buffer block: allocated and touched already
                kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
                chosen = choices[("conv2d", conv_rule.path_key(x, g, torch.Size(ws), K, **kw))]
                used[chosen] += n
                paths = conv_rule.weight_paths(x, g, torch.Size(ws), K, out, **kw)  # exactly the rule's candidates
                if chosen not in paths:
                    raise RuntimeError(f"the rule chose {chosen!r}, which this audit does not know: add it")
                warm = {p: _time(f, 1) for p, f in paths.items()}
                t = {p: _time(f) for p, f in paths.items() if warm[p] <= 4 * min(warm.values()) or p == chosen}
                fastest = min(t.values())
                worst = max(worst, t[chosen] / fastest)
                tot_chosen += n * t[chosen]
                tot_best += n * fastest
                tot_plain += n * _time(lambda: torch.nn.grad.conv2d_weight(x, ws, g, **kw))
            print(f"| {w} | {B} | {K} | {sum(calls.values())} | "
                  + ", ".join(f"{p} {c}" for p, c in used.most_common())
                  + f" | {worst:.2f} | {tot_chosen / tot_best:.3f} | {tot_plain * 1e3:.1f} ms | {tot_chosen * 1e3:.1f} ms |",
                  flush=True)


if __name__ == "__main__":
    main()
